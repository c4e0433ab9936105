"""NF4 / FP4 checkpoints in the layout transformers + bitsandbytes save and load (spec nf4.md §5).

Per quantised Linear ``X``: ``X.weight`` (uint8 ``((n+1)//2, 1)`` packed codes), ``X.weight.absmax``
(float32, or uint8 nested codes with double quantisation), ``X.weight.quant_map`` (the 16 values),
``X.weight.nested_absmax`` + ``X.weight.nested_quant_map`` (double quantisation only) and
``X.weight.quant_state.bitsandbytes__nf4`` (UTF-8 bytes of ``json.dumps`` of the small fields, in
bitsandbytes' key order). ``config.json`` carries ``quantization_config``, whose ``llm_int8_skip_modules``
names the Linear layers left in float. minilora writes the packed codes as uint8; it reads any storage dtype
(transformers' ``bnb_4bit_quant_storage``, e.g. bfloat16) holding the same bytes.

This module knows those key strings and the JSON; the numbers come from ``minilora.nf4``. Not here:
the streaming pipelines (``minilora.quantize``).
"""
import json
import math
import re

import numpy as np

from minilora import nf4
from minilora.dtypes import dtype_from_name
from minilora.errors import InputError
from minilora.tables import ALLOWED_BLOCKSIZES, DYNAMIC_MAP, FP4, NESTED_BLOCKSIZE, NF4

STATE_PREFIX = "quant_state.bitsandbytes__"
AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                f".{STATE_PREFIX}nf4", f".{STATE_PREFIX}fp4")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
TABLES = {"nf4": NF4, "fp4": FP4}


def state_key(weight_key, quant_type="nf4"):
    return f"{weight_key}.{STATE_PREFIX}{quant_type}"


def is_aux_key(key):
    """True for the side tensors of a quantised weight (absmax, maps, packed quant state)."""
    return key.endswith(AUX_SUFFIXES)


def quantized_weights(keys):
    """``{weight key: quant_type}`` for every weight that has a packed quant state in ``keys``."""
    out = {}
    for key in keys:
        for qt in TABLES:
            suffix = f".{STATE_PREFIX}{qt}"
            if key.endswith(suffix):
                out[key[: -len(suffix)]] = qt
    return out


def state_tensors(key, state, storage=np.uint8):
    """``[(name, array)]`` of one quantised weight in bitsandbytes' layout and key order; ``storage``: the
    dtype the packed bytes are stored as (bitsandbytes' ``quant_storage``; same bytes, ``(-1, 1)``)."""
    fields = {"quant_type": state.quant_type, "blocksize": state.blocksize,
              "dtype": np.dtype(state.dtype).name, "shape": [int(d) for d in state.shape]}
    out = [(key, state.packed.reshape(-1).view(storage).reshape(-1, 1))]
    if state.nested_codes is None:
        out += [(f"{key}.absmax", state.absmax), (f"{key}.quant_map", np.array(TABLES[state.quant_type]))]
    else:
        out += [(f"{key}.absmax", state.nested_codes),
                (f"{key}.quant_map", np.array(TABLES[state.quant_type])),
                (f"{key}.nested_absmax", state.nested_absmax),
                (f"{key}.nested_quant_map", np.array(DYNAMIC_MAP))]
        fields.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32",
                      nested_offset=float(state.offset))
    packed_json = np.frombuffer(json.dumps(fields).encode("utf-8"), dtype=np.uint8).copy()
    out.append((state_key(key, state.quant_type), packed_json))
    return out


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_parts(ckpt, quantized):
    """Refuse a quantised weight whose packed codes, absmax or quant_map tensor is missing (before any
    output is written: a weight without its codes would otherwise just vanish from a conversion)."""
    for key in quantized:
        for part in (key, f"{key}.absmax", f"{key}.quant_map"):
            if part not in ckpt:
                what = "packed weight tensor" if part == key else "tensor"
                raise InputError(f"has a bitsandbytes quant state but its {what} {part} is missing", ckpt.path, key)


