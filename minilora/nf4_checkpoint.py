"""NF4 / FP4 checkpoints in the layout transformers + bitsandbytes save and load (spec nf4.md §5).

Per quantised Linear ``X``: ``X.weight`` (uint8 ``((n+1)//2, 1)`` packed codes), ``X.weight.absmax``
(float32, or uint8 nested codes with double quantisation), ``X.weight.quant_map`` (the 16 values),
``X.weight.nested_absmax`` + ``X.weight.nested_quant_map`` (double quantisation only) and
``X.weight.quant_state.bitsandbytes__nf4`` (UTF-8 bytes of ``json.dumps`` of the small fields, in
bitsandbytes' key order). ``config.json`` carries ``quantization_config``.

This module knows those key strings and the JSON; the numbers come from ``minilora.nf4``. Not here:
the streaming pipelines (``minilora.quantize``).
"""
import json

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


def state_tensors(key, state):
    """``[(name, array)]`` of one quantised weight in bitsandbytes' layout and key order."""
    fields = {"quant_type": state.quant_type, "blocksize": state.blocksize,
              "dtype": np.dtype(state.dtype).name, "shape": [int(d) for d in state.shape]}
    out = [(key, state.packed)]
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


def read_state(ckpt, key):
    """The ``nf4.QuantState`` of quantised weight ``key`` in checkpoint ``ckpt``, fully validated."""
    qt = quantized_weights([k for k in ckpt.keys() if k.startswith(key + ".")]).get(key)
    if qt is None:
        raise InputError("has no bitsandbytes quant state", ckpt.path, key)
    raw = ckpt.get(state_key(key, qt))
    try:
        fields = json.loads(bytes(raw.astype(np.uint8).reshape(-1)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"quant state is not JSON ({e})", ckpt.path, key) from None

    def bad(message):
        return InputError(f"quant state {message}", ckpt.path, key)

    if fields.get("quant_type") != qt:
        raise bad(f"says quant_type {fields.get('quant_type')!r} under a {qt} key")
    blocksize, shape, dtype = fields.get("blocksize"), fields.get("shape"), fields.get("dtype")
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise bad(f"blocksize {blocksize!r} is not one of {ALLOWED_BLOCKSIZES}")
    if dtype not in DTYPE_NAMES:
        raise bad(f"dtype {dtype!r} is not one of {DTYPE_NAMES}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of sizes")
    n = int(np.prod(shape, dtype=np.int64))
    nblocks = -(-n // blocksize)
    packed = ckpt.get(key)
    if packed.dtype != np.uint8 or packed.size != (n + 1) // 2:
        raise bad(f"shape {shape} needs {(n + 1) // 2} packed bytes, the tensor has {packed.size} {packed.dtype}")
    absmax = ckpt.get(f"{key}.absmax")
    if absmax.shape != (nblocks,):
        raise bad(f"needs {nblocks} absmax values (blocksize {blocksize}), the tensor has {absmax.shape}")
    qmap = ckpt.get(f"{key}.quant_map")
    if qmap.dtype != np.float32 or qmap.view(np.uint32).tolist() != TABLES[qt].view(np.uint32).tolist():
        raise bad(f"quant_map is not the standard {qt} table (custom tables are not supported)")
    out_dtype = dtype_from_name(dtype)
    if "nested_absmax" not in fields and f"{key}.nested_absmax" not in ckpt:
        if absmax.dtype != np.float32:
            raise bad(f"absmax is {absmax.dtype} without double quantisation")
        return nf4.QuantState(packed.reshape(-1, 1), absmax, tuple(shape), out_dtype, blocksize, qt)
    nested = ckpt.get(f"{key}.nested_absmax")
    nested_map = ckpt.get(f"{key}.nested_quant_map")
    if absmax.dtype != np.uint8 or nested.dtype != np.float32:
        raise bad("double quantisation needs uint8 absmax codes and float32 nested_absmax")
    if fields.get("nested_blocksize") != NESTED_BLOCKSIZE or nested.shape != (-(-nblocks // NESTED_BLOCKSIZE),):
        raise bad(f"nested blocks do not fit: nested_blocksize {fields.get('nested_blocksize')}, "
                  f"nested_absmax {nested.shape} for {nblocks} blocks")
    if nested_map.view(np.uint32).tolist() != DYNAMIC_MAP.view(np.uint32).tolist():
        raise bad("nested_quant_map is not bitsandbytes' dynamic map")
    if not isinstance(fields.get("nested_offset"), (int, float)):
        raise bad("has no numeric nested_offset")
    return nf4.QuantState(packed.reshape(-1, 1), None, tuple(shape), out_dtype, blocksize, qt,
                          nested_codes=absmax, nested_absmax=nested,
                          offset=np.float32(fields["nested_offset"]))


def quantization_config(double_quant, compute_dtype, quant_type="nf4"):
    """The ``quantization_config`` transformers reads from ``config.json``."""
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": bool(double_quant),
            "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8"}
