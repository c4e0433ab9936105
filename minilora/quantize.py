"""Streaming ``quantize`` (float checkpoint → NF4 checkpoint that transformers + bitsandbytes load)
and ``dequantize`` (such a checkpoint, ours or bitsandbytes', → a plain float checkpoint).

Shard by shard, tensor by tensor: peak memory is O(largest tensor). By default only the Linear
weights inside the decoder blocks (``model.layers.N.…``) are quantised; embeddings, norms and
``lm_head`` keep their dtype, as transformers' bitsandbytes integration does. The output folder
appears atomically (``minilora.output``).
"""
import fnmatch
import os
import re
import shutil
import time

import numpy as np

from minilora import native, nf4
from minilora.checkpoint import INDEX_NAME, Checkpoint, write_json
from minilora.dtypes import dtype_from_name, is_float
from minilora.errors import InputError
from minilora.nf4_checkpoint import (is_aux_key, quantization_config, quantized_weights, read_state,
                                     state_tensors)
from minilora.output import check_output, staged_folder
from minilora.progress import Progress
from minilora.safetensors_io import SafetensorsAppender

BLOCK_RE = re.compile(r"(^|\.)(layers|h|layer|blocks|block)\.\d+\.")
SKIP_PARTS = ("norm", "embed", "ln_", "lm_head", "wte", "wpe")




def select_weights(ckpt, include=(), exclude=()):
    """Weight keys to quantise: 2-D float ``*.weight`` in decoder blocks, or the modules matching
    the ``include`` globs; minus those matching ``exclude``. Globs match the module name."""
    chosen = []
    for key in ckpt.keys():
        dtype, shape, _ = ckpt.info(key)
        if not key.endswith(".weight") or len(shape) != 2 or not is_float(dtype):
            continue
        module = key[: -len(".weight")]
        if include:
            keep = any(fnmatch.fnmatchcase(module, g) for g in include)
        else:
            keep = bool(BLOCK_RE.search(key)) and not any(p in module for p in SKIP_PARTS)
        if keep and not any(fnmatch.fnmatchcase(module, g) for g in exclude):
            chosen.append(key)
    return chosen


def _shard_out(ckpt, out_folder):
    return [(name, reader, os.path.join(out_folder, name)) for name, reader in ckpt.readers.items()]


def _finish_folder(ckpt, stage, weight_map, total_bytes, config_update):
    for name in ckpt.extra_files():
        if name != "config.json":
            shutil.copy2(os.path.join(ckpt.folder, name), os.path.join(stage, name))
    if ckpt.index is not None:
        write_json(os.path.join(stage, INDEX_NAME), {"metadata": {"total_size": total_bytes},
                                                     "weight_map": weight_map})
    config = dict(ckpt.config or {})
    config_update(config)
    if ckpt.config is not None or config:
        write_json(os.path.join(stage, "config.json"), config)


