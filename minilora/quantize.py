"""Streaming ``quantize`` (float checkpoint → NF4 checkpoint that transformers + bitsandbytes load)
and ``dequantize`` (such a checkpoint, ours or bitsandbytes', → a plain float checkpoint).

Shard by shard, tensor by tensor: peak memory is O(largest tensor). By default only the Linear
weights inside the decoder blocks (``model.layers.N.…``) are quantised; embeddings, norms and
``lm_head`` keep their dtype, as transformers' bitsandbytes integration does, and so do the 2-D weights
that transformers 5 holds in no ``nn.Linear`` or keeps in float (``not_linear``: embeddings, MoE
experts and routers, T5's ``wo``).
Every module left in float is named in ``llm_int8_skip_modules``, so transformers converts exactly the
quantised ones. GPT-2-style ``Conv1D`` weights (``minilora.architectures``) are stored ``(in, out)`` and
quantised transposed, ``(out, in)``, as transformers does; ``dequantize`` transposes them back. The
output folder appears atomically (``minilora.output``).
"""
import fnmatch
import os
import re
import shutil
import time

import numpy as np

from minilora import architectures, native, nf4
from minilora.checkpoint import INDEX_NAME, Checkpoint, config_with_dtype, index_metadata, write_json
from minilora.dtypes import dtype_from_name, is_float
from minilora.errors import InputError
from minilora.merge_plan import convert_checked
from minilora.nf4_checkpoint import (check_parts, is_aux_key, quantization_config, quantized_weights,
                                     read_state, skip_list, skipped_by, state_tensors)
from minilora.output import check_output, staged_folder
from minilora.progress import Progress
from minilora.safetensors_write import SafetensorsAppender

BLOCK_RE = re.compile(r"(^|\.)(layers|h|layer|blocks|block)\.\d+\.")
SKIP_PARTS = ("norm", "embed", "ln_", "lm_head", "wte", "wpe")
QUANTIZABLE = tuple(np.dtype(t) for t in (np.float32, np.float16)) + (dtype_from_name("bfloat16"),)


def keep_float(config):
    """``(model_type, pattern)`` of the modules transformers keeps in float for this config and its
    sub-configs (a composite model, e.g. BLIP-2 with a T5 language model, merges its parts' lists)."""
    configs = [config] + [v for v in (config or {}).values() if isinstance(v, dict)]
    return [(t, p) for c in configs for t in [architectures.model_type(c)]
            for p in architectures.KEEP_FLOAT.get(t, ())]


def not_linear(module, moe_layers, keep=(), model_type_of=None):
    """Why transformers 5 + bitsandbytes cannot load ``module`` quantised (it is no ``nn.Linear`` there,
    or one that transformers keeps in float), or None. ``moe_layers``: the names ``P`` of the
    checkpoint's ``P.experts.…`` tensors; ``keep``: ``keep_float(config)``."""
    parent, _, leaf = module.rpartition(".")
    if leaf in architectures.EMBEDDINGS:
        return "an embedding (nn.Embedding in transformers), which bitsandbytes does not quantise"
    if architectures.EXPERT_RE.search(module + "."):
        return ("a weight of one MoE expert: transformers 5 fuses the experts into 3-D tensors, which "
                "bitsandbytes does not quantise")
    if leaf in architectures.ROUTERS and parent in moe_layers:
        return ("the router of a MoE layer: transformers 5 holds it as a plain parameter, which bitsandbytes "
                "does not quantise")
    if leaf in architectures.LINEAR_SUBCLASSES.get(model_type_of, ()):
        return (f"a {model_type_of} layer built from a subclass of nn.Linear, which transformers does not "
                f"convert to Linear4bit")
    for model_type, pattern in keep:
        if skipped_by(pattern, module):
            return f"a layer that transformers keeps in float for {model_type} (_keep_in_fp32_modules {pattern!r})"
    return None


def select_weights(ckpt, include=(), exclude=()):
    """Weight keys to quantise: 2-D float ``*.weight`` of Linear layers in decoder blocks, or the modules
    matching the ``include`` globs; minus those matching ``exclude``, and minus empty weights (nothing to
    quantise). Globs match the module name. An included module that transformers holds in no Linear
    (``not_linear``) is refused."""
    moe_layers = {k.split(".experts.")[0] for k in ckpt.keys() if ".experts." in k}
    keep = keep_float(ckpt.config)
    chosen = []
    for key in ckpt.keys():
        dtype, shape, _ = ckpt.info(key)
        if not key.endswith(".weight") or len(shape) != 2 or not is_float(dtype):
            continue
        module = key[: -len(".weight")]
        if any(fnmatch.fnmatchcase(module, g) for g in exclude):
            continue
        reason = not_linear(module, moe_layers, keep, architectures.model_type(ckpt.config))
        if include:
            glob = next((g for g in include if fnmatch.fnmatchcase(module, g)), None)
            if glob is None:
                continue
            if reason:
                raise InputError(f"--include {glob!r} matches {module}, {reason}: transformers could not load "
                                 f"the result (narrow the glob or add --exclude)", ckpt.path, key)
        elif reason or not BLOCK_RE.search(key) or any(p in module for p in SKIP_PARTS):
            continue
        if 0 not in shape:
            chosen.append(key)
    return chosen


