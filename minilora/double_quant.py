"""Double quantisation of NF4 block statistics: the NumPy reference, bit-exact with bitsandbytes 0.50.2 (CPU).

The float32 absmax of every NF4 block is itself quantised to 8 bits with bitsandbytes' signed dynamic
map, in nested blocks of 256, after subtracting its mean (QLoRA, Dettmers et al. 2023, §3 "Double
Quantization"; ``shared/spec/nf4.md`` §3):

    code[b] = LUT[trunc(fmaf((clamp((absmax[b] - offset) * (1 / a2), -1, 1) + 1) / 2, 65535, 0.5))]

where ``a2`` is the max |absmax - offset| over the nested block and ``LUT`` maps each of 65536 evenly
spaced points of [-1, 1] to the number of dynamic-map midpoints below it. Dequantising is
``float32(float32(DYN[code] * a2) + offset)``.

Not here: bitsandbytes' CUDA nested quantiser (a binary search with float32 midpoints; it differs on 0.18 %
of the nested codes of a random weight, docs/nf4.md §5, tests/test_nf4_cuda_vectors.py), general 8-bit
blockwise quantisation of arbitrary tensors, and torch.mean's thread-dependent offset (pass bitsandbytes'
stored offset explicitly to reproduce its bytes).
"""
import math
from fractions import Fraction
from functools import lru_cache

import numpy as np

from minilora.tables import DYNAMIC_MAP, NESTED_BLOCKSIZE

_F = np.float32


def check_f32_vector(arr, name):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray of float32, got {type(arr).__name__}")
    if arr.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")


def as_f32_scalar(value, name):
    if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float (ideally np.float32), got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # a Python int beyond float64
        as_float = None
    with np.errstate(over="ignore"):
        out = _F(as_float) if as_float is not None else None
    if as_float is None or math.isfinite(as_float) and not np.isfinite(out):
        raise ValueError(f"{name}={value!r} is outside the float32 range")
    if np.isfinite(out) and float(out) != as_float:
        raise ValueError(f"{name}={value!r} is not exactly representable in float32; "
                         "pass the stored float32 value")
    return out


def _n_nested(nblocks):
    return -(-nblocks // NESTED_BLOCKSIZE)


def exact_mean_float32(absmax):
    """The float32 nearest (ties to even) to the exact mean of ``absmax``; NaN / inf propagate.

    Every float32 is an integer multiple of 2**-149, so the sum is an exact Python int in those
    units; only the final division rounds, and we pick the float32 nearest to the exact quotient.
    """
    check_f32_vector(absmax, "absmax")
    a64 = absmax.astype(np.float64)
    if not np.isfinite(a64).all():
        return _F(np.mean(a64))
    total = sum(int(v) for v in (a64 * 2.0**149).tolist())  # exact: integer units of 2**-149
    q = Fraction(total, absmax.size << 149)
    f = _F(float(q))  # float(q) is correctly rounded to float64; the float32 cast may round twice
    candidates = [np.nextafter(f, _F(-np.inf)), f]
    if f < np.finfo(np.float32).max:  # a mean that rounds to FLT_MAX has no finite neighbour above
        candidates.append(np.nextafter(f, _F(np.inf)))
    # nearest to the exact mean; on a tie the even bit pattern (round half to even)
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - q), int(c.view(np.uint32)) & 1))


@lru_cache(maxsize=None)
def _nested_lut():
    """LUT[i] = #{k : M_k < V_i}, M_k = 0.5f*(DYN[k]+DYN[k+1]), V_i = -1f + (2f*i)/65535f (all float32)."""
    mids = _F(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])  # (255,)
    i = np.arange(65536, dtype=np.float32)  # (65536,) exact: integers < 2**24
    points = _F(-1.0) + (_F(2.0) * i) / _F(65535.0)  # (65536,)
    lut = np.searchsorted(mids, points, side="left").astype(np.uint8)  # (65536,) count of mids < V_i
    lut.setflags(write=False)
    return lut


