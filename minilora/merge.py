"""Streaming merge and unmerge of LoRA adapters into a checkpoint, shard by shard, tensor by tensor.

``W' = round_to_dtype(float32(W) + s·B A)`` per adapted tensor (``minilora.lora.merge_weight``; DoRA:
``minilora.dora``); several adapters are applied one after another, each rounded to the dtype, as
PEFT's ``merge(adapter_names=[...])`` does. Every other tensor is copied byte for byte. Peak memory is
O(largest tensor): one tensor is read, merged and written at a time. Outputs appear atomically: a
file through a temporary file and rename, a folder through a temporary folder and rename.

Not here: what to patch and how (``minilora.merge_plan``), the math (``minilora.lora``, ``minilora.dora``),
key strings (``minilora.checkpoint``), printing (``cli/``).
"""
import math
import os
import shutil
import time

import numpy as np

from minilora import native
from minilora.checkpoint import (ADAPTER_CONFIG, INDEX_NAME, Checkpoint, config_with_dtype, index_metadata,
                                 load_adapter, write_json)
from minilora.dtypes import dtype_from_name, is_float
from minilora.errors import InputError
from minilora.merge_plan import apply_patches, convert_checked, plan_patches, roundtrip_report
from minilora.nf4_checkpoint import quantized_weights
from minilora.output import TEMP_PREFIX, check_output, make_parent, output_errors, staged_folder
from minilora.pipeline import TensorStream
from minilora.progress import Progress
from minilora.safetensors_write import SafetensorsWriter

def _layout(ckpt, out):
    """(single file output?, shard file names in output) — shards are written like the input."""
    if ckpt.folder is None and out.endswith(".safetensors"):
        return True, [os.path.basename(out)]
    return False, list(ckpt.readers)


def merge_checkpoint(base, adapters, out, scale=1.0, dtype=None, force=False, quiet=True, sign=+1,
                     requantize=False, durable=True, tied_ok=False, offset_mean="exact"):
    """Merge (``sign=+1``) or unmerge (``sign=-1``) adapters into ``base``; write ``out``; return a
    report dict. ``base``: file or model folder; ``adapters``: paths of PEFT adapters. An NF4 base
    (bitsandbytes layout) is dequantised; ``requantize`` quantises the merged weights again.
    ``durable``: fsync every output file before it is renamed into place (``SafetensorsWriter``).
    ``tied_ok``: merge an embedding LoRA into an embedding the output layer is tied to (``plan_patches``).
    ``offset_mean``: with ``requantize``, the double quantisation offset as the exact mean ("exact") or as
    bitsandbytes' CPU ``torch.mean`` ("torch", as PEFT's ``Linear4bit.merge`` gets it; docs/nf4.md §3)."""
    t0 = time.perf_counter()
    native.check_environment()
    if not math.isfinite(scale):
        raise InputError(f"--scale must be a finite number, got {scale}")
    if offset_mean not in ("exact", "torch"):
        raise ValueError(f"offset_mean must be 'exact' or 'torch', got {offset_mean!r}")
    if offset_mean != "exact" and not requantize:
        raise InputError("--nested-offset applies only with --requantize (it sets how the merged weights are "
                         "quantised again)")
    out = os.path.abspath(str(out))
    base_is_file = os.path.isfile(base)
    if not base_is_file and out.endswith(".safetensors"):
        raise InputError("BASE is a model folder, so the output is a folder too; give -o a folder name (or "
                         "give the folder's .safetensors file as BASE to get one file)", out)
    check_output(out, [base, *adapters, *_files_read_beside(base, adapters)], force,
                 single_file=base_is_file and out.endswith(".safetensors"))
    adapters = [load_adapter(a) for a in adapters]
    target = dtype_from_name(dtype)
    renamed = {}
    with Checkpoint(base) as ckpt:
        if quantized_weights(ckpt.keys()):
            from minilora.merge_nf4 import merge_quantized

            rows, written = merge_quantized(ckpt, adapters, out, scale, target, requantize, quiet, sign, durable,
                                            tied_ok, force, renamed, offset_mean)
            return _report(base, adapters, out, sign, rows, t0, renamed, written)
        if requantize:
            raise InputError("--requantize needs a 4-bit (bitsandbytes NF4/FP4) base", ckpt.path)
        patches, full = plan_patches(ckpt, adapters, scale, sign, target=target, tied_ok=tied_ok, renamed=renamed)
        single, shard_names = _layout(ckpt, out)
        if single:
            make_parent(out)
            with output_errors(out, os.path.join(os.path.dirname(out), TEMP_PREFIX)):
                rows = _write_shards(ckpt, patches, full, target, out, single, shard_names, quiet, sign, durable,
                                     replace=force)
        else:
            with staged_folder(out, replace=force) as stage:
                rows = _write_shards(ckpt, patches, full, target, stage, single, shard_names, quiet, sign, durable)
                _copy_extras(ckpt, stage, rows, target)
    return _report(base, adapters, out, sign, rows, t0, renamed)