def float_modules(ckpt, chosen):
    """Modules whose 2-D float weight stays in float (transformers must not convert them), plus the output
    layers tied to the input embedding, which have no tensor of their own (``architectures.TIED_OUTPUTS``).
    One MoE expert's weights are no module in transformers 5: left out."""
    kept = [k[: -len(".weight")] for k in ckpt.keys() if k.endswith(".weight") and k not in chosen
            and len(ckpt.info(k)[1]) == 2 and is_float(ckpt.info(k)[0]) and not architectures.EXPERT_RE.search(k)]
    loaded = {architectures.LOADED_AS[k[: -len(".weight")].rsplit(".", 1)[-1]] for k in chosen
              if k[: -len(".weight")].rsplit(".", 1)[-1] in architectures.LOADED_AS}  # quantised under another name
    tied = [m for m, evidence in architectures.TIED_OUTPUTS.items() if f"{m}.weight" not in chosen
            and m not in loaded and (evidence is None or evidence in ckpt)]
    return kept + tied


def _check_dtypes(ckpt, chosen):
    for key in chosen:
        dtype = np.dtype(ckpt.info(key)[0])
        if dtype not in QUANTIZABLE:
            raise InputError(f"is {dtype}; bitsandbytes quantises only float32, float16 and bfloat16 weights "
                             f"(transformers + bitsandbytes refuse a float64 checkpoint too): convert it to "
                             f"float32 first, or keep it in float with --exclude", ckpt.path, key)


def _shard_out(ckpt, out_folder):
    return [(name, reader, os.path.join(out_folder, name)) for name, reader in ckpt.readers.items()]


def _finish_folder(ckpt, stage, weight_map, total_bytes, config_update):
    for name in ckpt.extra_files():
        if name != "config.json":
            shutil.copy2(os.path.join(ckpt.folder, name), os.path.join(stage, name))
    if ckpt.index is not None:
        write_json(os.path.join(stage, INDEX_NAME), {"metadata": index_metadata(ckpt, total_bytes),
                                                     "weight_map": weight_map})
    config = dict(ckpt.config or {})
    config_update(config)
    if ckpt.config is not None or config:
        write_json(os.path.join(stage, "config.json"), config)


def quantize_checkpoint(model, out, blocksize=nf4.DEFAULT_BLOCKSIZE, double_quant=True,
                        quant_type="nf4", include=(), exclude=(), force=False, quiet=True, compute_dtype="float32",
                        offset_mean="exact"):
    """Quantise the selected Linear weights of ``model`` to NF4 / FP4; write ``out``; return a report."""
    t0 = time.perf_counter()
    native.check_environment()
    if offset_mean not in OFFSET_MEANS:
        raise InputError(f"offset_mean must be one of {OFFSET_MEANS}, got {offset_mean!r}")
    out = os.path.abspath(str(out))
    check_output(out, [model], force)
    with Checkpoint(model) as ckpt:
        if ckpt.folder is None:
            raise InputError("quantize needs a model folder (config.json + safetensors)", ckpt.path)
        if quantized_weights(ckpt.keys()):
            raise InputError("checkpoint is already 4-bit quantised", ckpt.path)
        chosen = set(select_weights(ckpt, include, exclude))
        if not chosen:
            raise InputError("no Linear weights to quantise (no non-empty 2-D float *.weight in decoder blocks "
                             "matched; use --include)", ckpt.path)
        _check_dtypes(ckpt, chosen)
        skip = skip_list(float_modules(ckpt, chosen), [k[: -len(".weight")] for k in chosen])
        rows, weight_map = [], {}
        total = sum(ckpt.info(k)[2] for k in ckpt.keys())
        with staged_folder(out, force) as stage, Progress(total, "quantize", enabled=not quiet) as progress:
            for shard, reader, path in _shard_out(ckpt, stage):
                with SafetensorsAppender(path, reader.metadata) as w:
                    for name in reader.keys():
                        x = reader.get(name)
                        row = {"name": name, "dtype": str(x.dtype), "shape": list(x.shape),
                               "bytes_before": x.nbytes, "quantized": name in chosen}
                        if name in chosen:
                            parts = _quantize_one(ckpt, name, x, blocksize, double_quant, quant_type, row,
                                                  offset_mean)
                        else:
                            parts = [(name, x)]
                        for key, value in parts:
                            w.write(key, value)
                            weight_map[key] = shard
                        row["bytes_after"] = sum(np.asarray(v).nbytes for _, v in parts)
                        rows.append(row)
                        progress.update(x.nbytes, name)
            after = sum(r["bytes_after"] for r in rows)
            qc = quantization_config(double_quant, compute_dtype, quant_type, skip)
            _finish_folder(ckpt, stage, weight_map, after, lambda c: c.update(quantization_config=qc))
    before = sum(r["bytes_before"] for r in rows)
    q = [r for r in rows if r["quantized"]]
    measured = [r["max_abs_error"] for r in q if r["max_abs_error"] is not None]
    return {"input": ckpt.path, "output": out, "operation": "quantize", "quant_type": quant_type,
            "blocksize": blocksize, "double_quant": double_quant, "tensors": rows,
            "totals": {"tensors": len(rows), "quantized": len(q), "bytes_before": before,
                       "bytes_after": after, "max_abs_error": max(measured, default=None),
                       "non_finite_tensors": len(q) - len(measured), "skipped_modules": skip,
                       "seconds": round(time.perf_counter() - t0, 3)}}


