"""Float dtypes by name, in one place: ``"bf16"`` / ``"bfloat16"`` → ``ml_dtypes.bfloat16`` etc."""
import ml_dtypes
import numpy as np

from minilora.errors import InputError

NAMES = {"float32": np.float32, "fp32": np.float32, "float16": np.float16, "fp16": np.float16,
         "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16}


def dtype_from_name(name):
    """A NumPy dtype for a float dtype name, or None for None ("keep the input's")."""
    if name is None:
        return None
    if name not in NAMES:
        raise InputError(f"dtype must be one of {', '.join(NAMES)}, got {name!r}")
    return np.dtype(NAMES[name])


def is_float(dtype):
    """True for float16 / float32 / float64 / bfloat16 / float8 (ml_dtypes reports kind 'V')."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or dtype.type in (ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2)
