"""Merging into a 4-bit (bitsandbytes NF4 / FP4) base: QLoRA's merge, and what it costs.

``W = dequant(W_q)`` (bit-exact with bitsandbytes), ``W' = round(W + s·B A)`` as in ``minilora.merge``.
Without ``requantize`` the output is a plain float checkpoint (every 4-bit weight dequantised, the
``quantization_config`` dropped). With ``requantize`` the merged weights are quantised again with
the same blocksize, type and double quantisation, after each adapter in the order given (PEFT's
``Linear4bit.merge``), the quant state recording the dtype quantised (float32 for a LoRA sum, as bitsandbytes
records it); everything else is copied byte for byte.

4-bit weights are ``(N, K)`` whatever the layer (bitsandbytes stores GPT-2's Conv1D weights transposed);
a Conv1D weight dequantised into the float output goes back to Conv1D's ``(K, N)`` (``minilora.architectures``).
Re-quantised packed codes are stored in the dtype the input used (``bnb_4bit_quant_storage``).

Re-quantising is lossy: a delta smaller than half the gap between two NF4 levels × absmax vanishes.
The report says how much of ΔW survived, per tensor: ``delta_rel_error = ‖(dequant(q(W')) − W) − ΔW‖
/ ‖ΔW‖`` and the share of codes that changed. QA-LoRA avoids this with a zero-point quantiser
(docs/nf4.md); NF4 has no zero point.
"""
import os
import shutil

import numpy as np

from minilora import architectures, native
from minilora.checkpoint import INDEX_NAME, config_with_dtype, index_metadata, write_json
from minilora.dtypes import is_float
from minilora.errors import InputError
from minilora.merge_plan import apply_patches, convert_checked, plan_patches, roundtrip_report
from minilora.nf4_checkpoint import check_parts, is_aux_key, quantized_weights, read_state, state_tensors
from minilora.output import staged_folder
from minilora.progress import Progress
from minilora.quantize import torch_mean_float32
from minilora.safetensors_write import SafetensorsAppender



def merge_quantized(ckpt, adapters, out, scale, target, requantize, quiet, sign, durable=True, tied_ok=False, replace=True,
                    renamed=None, offset_mean="exact"):
    """Merge ``adapters`` into the 4-bit checkpoint ``ckpt``; write the folder ``out``; return ``(rows, bytes
    of tensor data written)`` (rows cover the tensors that were merged, dequantised or copied in float).
    ``offset_mean``: the re-quantised double quantisation offset, "exact" mean or bitsandbytes' "torch" mean."""
    if ckpt.folder is None:
        raise InputError("a 4-bit base must be a model folder", ckpt.path)
    if requantize and target is not None:
        raise InputError(f"--dtype {np.dtype(target).name} does not apply with --requantize: re-quantised weights "
                         f"keep the dtype recorded in their quant state and the other tensors are copied as they "
                         f"are; drop --dtype, or leave out --requantize to get float weights", ckpt.path)
    quantized = quantized_weights(ckpt.keys())
    check_parts(ckpt, quantized)
    states = {}  # the quant states read while planning, each until its tensor is written: memory O(largest)

    def state(key, keep=True):
        st = states.pop(key, None) or read_state(ckpt, key)
        if keep:
            states[key] = st
        return st

    def info(key):
        if key in quantized:
            s = state(key)
            return s.dtype, s.shape, int(np.prod(s.shape)) * s.dtype.itemsize
        return ckpt.info(key)

    patches, full = plan_patches(ckpt, adapters, scale, sign, info, linear_keys=set(quantized), tied_ok=tied_ok,
                                 renamed=renamed)
    owner = {}  # aux key -> its weight key
    for key in ckpt.keys():
        if is_aux_key(key):
            owner[key] = key.rsplit(".weight.", 1)[0] + ".weight"
    rows, weight_map, written = [], {}, 0
    total = sum(ckpt.info(k)[2] for k in ckpt.keys())
    with staged_folder(out, replace) as stage, Progress(total, "merge" if sign > 0 else "unmerge", enabled=not quiet) as progress:
        for shard, reader in ckpt.readers.items():
            with SafetensorsAppender(os.path.join(stage, shard), reader.metadata, durable) as w:
                for name in reader.keys():
                    nbytes = reader.info(name)[2]
                    if name in owner and owner[name] in quantized:
                        if requantize and owner[name] not in patches:
                            w.write(name, reader.get(name))       # untouched 4-bit weight: as it was
                            weight_map[name] = shard
                            written += nbytes
                        progress.update(nbytes, name)
                        continue
                    for key, value, row in _one(ckpt, reader, name, quantized, state, patches, full,
                                                target, requantize, sign, offset_mean):
                        w.write(key, value)
                        weight_map[key] = shard
                        written += value.nbytes
                        if row:
                            rows.append(row)
                    progress.update(nbytes, name)
        _finish(ckpt, stage, weight_map, requantize, None if requantize else target, written)
    return rows, written