OFFSET_MEANS = ("exact", "torch")


def torch_mean_float32(absmax):
    """bitsandbytes' double-quantisation offset, ``absmax.mean()`` of a CPU float32 torch tensor: torch's
    own summation order, so its last bit can differ from the exact mean (docs/nf4.md §3)."""
    import torch

    return np.float32(torch.from_numpy(np.ascontiguousarray(absmax, dtype=np.float32)).mean().item())


def _quantize_one(ckpt, name, x, blocksize, double_quant, quant_type, row, offset_mean="exact"):
    """The output tensors of one chosen weight; fills the report ``row``. A Conv1D weight ``(K, N)`` is
    quantised as ``(N, K)``, like transformers' ``Bnb4bitQuantize``. A weight holding NaN / inf gets no
    error figures (they would be NaN) but its count of non-finite values. ``offset_mean``: the double
    quantisation offset as the exact mean (default) or as bitsandbytes' ``torch.mean`` on the CPU."""
    if architectures.is_conv1d(ckpt.config, name[: -len(".weight")]):
        x = np.ascontiguousarray(x.T)  # (N, K)
        row["transposed"] = True
    backend = native.for_quant_type(quant_type)
    offset = None
    if double_quant and offset_mean == "torch":
        offset = torch_mean_float32(backend.quantize(x, blocksize, False, quant_type).absmax)
    state = backend.quantize(x, blocksize, double_quant, quant_type, offset)
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if bad:
        row.update(max_abs_error=None, rms_error=None, non_finite=bad)
    else:
        err = backend.dequantize(state, np.float32).astype(np.float64) - x.astype(np.float64)
        row.update(max_abs_error=float(np.abs(err).max()), rms_error=float(np.sqrt(np.mean(err * err))))
    return state_tensors(name, state)


def dequantize_checkpoint(src, out, dtype=None, force=False, quiet=True):
    """Turn a bitsandbytes 4-bit checkpoint back into float weights (bit-exact with bitsandbytes'
    dequantisation); ``dtype`` overrides the dtype recorded in each quant state."""
    t0 = time.perf_counter()
    native.check_environment()
    out = os.path.abspath(str(out))
    if out.endswith(".safetensors"):
        raise InputError("the output of dequantize is a model folder; give -o a folder name", out)
    check_output(out, [src], force)
    target = dtype_from_name(dtype)
    with Checkpoint(src) as ckpt:
        if ckpt.folder is None:
            raise InputError("dequantize needs a model folder (config.json + safetensors)", ckpt.path)
        quantized = quantized_weights(ckpt.keys())
        if not quantized:
            raise InputError("checkpoint has no bitsandbytes 4-bit weights", ckpt.path)
        check_parts(ckpt, quantized)
        rows, weight_map = [], {}
        total = sum(ckpt.info(k)[2] for k in ckpt.keys())
        with staged_folder(out, force) as stage, Progress(total, "dequantize", enabled=not quiet) as progress:
            for shard, reader, path in _shard_out(ckpt, stage):
                with SafetensorsAppender(path, reader.metadata) as w:
                    for name in reader.keys():
                        if is_aux_key(name) and name.rsplit(".weight.", 1)[0] + ".weight" in quantized:
                            progress.update(reader.info(name)[2], name)
                            continue
                        if name in quantized:
                            state = read_state(ckpt, name)
                            x = native.for_quant_type(state.quant_type).dequantize(state, target)  # (N, K)
                            if architectures.is_conv1d(ckpt.config, name[: -len(".weight")]):
                                x = np.ascontiguousarray(x.T)  # (K, N): Conv1D's own layout
                        else:
                            x = reader.get(name)
                            if target is not None and is_float(x.dtype):
                                x = convert_checked(x, target, reader.path, name)
                        w.write(name, x)
                        weight_map[name] = shard
                        rows.append({"name": name, "dtype": str(x.dtype), "shape": list(x.shape),
                                     "dequantized": name in quantized, "bytes": x.nbytes})
                        progress.update(reader.info(name)[2], name)
            after = sum(r["bytes"] for r in rows)
            def plain(config):
                config.pop("quantization_config", None)
                if target is not None:  # transformers loads in the dtype the config names
                    config.update(config_with_dtype(config, target))
            _finish_folder(ckpt, stage, weight_map, after, plain)
    return {"input": ckpt.path, "output": out, "operation": "dequantize", "tensors": rows,
            "totals": {"tensors": len(rows), "dequantized": len(quantized), "bytes": after,
                       "seconds": round(time.perf_counter() - t0, 3)}}
