"""Streaming merge and unmerge of LoRA adapters into a checkpoint, shard by shard, tensor by tensor.

``W' = round_to_dtype(float32(W) + s·B A)`` per adapted tensor (``minilora.lora.merge_weight``; DoRA:
``minilora.dora``); several adapters are applied one after another, each rounded to the dtype, as
PEFT's ``merge(adapter_names=[...])`` does. Every other tensor is copied byte for byte. Peak memory is
O(largest tensor): one tensor is read, merged and written at a time. Outputs appear atomically: a
file through a temporary file and rename, a folder through a temporary folder and rename.

Not here: the math (``minilora.lora``, ``minilora.dora``), key strings (``minilora.checkpoint``),
printing (``cli/``).
"""
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from minilora import dora, lora, native
from minilora.checkpoint import INDEX_NAME, Checkpoint, load_adapter, write_json
from minilora.dtypes import dtype_from_name, is_float
from minilora.errors import InputError
from minilora.nf4_checkpoint import quantized_weights
from minilora.output import check_output, staged_folder
from minilora.pipeline import TensorStream
from minilora.progress import Progress
from minilora.safetensors_io import SafetensorsWriter

@dataclass
class Patch:
    """One adapter's change to one base tensor."""
    adapter: str        # adapter file
    module: object      # checkpoint.LoraModule
    s: float            # effective scale: alpha/r (or alpha/√r) × user scale
    fan_in_fan_out: bool
    role: str           # "weight" or "bias"

    def apply(self, W, sign, inplace=False):
        """``(W', max |W' − W|)``: merge (``sign=+1``) or unmerge (``-1``) this patch with the C kernel
        (bit-exact with ``minilora.lora`` / ``minilora.dora``). ``inplace``: a LoRA W' overwrites W."""
        m, ffio = self.module, self.fan_in_fan_out or self.module.kind == "embedding"
        if self.role == "bias":
            delta = (np.float32(self.s) * m.bias.astype(np.float32)) * np.float32(sign)
            out = (W.astype(np.float32) + delta).astype(W.dtype)
            return out, float(np.max(np.abs(out.astype(np.float32) - W.astype(np.float32)), initial=0.0))
        if m.magnitude is not None:  # DoRA (plan_patches refuses to unmerge it)
            adapted = native.merge_weight_stats(W.astype(np.float32), m.A, m.B, self.s, ffio)[0]
            out, _ = dora.dora_merge_weight(W, m.A, m.B, self.s, m.magnitude, ffio, adapted=adapted)
            return out, float(np.max(np.abs(out.astype(np.float32) - W.astype(np.float32)), initial=0.0))
        with np.errstate(over="ignore"):  # a scale beyond float32 gives inf: reported just below
            s = np.float32(self.s) * np.float32(sign)
        out, max_delta, bad, first = native.merge_weight_stats(W, m.A, m.B, s, ffio, out=W if inplace else None)
        if bad:
            index = tuple(int(i) for i in np.unravel_index(first, W.shape))
            raise ValueError(f"{'merge' if sign > 0 else 'unmerge'} produced {bad} NaN/inf values (first at "
                             f"index {index}) from finite base weights; the adapter or --scale is too large "
                             f"for {W.dtype}")
        return out, max_delta


