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

import ml_dtypes
import numpy as np

from minilora import architectures, dora, lora, native
from minilora.checkpoint import (ADAPTER_CONFIG, INDEX_NAME, Checkpoint, config_with_dtype, index_metadata,
                                 load_adapter, prefix_renames, renamed_adapter, write_json)
from minilora.dtypes import dtype_from_name, is_float
from minilora.errors import InputError
from minilora.nf4_checkpoint import quantized_weights
from minilora.output import TEMP_PREFIX, check_output, make_parent, output_errors, staged_folder
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

    def apply(self, W, sign, inplace=False, W_orig=None):
        """``(W', max |W' − W|)``: merge (``sign=+1``) or unmerge (``-1``) this patch with the C kernel
        (bit-exact with ``minilora.lora`` / ``minilora.dora``). ``inplace``: a LoRA W' overwrites W.
        ``W_orig``: the tensor before this call's earlier patches: a DoRA norm is taken over W_orig + ΔW,
        as PEFT's forward (and its merge since 0.21) does when several adapters are active."""
        m, ffio = self.module, self.fan_in_fan_out
        verb = "merge" if sign > 0 else "unmerge"
        if self.role == "bias":
            with np.errstate(all="ignore"):  # overflow is reported just below
                delta = (np.float32(self.s) * m.bias.astype(np.float32)) * np.float32(sign)
                out = (W.astype(np.float32) + delta).astype(W.dtype)
            check_new_nonfinite(out, W, verb, "bias")
            return out, float(np.max(np.abs(out.astype(np.float32) - W.astype(np.float32)), initial=0.0))
        if m.magnitude is not None:  # DoRA (plan_patches refuses to unmerge it)
            adapted = native.merge_weight_stats(W.astype(np.float32), m.A, m.B, self.s, ffio)[0]
            norm_of = None
            if W_orig is not None and W_orig is not W:
                norm_of = native.merge_weight_stats(W_orig.astype(np.float32), m.A, m.B, self.s, ffio)[0]
            with np.errstate(all="ignore"):  # a zero norm gives inf / NaN: dora_merge_weight refuses it
                out, _ = dora.dora_merge_weight(W, m.A, m.B, self.s, m.magnitude, ffio, adapted=adapted,
                                                norm_of=norm_of)
            return out, float(np.max(np.abs(out.astype(np.float32) - W.astype(np.float32)), initial=0.0))
        with np.errstate(over="ignore"):  # a scale beyond float32 gives inf: reported just below
            s = np.float32(self.s) * np.float32(sign)
        out, max_delta, bad, first = native.merge_weight_stats(W, m.A, m.B, s, ffio, out=W if inplace else None)
        if bad:
            index = tuple(int(i) for i in np.unravel_index(first, W.shape))
            raise ValueError(f"{verb} produced {bad} NaN/inf values (first at index {index}) from finite base "
                             f"weights; the adapter or --scale is too large for {W.dtype}")
        return out, max_delta


def check_new_nonfinite(out, W, verb, what):
    """ValueError if ``out`` has NaN / inf where ``W`` was finite (``out``'s dtype is the one too small)."""
    with np.errstate(all="ignore"):
        new = ~np.isfinite(out.astype(np.float64)) & np.isfinite(W.astype(np.float64))
    if new.any():
        index = tuple(int(i) for i in np.argwhere(new)[0]) if new.ndim else ()
        raise ValueError(f"{verb} produced {int(new.sum())} NaN/inf values in the {what} (first at index {index}) "
                         f"from finite base values; the values are too large for {out.dtype}")


