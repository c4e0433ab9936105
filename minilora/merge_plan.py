"""What a merge will do, decided before any I/O: which adapter patches which base tensor, in which layout
and with which scale, which adapter tensors replace base tensors, and how one patch is applied.

``plan_patches`` checks every adapter against the base (names, shapes, dtypes, ranks, variants it
refuses) and returns ``{base key: [Patch, ...]}`` plus the replacements; ``apply_patches`` applies them to
one tensor (C kernel, bit-exact with ``minilora.lora`` / ``minilora.dora``). Layer layout (Conv1D vs Linear)
is decided per layer (``module_layouts``), tied embeddings are refused unless asked for (``tied_output``).
Used by the streaming merge (``minilora.merge``) and the 4-bit merge (``minilora.merge_nf4``).
"""
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from minilora import architectures, dora, lora, native_merge
from minilora.checkpoint import prefix_renames, renamed_adapter
from minilora.dtypes import is_float
from minilora.errors import InputError


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
            adapted = native_merge.merge_weight_stats(W.astype(np.float32), m.A, m.B, self.s, ffio)[0]
            norm_of = None
            if W_orig is not None and W_orig is not W:
                norm_of = native_merge.merge_weight_stats(W_orig.astype(np.float32), m.A, m.B, self.s, ffio)[0]
            with np.errstate(all="ignore"):  # a zero norm gives inf / NaN: dora_merge_weight refuses it
                out, _ = dora.dora_merge_weight(W, m.A, m.B, self.s, m.magnitude, ffio, adapted=adapted,
                                                norm_of=norm_of)
            return out, float(np.max(np.abs(out.astype(np.float32) - W.astype(np.float32)), initial=0.0))
        with np.errstate(over="ignore"):  # a scale beyond float32 gives inf: reported just below
            s = np.float32(self.s) * np.float32(sign)
        out, max_delta, bad, first = native_merge.merge_weight_stats(W, m.A, m.B, s, ffio, out=W if inplace else None)
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


def tied_output(config, module):
    """True if ``module`` is an input embedding that the model's output layer shares: the config (or its
    text_config) ties word embeddings and its architecture has a language-model head."""
    if not isinstance(config, dict) or module.rsplit(".", 1)[-1] not in architectures.TIED_INPUT_EMBEDDINGS:
        return False
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
    heads = [a for a in config.get("architectures") or []
             if isinstance(a, str) and a.endswith(architectures.LM_HEAD_CLASSES)]
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


def roundtrip_report(written, given, patches, path, name):
    """The honest round trip of an unmerge: merge the tensor as written (in its own dtype) back, and say how
    far that lands from the merged tensor as given: max |error| and the fraction of elements that come
    back exactly (the same bits; equal values when --dtype changed the dtype)."""
    again = apply_patches(written, patches, +1, path, name)[0].reshape(-1)
    given = np.ascontiguousarray(given).reshape(-1)
    worst, exact, step = 0.0, 0, 1 << 18  # in slices: memory O(slice) beyond the two tensors
    for i in range(0, again.size, step):
        x, y = again[i:i + step], given[i:i + step]
        a, b = x.astype(np.float64), y.astype(np.float64)
        if x.dtype == y.dtype:
            same = x.view(f"u{x.dtype.itemsize}") == y.view(f"u{y.dtype.itemsize}")
        else:
            same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore"):
            worst = max(worst, float(np.nanmax(np.abs(a - b), initial=0.0)))
        exact += int(np.count_nonzero(same))
    return {"roundtrip_max_abs_error": worst,
            "roundtrip_bit_exact_fraction": exact / again.size if again.size else 1.0}


def convert_checked(x, dtype, path, name, what="values"):
    """``x`` converted to ``dtype`` (``--dtype``), refusing a conversion that turns finite values into inf."""
    with np.errstate(over="ignore"):  # overflow is reported just below
        out = x.astype(dtype)
    try:
        check_new_nonfinite(out, x, "converting to --dtype", what)
    except ValueError as e:
        raise InputError(str(e), path, name) from None
    return out