def _lut_index(t):
    """trunc(fmaf(u, 65535, 0.5)) with u = (t + 1) * 0.5 in float32; NaN -> 0.

    Emulating the fused multiply-add: t is float32 in [-1, 1], so t + 1 (float32) is a multiple of 2**-24
    (for t < -0.5 the sum is exact with t's own ulp 2**-24; otherwise the result is >= 0.5 whose ulp is
    >= 2**-24), and u = k * 2**-25 with integer k <= 2**25. Then u*65535 + 0.5 = (65535k + 2**24) * 2**-25
    is an integer below 2**42 times 2**-25: both float64 operations below are exact, and the single cast
    to float32 is the one rounding of fmaf.
    """
    u = (t + _F(1.0)) * _F(0.5)  # float32, exactly as bitsandbytes
    fused = (u.astype(np.float64) * 65535.0 + 0.5).astype(np.float32)  # one rounding == fmaf
    nan = np.isnan(fused)
    return np.where(nan, 0, np.trunc(np.where(nan, 0, fused))).astype(np.int64)


def double_quantize(absmax, offset=None):
    """Quantise NF4 block absmax values to 8-bit dynamic-map codes (bitsandbytes' CPU rule, spec §3).

    Parameters
    ----------
    absmax : float32 (nblocks,)
    offset : float32 scalar or None
        None -> the correctly rounded float32 of the exact mean (``exact_mean_float32``). Pass
        bitsandbytes' stored ``nested_offset`` to reproduce its bytes exactly.

    Returns
    -------
    codes : uint8 (nblocks,)
    nested_absmax : float32 (ceil(nblocks / 256),)
    offset : np.float32
    """
    check_f32_vector(absmax, "absmax")
    if offset is None:
        offset = exact_mean_float32(absmax)
    offset = as_f32_scalar(offset, "offset")
    n = absmax.size
    nn = _n_nested(n)
    c = np.full(nn * NESTED_BLOCKSIZE, np.nan, dtype=np.float32)  # (nn*256,) NaN pad: ignored below
    with np.errstate(over="ignore", invalid="ignore"):  # IEEE results wanted: inf - inf = NaN, overflow = ±inf
        c[:n] = absmax - offset  # float32
    c = c.reshape(nn, NESTED_BLOCKSIZE)  # (nn, 256)
    abs_c = np.abs(c)
    abs_c[np.isnan(abs_c)] = 0  # NaN does not count in the nested absmax
    a2 = abs_c.max(axis=1)  # (nn,)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        recip = _F(1.0) / a2  # (nn,) IEEE division, as bitsandbytes (1 / subnormal overflows to inf)
        t = np.clip(c * recip[:, None], _F(-1.0), _F(1.0))  # (nn, 256) NaN passes through
    codes = _nested_lut()[_lut_index(t)]  # (nn, 256)
    codes[a2 == 0] = 0  # an all-zero (or all-NaN) nested block stores code 0 everywhere
    return codes.reshape(-1)[:n].copy(), a2.astype(np.float32), offset  # (n,), (nn,), scalar


def dequantize_absmax(codes, nested_absmax, offset):
    """absmax[b] = float32(float32(DYN[codes[b]] * nested_absmax[b // 256]) + offset): two roundings, no FMA.

    codes uint8 (nblocks,), nested_absmax float32 (ceil(nblocks/256),), offset float32 -> float32 (nblocks,).
    """
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        got = codes.dtype if isinstance(codes, np.ndarray) else type(codes).__name__
        raise TypeError(f"codes must be a uint8 ndarray, got {got}")
    if codes.ndim != 1 or codes.size == 0:
        raise ValueError(f"codes must be a non-empty 1-D array, got shape {codes.shape}")
    check_f32_vector(nested_absmax, "nested_absmax")
    if nested_absmax.size != _n_nested(codes.size):
        raise ValueError(
            f"nested_absmax has {nested_absmax.size} entries; {codes.size} codes need "
            f"ceil({codes.size}/{NESTED_BLOCKSIZE}) = {_n_nested(codes.size)}"
        )
    scale = np.repeat(nested_absmax, NESTED_BLOCKSIZE)[: codes.size]  # (nblocks,)
    with np.errstate(over="ignore", invalid="ignore"):  # IEEE results wanted (special absmax values)
        return (DYNAMIC_MAP[codes] * scale) + as_f32_scalar(offset, "offset")  # float32 product, then float32 sum