def _files_read_beside(base, adapters):
    """Files read next to a file input: a bare adapter's config, a base file's config.json."""
    paths = [os.path.join(os.path.dirname(os.path.abspath(a)), ADAPTER_CONFIG) for a in adapters if os.path.isfile(a)]
    if os.path.isfile(base):
        paths.append(os.path.join(os.path.dirname(os.path.abspath(base)), "config.json"))
    return paths


def _report(base, adapters, out, sign, rows, t0, renamed=None, written=None):
    seconds = time.perf_counter() - t0
    nbytes = sum(r["bytes"] for r in rows) if written is None else written  # tensor bytes written
    return {"base": os.path.abspath(str(base)), "adapters": [a.path for a in adapters], "output": out,
            "operation": "merge" if sign > 0 else "unmerge", "tensors": rows, "renamed_modules": renamed or {},
            "totals": {"tensors": len(rows), "changed": sum(1 for r in rows if r["adapters"]),
                       "bytes": nbytes, "seconds": round(seconds, 3),
                       "mb_per_s": round(nbytes / max(seconds, 1e-9) / 1e6, 1)}}


def _write_shards(ckpt, patches, full, target, stage, single, shard_names, quiet, sign, durable=True, replace=True):
    """Write every shard (``single``: the one output file ``stage``, which may replace an existing file only
    with ``replace``); return the report rows."""
    rows, plans = [], []
    for shard, reader in zip(shard_names, ckpt.readers.values()):
        names = reader.keys()
        out_dtype = {n: target if target is not None and is_float(reader.info(n)[0]) else reader.info(n)[0]
                     for n in names}
        copied = {n for n in names if n not in patches and n not in full and out_dtype[n] == reader.info(n)[0]}
        plans.append((shard, reader, names, out_dtype, copied, [n for n in names if n not in copied]))
    buffer_bytes = max((reader.info(n)[2] for _, reader, _, _, _, merged in plans for n in merged), default=0)
    total = sum(ckpt.info(k)[2] for k in ckpt.keys())
    with Progress(total, "merge" if sign > 0 else "unmerge", enabled=not quiet) as progress, \
            TensorStream(buffer_bytes) as stream:   # one buffer pool for every shard
        for shard, reader, names, out_dtype, copied, merged in plans:
            entries = [(n, out_dtype[n], reader.info(n)[1]) for n in names]
            path = stage if single else os.path.join(stage, shard)
            with SafetensorsWriter(path, entries, reader.metadata, durable, replace=replace if single else None) as writer:
                try:
                    rows += _stream_shard(reader, names, out_dtype, copied, merged, patches, full, sign, writer,
                                          stream, progress)
                    stream.drain()  # this shard's writes are done before its writer closes (fsync, rename)
                except BaseException:
                    stream.cancel()  # nothing may still write into the file that the writer removes
                    raise
    return rows