def _one(ckpt, reader, name, quantized, state, patches, full, target, requantize, sign, offset_mean="exact"):
    """The output tensors ``[(key, array, row)]`` for the input tensor ``name``."""
    todo = patches.get(name, [])
    if name not in quantized:
        replacement = full.get(name)
        x = replacement.value if replacement is not None else reader.get(name)
        if replacement is not None and replacement.saved_base and sign < 0:
            todo = []  # unmerging: the saved copy is the base itself
        given = x
        convert = target is not None and not requantize and is_float(x.dtype) and x.dtype != target
        if convert and todo:
            x = x.astype(np.float32)  # merge in float32, convert once (as merge.py does)
        x = apply_patches(x, todo, sign, reader.path, name)[0] if todo else x
        if convert:
            x = convert_checked(x, target, reader.path, name)
        row = {"name": name, "dtype": str(x.dtype), "shape": list(x.shape), "bytes": x.nbytes,
               "adapters": [p.adapter for p in todo], "scale": [p.s for p in todo]}
        if todo and sign < 0:
            row.update(roundtrip_report(x, given, todo, reader.path, name))
        return [(name, x, row)]
    st = state(name, keep=False)
    if requantize and not todo:
        return [(name, reader.get(name), None)]
    W = native.for_quant_type(st.quant_type).dequantize(st)                   # bit-exact with bitsandbytes
    given = W
    if target is not None and not requantize and todo and W.dtype != target:
        W = W.astype(np.float32)  # merge in float32, convert once to --dtype (as merge.py does)
    exact_sum = requantize and todo and all(p.module.magnitude is None for p in todo)
    if exact_sum and W.dtype != np.float32:
        # PEFT's Linear4bit.merge quantises dequant(W) + ΔW as the float32 sum, not rounded to the state's
        # dtype first (its DoRA path does round first: kept as apply_patches does it)
        W = W.astype(np.float32)
    W_new, _ = apply_patches(W, todo, sign, reader.path, name)
    row = {"name": name, "shape": list(st.shape), "adapters": [p.adapter for p in todo],
           "scale": [p.s for p in todo], "bytes": W.nbytes}
    if todo:
        delta = W_new.astype(np.float64) - W.astype(np.float64)
        row["max_abs_delta"] = float(np.abs(delta).max())
    if not requantize:
        out = W_new.astype(target) if target is not None else W_new
        if todo and sign < 0:  # merge the written weights back: how far from the dequantised input?
            row.update(roundtrip_report(out, given, todo, reader.path, name))
        if architectures.is_conv1d(ckpt.config, name[: -len(".weight")]):
            out = np.ascontiguousarray(out.T)  # (K, N): Conv1D's own layout, as dequantize writes it
        row.update(dtype=str(out.dtype), shape=list(out.shape), bytes=out.nbytes)
        return [(name, out, row)]
    if len(todo) == 1:
        new = _quantize_like(W_new, st, offset_mean)
    else:  # PEFT quantises after each adapter; W_new (the float sum of all) is only the report's intended ΔW
        new = _merge_one_at_a_time(given, todo, st, offset_mean, reader.path, name)
    realised = native.for_quant_type(st.quant_type).dequantize(new, np.float32).astype(np.float64) - W.astype(np.float64)
    norm = float(np.linalg.norm(delta))
    row.update(dtype=f"{st.quant_type} (re-quantised)",
               delta_rel_error=float(np.linalg.norm(realised - delta) / norm) if norm else 0.0,
               codes_changed=_codes_changed(new.packed, st.packed, int(np.prod(st.shape))))
    storage = reader.info(name)[0]  # bitsandbytes' quant_storage: uint8, or e.g. bfloat16 holding the same bytes
    parts = state_tensors(name, new, storage)
    row["bytes"] = sum(np.asarray(v).nbytes for _, v in parts)  # what is written, not the float size
    return [(k, v, row if k == name else None) for k, v in parts]