def plan_patches(ckpt, adapters, scale=1.0, sign=+1, info=None, target=None, linear_keys=(), tied_ok=False,
                 renamed=None):
    """Map base tensor name → [Patch, ...] and check every adapter fits the base, before any I/O.
    Returns ``(patches, full)``: ``full`` maps a base key to the adapter tensor that replaces it.
    ``info(name) → (dtype, shape, nbytes)`` defaults to the file's; an NF4 base passes the logical one, and
    its 4-bit weights in ``linear_keys`` (bitsandbytes stores every layer, Conv1D too, as (N, K)).
    ``target``: the output dtype (``--dtype``). ``tied_ok``: merge an embedding LoRA even where the base ties
    its output layer to that embedding (``tied_output``). ``renamed``: a dict that receives, per adapter path,
    the prefix rewrites that mapped its module names onto the checkpoint's (``checkpoint.prefix_renames``)."""
    info = info or ckpt.info
    patches, full = {}, {}
    renamed = {} if renamed is None else renamed
    for adapter in adapters:
        renames = prefix_renames(list(adapter.modules) + [k.rsplit(".", 1)[0] for k in adapter.full_tensors],
                                 {k.rsplit(".", 1)[0] for k in ckpt.keys()})
        adapter = renamed_adapter(adapter, renames)
        if renames:
            renamed[adapter.path] = renames
        shapes = {name: info(f"{name}.weight")[1] for name in adapter.modules if f"{name}.weight" in ckpt}
        layouts = module_layouts(ckpt, adapter, shapes, linear_keys)
        for name, m in adapter.modules.items():
            for key, patch in _module_patches(ckpt, adapter, m, info, target, layouts, scale, sign, tied_ok):
                patches.setdefault(key, []).append(patch)
        for key, value in adapter.full_tensors.items():
            full[key] = _replacement(ckpt, adapter, key, value, info, sign)
    return patches, full


def _module_patches(ckpt, adapter, m, info, target, layouts, scale, sign, tied_ok):
    """``[(base key, Patch)]`` of one adapted module (its weight, and its bias with ``lora_bias``), after
    checking that it fits the base."""
    cfg, name = adapter.config, m.name
    key = f"{name}.weight"
    if key not in ckpt:
        raise InputError(_missing_module_message(ckpt, name, key), adapter.path, name)
    dtype, shape, _ = info(key)
    if not is_float(dtype):
        raise InputError(f"base tensor {key} is {dtype}, not a float weight", ckpt.path, key)
    if np.dtype(target if target is not None else dtype) not in MERGE_DTYPES:
        raise InputError(f"base tensor {key} is {dtype}; merging needs float32, float16 or bfloat16 "
                         f"(choose one with --dtype)", ckpt.path, key)
    r, alpha = lora.module_rank_alpha(name, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                                      cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
    if m.A.shape[0] != r:
        raise InputError(f"lora_A has rank {m.A.shape[0]} but the config gives r={r} for this module",
                         adapter.path, name)
    if m.kind == "embedding" and sign > 0 and not tied_ok and not cfg.get("ensure_weight_tying") \
            and tied_output(ckpt.config, name):
        raise InputError(f"the base ties its output layer to {key} (tie_word_embeddings): merging this "
                         f"embedding LoRA changes the output layer too, while the adapter model changes only "
                         f"the input embedding (PEFT's merge_and_unload does the same); pass "
                         f"--merge-tied-embeddings to merge anyway", adapter.path, name)
    ffio = layouts[name]
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
    out = [(key, Patch(adapter.path, m, s, ffio, "weight"))]
    if m.bias is not None:
        if f"{name}.bias" not in ckpt:
            raise InputError(f"adapter trains a bias but the base has no {name}.bias", adapter.path, name)
        out.append((f"{name}.bias", Patch(adapter.path, m, s, ffio, "bias")))
    return out


def _replacement(ckpt, adapter, key, value, info, sign):
    """The ``Replacement`` for one full tensor of an adapter, after checking it fits the base."""
    saved_base = key in adapter.saved_base
    if key not in ckpt:
        raise InputError(f"adapter tensor {key} is neither a LoRA tensor nor a tensor of the base "
                         f"(a LoRA variant that minilora does not merge, or an adapter for another model)",
                         adapter.path, key)
    if info(key)[1] != value.shape:
        what = "saved copy of the base tensor" if saved_base else "modules_to_save tensor"
        raise InputError(f"{what} {value.shape} does not fit the base's {tuple(info(key)[1])} "
                         f"(a resized vocabulary, or an adapter for another model?)", adapter.path, key)
    if sign < 0 and not saved_base:
        raise InputError("modules_to_save replaced this tensor when merging; its base values are not in "
                         "the adapter, so unmerge cannot restore them", adapter.path, key)
    return Replacement(value, saved_base, adapter.path)


MERGE_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float16, ml_dtypes.bfloat16))