def read_state(ckpt, key):
    """The ``nf4.QuantState`` of quantised weight ``key`` in checkpoint ``ckpt``, fully validated."""
    qt = quantized_weights([k for k in ckpt.keys() if k.startswith(key + ".")]).get(key)
    if qt is None:
        raise InputError("has no bitsandbytes quant state", ckpt.path, key)
    check_parts(ckpt, [key])
    raw = ckpt.get(state_key(key, qt))
    if raw.dtype != np.uint8:
        raise InputError(f"quant state tensor is {raw.dtype}, not uint8 bytes of JSON", ckpt.path, key)
    try:
        fields = json.loads(bytes(raw.reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"quant state is not JSON ({e})", ckpt.path, key) from None

    def bad(message):
        return InputError(f"quant state {message}", ckpt.path, key)

    if not isinstance(fields, dict):
        raise bad(f"is JSON but not an object: {type(fields).__name__}")
    if fields.get("quant_type") != qt:
        raise bad(f"says quant_type {fields.get('quant_type')!r} under a {qt} key")
    blocksize, shape, dtype = fields.get("blocksize"), fields.get("shape"), fields.get("dtype")
    if not _is_int(blocksize) or blocksize not in ALLOWED_BLOCKSIZES:
        raise bad(f"blocksize {blocksize!r} is not one of {ALLOWED_BLOCKSIZES}")
    if dtype not in DTYPE_NAMES:
        raise bad(f"dtype {dtype!r} is not one of {DTYPE_NAMES}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of sizes (non-negative integers)")
    n = math.prod(shape)  # exact: a corrupt huge shape gives a size mismatch below, not an overflow
    nblocks = -(-n // blocksize)
    packed = ckpt.get(key)
    if packed.nbytes != (n + 1) // 2:
        raise bad(f"shape {shape} needs {(n + 1) // 2} packed bytes, the tensor has {packed.nbytes} "
                  f"({packed.size} {packed.dtype})")
    packed = np.ascontiguousarray(packed).reshape(-1).view(np.uint8).reshape(-1, 1)  # any quant_storage dtype
    absmax = ckpt.get(f"{key}.absmax")
    if absmax.shape != (nblocks,):
        raise bad(f"needs {nblocks} absmax values (blocksize {blocksize}), the tensor has {absmax.shape}")
    qmap = ckpt.get(f"{key}.quant_map")
    if qmap.dtype != np.float32 or qmap.view(np.uint32).tolist() != TABLES[qt].view(np.uint32).tolist():
        raise bad(f"quant_map is not the standard {qt} table (custom tables are not supported)")
    out_dtype = dtype_from_name(dtype)
    double_quant = any(f in fields for f in ("nested_blocksize", "nested_dtype", "nested_offset"))
    if not double_quant and f"{key}.nested_absmax" not in ckpt:
        if absmax.dtype != np.float32:
            raise bad(f"absmax is {absmax.dtype} without double quantisation")
        return nf4.QuantState(packed, absmax, tuple(shape), out_dtype, blocksize, qt)
    for part in ("nested_absmax", "nested_quant_map"):
        if f"{key}.{part}" not in ckpt:
            raise bad(f"has double quantisation fields but the tensor {key}.{part} is missing")
    nested = ckpt.get(f"{key}.nested_absmax")
    nested_map = ckpt.get(f"{key}.nested_quant_map")
    if absmax.dtype != np.uint8 or nested.dtype != np.float32:
        raise bad("double quantisation needs uint8 absmax codes and float32 nested_absmax")
    nested_blocksize = fields.get("nested_blocksize")
    if not _is_int(nested_blocksize) or nested_blocksize != NESTED_BLOCKSIZE \
            or nested.shape != (-(-nblocks // NESTED_BLOCKSIZE),):
        raise bad(f"nested blocks do not fit: nested_blocksize {nested_blocksize!r}, "
                  f"nested_absmax {nested.shape} for {nblocks} blocks")
    if fields.get("nested_dtype", "float32") != "float32":  # (bitsandbytes < 0.41 did not write it)
        raise bad(f"nested_dtype {fields.get('nested_dtype')!r} is not 'float32' (bitsandbytes' only one)")
    if nested_map.dtype != np.float32 or nested_map.view(np.uint32).tolist() != DYNAMIC_MAP.view(np.uint32).tolist():
        raise bad("nested_quant_map is not bitsandbytes' dynamic map")
    offset = fields.get("nested_offset")
    if not isinstance(offset, (int, float)) or isinstance(offset, bool):
        raise bad(f"nested_offset {offset!r} is not a number")
    # A NaN offset is what bitsandbytes writes for a weight holding NaN (the mean of a NaN absmax): accepted.
    return nf4.QuantState(packed, None, tuple(shape), out_dtype, blocksize, qt,
                          nested_codes=absmax, nested_absmax=nested, offset=np.float32(offset))


def quantization_config(double_quant, compute_dtype, quant_type="nf4", skip_modules=None):
    """The ``quantization_config`` transformers reads from ``config.json``; ``skip_modules``: the
    ``llm_int8_skip_modules`` list (``skip_list``), or None for transformers' default."""
    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
              "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": bool(double_quant),
              "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8"}
    if skip_modules is not None:
        config["llm_int8_skip_modules"] = list(skip_modules)
    return config


# transformers 5 (quantizers_utils.should_convert_module) skips a module when an entry matches its name as a
# regex from the start up to a module boundary ("layer.1" skips "layer.1.attn", not "layer.11.attn"), or
# as a plain string suffix.
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def skipped_by(entry, module):
    """True if transformers skips converting ``module`` for the ``llm_int8_skip_modules`` entry."""
    return bool(re.match(rf"(?:{entry}){_BOUNDARY}", module)) or module.endswith(entry)


def skip_list(kept, quantized):
    """``llm_int8_skip_modules``: the modules ``kept`` in float, so that transformers converts exactly the
    ``quantized`` modules to Linear4bit. A name is written as it is (so a model whose module names carry
    an extra prefix, e.g. ``bert.pooler.dense``, still matches by suffix), unless it would also skip a
    quantised module or holds a regex character: then as an escaped regex anchored at the end."""
    out = []
    for name in sorted(set(kept)):
        if not re.fullmatch(r"[\w.-]+", name) or any(skipped_by(name, q) for q in quantized):
            name = re.escape(name) + "$"
        out.append(name)
    return out