def _stream_shard(reader, names, out_dtype, copied, merged, patches, full, sign, writer, stream, progress):
    """Queue every tensor of one shard on ``stream``'s writer, in file order; return the report rows."""
    rows = []
    ahead = [stream.read(reader, merged[0])] if merged else []
    done = 0  # tensors of `merged` taken from `ahead`
    for name in names:
        if name in copied:  # byte-identical copy, file to file
            stream.write(writer, name, copy_from=reader)
            row = _row(reader, name, [], out_dtype[name])
        else:
            W, buf = ahead.pop(0).result()
            done += 1
            if done < len(merged):  # tensor i+1 is read while tensor i is merged
                ahead.append(stream.read(reader, merged[done]))
            row = _process(reader, name, W, patches.get(name, []), full.get(name), out_dtype[name], sign,
                           owned=True)
            stream.write(writer, name, array=row.pop("_array"), release=buf)
        rows.append(row)
        progress.update(row["input_bytes"], name)
    return rows


def _row(reader, name, patches, out_dtype, replacement=None):
    _, shape, nbytes = reader.info(name)
    adapters = [replacement.adapter] if replacement is not None else []
    adapters += [p.adapter for p in patches if p.adapter not in adapters]
    row = {"name": name, "dtype": str(np.dtype(out_dtype)), "shape": list(shape),
           "bytes": int(np.prod(shape, dtype=np.int64)) * np.dtype(out_dtype).itemsize, "input_bytes": nbytes,
           "adapters": adapters, "scale": [p.s for p in patches]}
    if replacement is not None:
        row["replaced_by"] = "saved base copy" if replacement.saved_base else "modules_to_save"
    return row


def _process(reader, name, W, patches, replacement, out_dtype, sign, owned=False):
    """The report row of one tensor, with the tensor to write under ``"_array"``. ``owned``: W is a
    buffer of ours (not the caller's), so a single LoRA merge may run in place. ``replacement``: an adapter
    tensor that replaces W before merging; when unmerging, a saved copy of the base *is* the result.
    With ``--dtype`` (``out_dtype`` ≠ W's) a patched tensor is merged in float32 from W's own values and
    converted once at the end (PEFT merging in float32, then ``.to(dtype)``); others are just converted."""
    row = _row(reader, name, patches, out_dtype, replacement)
    if replacement is not None and sign > 0:
        W, owned = replacement.value, False
    W_in = W
    convert = is_float(W.dtype) and W.dtype != out_dtype
    if convert and not patches:
        W, owned = convert_checked(W, out_dtype, reader.path, name), True
    elif convert:
        W, owned = W.astype(np.float32), True  # exact: float16 / bfloat16 / float32 -> float32
    W0 = W
    if replacement is not None and sign < 0:  # the adapter holds the base values: no subtraction needed
        W = replacement.value.astype(W0.dtype) if is_float(W0.dtype) else replacement.value
        max_delta = float(np.max(np.abs(W.astype(np.float32) - W0.astype(np.float32)), initial=0.0))
    else:
        inplace = owned and sign > 0 and len(patches) == 1
        W, max_delta = apply_patches(W, patches, sign, reader.path, name, inplace=inplace)
    if convert and patches:
        W = convert_checked(W, out_dtype, reader.path, name, "merged weights")
    if patches and sign < 0:
        row.update(roundtrip_report(W, W_in, patches, reader.path, name))
    if patches or replacement is not None:
        row["max_abs_delta"] = max_delta
    row["_array"] = W
    return row


def _copy_extras(ckpt, stage, rows, target=None):
    """Config, tokenizer and code files come along; ``--dtype`` is written into config.json's dtype; the
    index gets the new total size (its other metadata is kept)."""
    for name in ckpt.extra_files():
        src, dst = os.path.join(ckpt.folder, name), os.path.join(stage, name)
        if name == "config.json" and target is not None and isinstance(ckpt.config, dict):
            write_json(dst, config_with_dtype(ckpt.config, target))
        else:
            shutil.copy2(src, dst)
    if ckpt.index is not None:
        weight_map = {r["name"]: ckpt.shard_of[r["name"]] for r in rows}
        write_json(os.path.join(stage, INDEX_NAME), {"metadata": index_metadata(ckpt, sum(r["bytes"] for r in rows)),
                                                     "weight_map": weight_map})