@dataclass
class Replacement:
    """An adapter tensor that replaces a base tensor: a modules_to_save module, or (``saved_base``) the copy
    of the base weights PEFT saves beside an adapted embedding."""
    value: object
    saved_base: bool
    adapter: str


def module_layouts(ckpt, adapter, shapes, linear_keys=()):
    """{module: fan_in_fan_out} per module of one adapter, as PEFT decides it: by the layer's type, not by
    the config's single flag (PEFT rewrites that flag to whatever the last layer it wrapped needed, so an
    adapter on GPT-2's Conv1D layers and a Linear head has one value for both). The stored shape decides
    when in_features != out_features; a square layer goes by the model type (``minilora.architectures``),
    else by what the adapter's other layers show, else by the config's flag."""
    flag = bool(adapter.config.get("fan_in_fan_out"))
    known = architectures.knows_layout(ckpt.config)
    decided, by_shape, square = {}, {}, []
    for name, m in adapter.modules.items():
        if name not in shapes:
            continue  # not in the base: plan_patches reports it
        if m.kind == "embedding":
            decided[name] = True  # ΔW = (B A)ᵀ for an Embedding's (vocab, dim) weight
            continue
        if f"{name}.weight" in linear_keys:
            decided[name] = False
            continue
        K, N = m.A.shape[1], m.B.shape[0]
        shape = tuple(shapes[name])
        as_linear, as_conv1d = shape == (N, K), shape == (K, N)
        if as_linear != as_conv1d:
            decided[name] = by_shape[name] = as_conv1d
        elif as_linear and known:
            decided[name] = architectures.is_conv1d(ckpt.config, name)
        elif as_linear:
            square.append(name)
        else:
            decided[name] = flag  # fits neither: check_lora_shapes reports it
    seen = set(by_shape.values())
    for name in square:
        if len(seen) > 1:
            raise InputError(f"cannot tell whether {name} is a Conv1D (in, out) or a Linear (out, in) layer: "
                             f"this adapter has both kinds and the layer is square; give the model folder "
                             f"(its config.json names the architecture)", adapter.path, name)
        decided[name] = next(iter(seen)) if seen else flag
    return decided


# Input embeddings that transformers ties to the output layer of a language-model head (tie_word_embeddings).
TIED_INPUT_EMBEDDINGS = ("embed_tokens", "wte", "shared", "word_embeddings", "embed_in")
LM_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM", "WithLMHead")


def tied_output(config, module):
    """True if ``module`` is an input embedding that the model's output layer shares: the config (or its
    text_config) ties word embeddings and its architecture has a language-model head."""
    if not isinstance(config, dict) or module.rsplit(".", 1)[-1] not in TIED_INPUT_EMBEDDINGS:
        return False
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    heads = [a for a in config.get("architectures") or [] if isinstance(a, str) and a.endswith(LM_HEAD_CLASSES)]
    return bool(tied) and bool(heads)


def _missing_module_message(ckpt, name, key):
    config = ckpt.config or {}
    if config.get("tie_word_embeddings") and name.rsplit(".", 1)[-1] in ("lm_head", "embed_out"):
        return (f"the base has no {key}: its output layer is tied to the input embedding (tie_word_embeddings), "
                f"and a LoRA on the tied {name} cannot be merged without untying them")
    if name.rsplit(".", 1)[-1] == "experts":
        return (f"the base has no {key}: LoRA on MoE expert parameters (PEFT target_parameters on a 3-D "
                f"experts tensor) is not supported")
    if name.rsplit(".", 1)[-1] == "embed_tokens" and "shared.weight" in ckpt:
        return (f"the base has no {key}: it stores this embedding as shared.weight (encoder and decoder tied to "
                f"it), and a LoRA on the tied {name} cannot be merged into it alone")
    return (f"adapter module {name} has no tensor {key} in the base checkpoint {ckpt.path} (an adapter for a "
            f"different model? or for module names that transformers 5 renames from the file's keys when "
            f"loading, as for LLaVA-family, ViT and Mixtral checkpoints: minilora merges by the file's names)")