def _merge_one_at_a_time(W0, patches, st, offset_mean, path, name):
    """PEFT's ``Linear4bit.merge`` of several adapters: per adapter, in the order given, dequantise, add its ΔW
    and quantise again. ``W0``: the layer dequantised ``(N, K)``. A LoRA step adds ΔW to the float32 image
    (PEFT's float32 sum); a DoRA step rounds to the dtype it was given and takes its norm over ``W0`` (PEFT
    rebuilds that base by a 4-bit unmerge and merge, which minilora does not reproduce: docs/nf4.md §6)."""
    backend, W, new = native.for_quant_type(st.quant_type), W0, None
    for p in patches:
        if new is not None:
            W = backend.dequantize(new)  # (N, K), in the dtype the previous step recorded
        if p.module.magnitude is None:
            W = W.astype(np.float32)
        try:
            W = p.apply(W, +1, W_orig=W0)[0]
        except ValueError as e:
            raise InputError(str(e), path, name) from None
        new = _quantize_like(W, st, offset_mean)
    return new


def _quantize_like(W, st, offset_mean):
    """``W`` quantised with the blocksize, type and double quantisation of the state ``st``, recording ``W``'s
    dtype as bitsandbytes' Params4bit does in PEFT's merge (float32 for a LoRA sum, the layer's dtype after
    DoRA; a later merge dequantises to it). The offset is the exact mean, or bitsandbytes' ``torch.mean`` on
    the CPU (``offset_mean="torch"``, what PEFT stores)."""
    backend, double_quant, offset = native.for_quant_type(st.quant_type), st.nested_codes is not None, None
    if double_quant and offset_mean == "torch":
        offset = torch_mean_float32(backend.quantize(W, st.blocksize, False, st.quant_type).absmax)
    return backend.quantize(W, st.blocksize, double_quant, st.quant_type, offset)


def _codes_changed(a, b, n):
    """Share of the ``n`` 4-bit codes that differ between two packed arrays."""
    x = (a ^ b).reshape(-1)  # (n+1)//2 bytes
    changed = np.count_nonzero(x >> 4) + np.count_nonzero(x[: n // 2] & 0x0F)
    return changed / max(n, 1)



def _finish(ckpt, stage, weight_map, requantize, target=None, total_size=0):
    for name in ckpt.extra_files():
        if name != "config.json":
            shutil.copy2(os.path.join(ckpt.folder, name), os.path.join(stage, name))
    if ckpt.index is not None:
        write_json(os.path.join(stage, INDEX_NAME), {"metadata": index_metadata(ckpt, total_size),
                                                     "weight_map": weight_map})
    config = dict(ckpt.config or {})
    if not requantize:
        config.pop("quantization_config", None)
    if target is not None:
        config = config_with_dtype(config, target)
    write_json(os.path.join(stage, "config.json"), config)