def plan_patches(ckpt, adapters, scale=1.0, sign=+1, info=None):
    """Map base tensor name → [Patch, ...] and check every adapter fits the base, before any I/O.
    ``info(name) → (dtype, shape, nbytes)`` defaults to the file's; an NF4 base passes the logical one."""
    info = info or ckpt.info
    patches, full = {}, {}
    for adapter in adapters:
        cfg = adapter.config
        for name, m in adapter.modules.items():
            key = f"{name}.weight"
            if key not in ckpt:
                raise InputError(f"adapter module {name} has no tensor {key} in the base checkpoint "
                                 f"{ckpt.path} (an adapter for a different model?)", adapter.path, name)
            dtype, shape, _ = info(key)
            if not is_float(dtype):
                raise InputError(f"base tensor {key} is {dtype}, not a float weight", ckpt.path, key)
            r, alpha = lora.module_rank_alpha(name, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                                              cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
            if m.A.shape[0] != r:
                raise InputError(f"lora_A has rank {m.A.shape[0]} but the config gives r={r}",
                                 adapter.path, name)
            ffio = bool(cfg.get("fan_in_fan_out")) or m.kind == "embedding"
            try:
                N, _, _ = lora.check_lora_shapes(np.empty(shape, dtype=np.uint8), m.A, m.B, ffio)
            except ValueError as e:
                raise InputError(f"does not fit base tensor {key}: {e}", adapter.path, name) from None
            if m.magnitude is not None and sign < 0:
                raise InputError("DoRA cannot be unmerged from a merged checkpoint: W' = (m/n)(W + ΔW) "
                                 "needs the per-row norm n of merge time", adapter.path, name)
            if m.magnitude is not None and m.magnitude.shape != (N,):
                raise InputError(f"DoRA magnitude {m.magnitude.shape} does not fit ({N},)", adapter.path, name)
            s = lora.scaling(alpha, r, bool(cfg.get("use_rslora"))) * scale
            patches.setdefault(key, []).append(Patch(adapter.path, m, s, ffio, "weight"))
            if m.bias is not None:
                if f"{name}.bias" not in ckpt:
                    raise InputError(f"adapter trains a bias but the base has no {name}.bias", adapter.path, name)
                patches.setdefault(f"{name}.bias", []).append(Patch(adapter.path, m, s, ffio, "bias"))
        for key, value in adapter.full_tensors.items():
            if key not in ckpt or info(key)[1] != value.shape:
                raise InputError(f"modules_to_save tensor {value.shape} has no matching base tensor",
                                 adapter.path, key)
            full[key] = value
    return patches, full


def _layout(ckpt, out):
    """(single file output?, shard file names in output) — shards are written like the input."""
    if ckpt.folder is None and out.endswith(".safetensors"):
        return True, [os.path.basename(out)]
    return False, list(ckpt.readers)


def merge_checkpoint(base, adapters, out, scale=1.0, dtype=None, force=False, quiet=True, sign=+1,
                     requantize=False, durable=True):
    """Merge (``sign=+1``) or unmerge (``sign=-1``) adapters into ``base``; write ``out``; return a
    report dict. ``base``: file or model folder; ``adapters``: paths of PEFT adapters. An NF4 base
    (bitsandbytes layout) is dequantised; ``requantize`` quantises the merged weights again.
    ``durable``: fsync every output file before it is renamed into place (``SafetensorsWriter``)."""
    t0 = time.perf_counter()
    out = os.path.abspath(str(out))
    check_output(out, [base, *adapters], force)
    adapters = [load_adapter(a) for a in adapters]
    target = dtype_from_name(dtype)
    with Checkpoint(base) as ckpt:
        if quantized_weights(ckpt.keys()):
            from minilora.merge_nf4 import merge_quantized

            rows = merge_quantized(ckpt, adapters, out, scale, target, requantize, quiet, sign, durable)
            return _report(base, adapters, out, sign, rows, t0)
        if requantize:
            raise InputError("--requantize needs a 4-bit (bitsandbytes NF4/FP4) base", ckpt.path)
        patches, full = plan_patches(ckpt, adapters, scale, sign)
        single, shard_names = _layout(ckpt, out)
        if single:
            rows = _write_shards(ckpt, patches, full, target, out, single, shard_names, quiet, sign, durable)
        else:
            with staged_folder(out) as stage:
                rows = _write_shards(ckpt, patches, full, target, stage, single, shard_names, quiet, sign, durable)
                _copy_extras(ckpt, stage, rows)
    return _report(base, adapters, out, sign, rows, t0)


def _report(base, adapters, out, sign, rows, t0):
    seconds = time.perf_counter() - t0
    nbytes = sum(r["bytes"] for r in rows)
    return {"base": os.path.abspath(str(base)), "adapters": [a.path for a in adapters], "output": out,
            "operation": "merge" if sign > 0 else "unmerge", "tensors": rows,
            "totals": {"tensors": len(rows), "changed": sum(1 for r in rows if r["adapters"]),
                       "bytes": nbytes, "seconds": round(seconds, 3),
                       "mb_per_s": round(nbytes / max(seconds, 1e-9) / 1e6, 1)}}


def _write_shards(ckpt, patches, full, target, stage, single, shard_names, quiet, sign, durable=True):
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
            with SafetensorsWriter(path, entries, reader.metadata, durable) as writer:
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
        progress.update(row["bytes"], name)
    return rows


def apply_patches(W, patches, sign, path, name, inplace=False):
    """Apply (``sign=+1``) or remove (``sign=-1``, in reverse order) the patches of one tensor;
    returns ``(W', max |W' − W|)``. ``inplace`` (one LoRA patch): W' may overwrite W."""
    W0, max_delta = W, 0.0
    for p in patches if sign > 0 else reversed(patches):
        try:
            W, max_delta = p.apply(W, sign, inplace=inplace)
        except ValueError as e:
            raise InputError(str(e), path, name) from None
    if len(patches) > 1:  # the kernel reports one step; several adapters need the end-to-end change
        max_delta = float(np.max(np.abs(W.astype(np.float32) - W0.astype(np.float32)), initial=0.0))
    return W, max_delta


def _row(reader, name, patches, out_dtype):
    _, shape, nbytes = reader.info(name)
    return {"name": name, "dtype": str(np.dtype(out_dtype)), "shape": list(shape), "bytes": nbytes,
            "adapters": [p.adapter for p in patches], "scale": [p.s for p in patches]}


def _process(reader, name, W, patches, replacement, out_dtype, sign, owned=False):
    """The report row of one tensor, with the tensor to write under ``"_array"``. ``owned``: W is a
    buffer of ours (not the caller's), so a single LoRA merge may run in place."""
    row = _row(reader, name, patches, out_dtype)
    if replacement is not None:
        W, owned = replacement, False
    if is_float(W.dtype) and W.dtype != out_dtype:
        W, owned = W.astype(out_dtype), True
    W0 = W
    inplace = owned and sign > 0 and len(patches) == 1
    W, max_delta = apply_patches(W, patches, sign, reader.path, name, inplace=inplace)
    if patches:
        row["max_abs_delta"] = max_delta
        if sign < 0:  # honest round trip: merging the result again, how far from the input are we?
            again = W
            for p in patches:
                again, _ = p.apply(again, +1)
            bits = f"u{W0.dtype.itemsize}"
            same = again.view(bits) == W0.view(bits)
            row["roundtrip_max_abs_error"] = float(np.abs(again.astype(np.float64) - W0.astype(np.float64)).max())
            row["roundtrip_bit_exact_fraction"] = float(same.mean()) if same.size else 1.0
    row["_array"] = W
    return row


def _copy_extras(ckpt, stage, rows):
    for name in ckpt.extra_files():
        shutil.copy2(os.path.join(ckpt.folder, name), os.path.join(stage, name))
    if ckpt.index is not None:
        weight_map = {r["name"]: ckpt.shard_of[r["name"]] for r in rows}
        total = sum(r["bytes"] if r["dtype"] == str(ckpt.info(r["name"])[0]) else
                    int(np.prod(r["shape"])) * np.dtype(r["dtype"]).itemsize for r in rows)
        write_json(os.path.join(stage, INDEX_NAME), {"metadata": {"total_size": total},
                                                     "weight_map": weight_map})