def quantize_checkpoint(model, out, blocksize=nf4.DEFAULT_BLOCKSIZE, double_quant=True,
                        quant_type="nf4", include=(), exclude=(), force=False, quiet=True):
    """Quantise the selected Linear weights of ``model`` to NF4 / FP4; write ``out``; return a report."""
    t0 = time.perf_counter()
    out = os.path.abspath(str(out))
    check_output(out, [model], force)
    with Checkpoint(model) as ckpt:
        if ckpt.folder is None:
            raise InputError("quantize needs a model folder (config.json + safetensors)", ckpt.path)
        if quantized_weights(ckpt.keys()):
            raise InputError("checkpoint is already 4-bit quantised", ckpt.path)
        chosen = set(select_weights(ckpt, include, exclude))
        if not chosen:
            raise InputError("no Linear weights to quantise (no 2-D float *.weight in decoder blocks "
                             "matched; use --include)", ckpt.path)
        rows, weight_map, compute = [], {}, set()
        total = sum(ckpt.info(k)[2] for k in ckpt.keys())
        with staged_folder(out) as stage, Progress(total, "quantize", enabled=not quiet) as progress:
            for shard, reader, path in _shard_out(ckpt, stage):
                with SafetensorsAppender(path, reader.metadata) as w:
                    for name in reader.keys():
                        x = reader.get(name)
                        row = {"name": name, "dtype": str(x.dtype), "shape": list(x.shape),
                               "bytes_before": x.nbytes, "quantized": name in chosen}
                        if name in chosen:
                            compute.add(str(x.dtype))
                            state = native.for_quant_type(quant_type).quantize(x, blocksize, double_quant, quant_type)
                            err = native.for_quant_type(quant_type).dequantize(state, np.float32).astype(np.float64) - x.astype(np.float64)
                            row.update(max_abs_error=float(np.abs(err).max()),
                                       rms_error=float(np.sqrt(np.mean(err * err))))
                            parts = state_tensors(name, state)
                        else:
                            parts = [(name, x)]
                        for key, value in parts:
                            w.write(key, value)
                            weight_map[key] = shard
                        row["bytes_after"] = sum(np.asarray(v).nbytes for _, v in parts)
                        rows.append(row)
                        progress.update(x.nbytes, name)
            after = sum(r["bytes_after"] for r in rows)
            qc = quantization_config(double_quant, sorted(compute)[0] if len(compute) == 1 else "float32",
                                     quant_type)
            _finish_folder(ckpt, stage, weight_map, after, lambda c: c.update(quantization_config=qc))
    before = sum(r["bytes_before"] for r in rows)
    q = [r for r in rows if r["quantized"]]
    return {"input": ckpt.path, "output": out, "operation": "quantize", "quant_type": quant_type,
            "blocksize": blocksize, "double_quant": double_quant, "tensors": rows,
            "totals": {"tensors": len(rows), "quantized": len(q), "bytes_before": before,
                       "bytes_after": after, "max_abs_error": max(r["max_abs_error"] for r in q),
                       "seconds": round(time.perf_counter() - t0, 3)}}


def dequantize_checkpoint(src, out, dtype=None, force=False, quiet=True):
    """Turn a bitsandbytes 4-bit checkpoint back into float weights (bit-exact with bitsandbytes'
    dequantisation); ``dtype`` overrides the dtype recorded in each quant state."""
    t0 = time.perf_counter()
    out = os.path.abspath(str(out))
    check_output(out, [src], force)
    target = dtype_from_name(dtype)
    with Checkpoint(src) as ckpt:
        if ckpt.folder is None:
            raise InputError("dequantize needs a model folder (config.json + safetensors)", ckpt.path)
        quantized = quantized_weights(ckpt.keys())
        if not quantized:
            raise InputError("checkpoint has no bitsandbytes 4-bit weights", ckpt.path)
        rows, weight_map = [], {}
        total = sum(ckpt.info(k)[2] for k in ckpt.keys())
        with staged_folder(out) as stage, Progress(total, "dequantize", enabled=not quiet) as progress:
            for shard, reader, path in _shard_out(ckpt, stage):
                with SafetensorsAppender(path, reader.metadata) as w:
                    for name in reader.keys():
                        if is_aux_key(name) and name.rsplit(".weight.", 1)[0] + ".weight" in quantized:
                            progress.update(reader.info(name)[2], name)
                            continue
                        if name in quantized:
                            state = read_state(ckpt, name)
                            x = native.for_quant_type(state.quant_type).dequantize(state, target)
                        else:
                            x = reader.get(name)
                            x = x.astype(target) if target is not None and is_float(x.dtype) else x
                        w.write(name, x)
                        weight_map[name] = shard
                        rows.append({"name": name, "dtype": str(x.dtype), "shape": list(x.shape),
                                     "dequantized": name in quantized, "bytes": x.nbytes})
                        progress.update(reader.info(name)[2], name)
            after = sum(r["bytes"] for r in rows)
            _finish_folder(ckpt, stage, weight_map, after, lambda c: c.pop("quantization_config", None))
    return {"input": ckpt.path, "output": out, "operation": "dequantize", "tensors": rows,
            "totals": {"tensors": len(rows), "dequantized": len(quantized), "bytes": after,
                       "seconds": round(time.perf_counter() - t0, 3)}}