def _layout(ckpt, out):
    """(single file output?, shard file names in output) — shards are written like the input."""
    if ckpt.folder is None and out.endswith(".safetensors"):
        return True, [os.path.basename(out)]
    return False, list(ckpt.readers)


def merge_checkpoint(base, adapters, out, scale=1.0, dtype=None, force=False, quiet=True, sign=+1,
                     requantize=False, durable=True, tied_ok=False):
    """Merge (``sign=+1``) or unmerge (``sign=-1``) adapters into ``base``; write ``out``; return a
    report dict. ``base``: file or model folder; ``adapters``: paths of PEFT adapters. An NF4 base
    (bitsandbytes layout) is dequantised; ``requantize`` quantises the merged weights again.
    ``durable``: fsync every output file before it is renamed into place (``SafetensorsWriter``).
    ``tied_ok``: merge an embedding LoRA into an embedding the output layer is tied to (``plan_patches``)."""
    t0 = time.perf_counter()
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
                                            tied_ok, renamed)
            return _report(base, adapters, out, sign, rows, t0, renamed, written)
        if requantize:
            raise InputError("--requantize needs a 4-bit (bitsandbytes NF4/FP4) base", ckpt.path)
        patches, full = plan_patches(ckpt, adapters, scale, sign, target=target, tied_ok=tied_ok, renamed=renamed)
        single, shard_names = _layout(ckpt, out)
        if single:
            make_parent(out)
            with output_errors(out, os.path.join(os.path.dirname(out), TEMP_PREFIX)):
                rows = _write_shards(ckpt, patches, full, target, out, single, shard_names, quiet, sign, durable)
        else:
            with staged_folder(out) as stage:
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
        progress.update(row["input_bytes"], name)
    return rows


def apply_patches(W, patches, sign, path, name, inplace=False):
    """Apply (``sign=+1``) or remove (``sign=-1``, in reverse order) the patches of one tensor;
    returns ``(W', max |W' − W|)``. ``inplace`` (one LoRA patch): W' may overwrite W."""
    W0, max_delta = W, 0.0
    for p in patches if sign > 0 else reversed(patches):
        try:
            W, max_delta = p.apply(W, sign, inplace=inplace, W_orig=W0)
        except ValueError as e:
            raise InputError(str(e), path, name) from None
    if len(patches) > 1:  # the kernel reports one step; several adapters need the end-to-end change
        max_delta = float(np.max(np.abs(W.astype(np.float32) - W0.astype(np.float32)), initial=0.0))
    return W, max_delta


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
        W, owned = _to(W, out_dtype), True
        try:
            check_new_nonfinite(W, W_in, "converting to --dtype", "values")
        except ValueError as e:
            raise InputError(str(e), reader.path, name) from None
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
        out = _to(W, out_dtype)
        try:
            check_new_nonfinite(out, W, "converting the merge to --dtype", "weights")
        except ValueError as e:
            raise InputError(str(e), reader.path, name) from None
        W = out
    if patches and sign < 0:
        row.update(roundtrip_report(W, W_in, patches, reader.path, name))
    if patches or replacement is not None:
        row["max_abs_delta"] = max_delta
    row["_array"] = W
    return row


def roundtrip_report(written, given, patches, path, name):
    """The honest round trip of an unmerge: merge the tensor as written (in its own dtype) back, and say how
    far that lands from the merged tensor as given: max |error| and the fraction of elements that come
    back exactly (the same bits; equal values when --dtype changed the dtype)."""
    again = apply_patches(written, patches, +1, path, name)[0]
    a, b = again.astype(np.float64), given.astype(np.float64)
    if again.dtype == given.dtype:
        same = again.view(f"u{again.dtype.itemsize}") == given.view(f"u{given.dtype.itemsize}")
    else:
        same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        err = np.abs(a - b)
    return {"roundtrip_max_abs_error": float(np.nanmax(err, initial=0.0)),
            "roundtrip_bit_exact_fraction": float(same.mean()) if same.size else 1.0}


def _to(W, dtype):
    with np.errstate(over="ignore"):  # overflow is checked by the caller
        return W.astype(dtype)


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
