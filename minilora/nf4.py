"""NF4 and FP4 block quantisation: the NumPy reference, bit-exact with bitsandbytes 0.50.2 on CPU.

Each block of ``blocksize`` consecutive flat elements is scaled by its absmax and every element is
rounded to one of 16 table values (QLoRA, Dettmers et al. 2023, §3 "4-bit NormalFloat"):

    code[j] = #{ i : MID[i] < clamp(x[j] / absmax[j // blocksize], -1, 1) },   x̂[j] = NF4[code[j]] * absmax

with the exact float32 steps, tie and NaN rules, padding and nibble order of ``shared/spec/nf4.md``
§2, §4 and §5b. Double quantisation of the absmax values lives in ``minilora.double_quant``;
``quantize(..., double_quant=True)`` bundles both in a ``QuantState``.

Not here: bitsandbytes' CUDA decision bounds (``NF4_MID_CUDA``, four values differ by one ulp; see
docs/nf4.md), torchao's ``to_nf4`` variant, the on-disk checkpoint layout (``minilora.checkpoint``), and
any fast path (``minilora.native``). Inputs are never modified.
"""
import math
from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

from minilora.double_quant import dequantize_absmax, double_quantize
from minilora.tables import (
    ALLOWED_BLOCKSIZES, DEFAULT_BLOCKSIZE, FP4, NF4, NF4_MID, TINY, ZERO_CODE,
)

_F = np.float32
_IN_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

# FP4 is not sorted: bitsandbytes sorts it (stable, so +0 at code 0 precedes +0 at code 8), rounds to
# the sorted order with float32 midpoints, then maps the sorted index back to the code.
_FP4_ORDER = np.argsort(FP4, kind="stable").astype(np.uint8)  # (16,) sorted index -> code
_FP4_MID = (FP4[_FP4_ORDER[:-1]] + FP4[_FP4_ORDER[1:]]) / _F(2)  # (15,) float32


# ---------------------------------------------------------------- validation at the boundary
def check_blocksize(blocksize):
    """The blocksize as an int, or TypeError / ValueError naming the allowed ones (shared by every backend)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if int(blocksize) not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"blocksize={blocksize} is not allowed; use one of {ALLOWED_BLOCKSIZES}")
    return int(blocksize)


def _flat_float32(x, name="x"):
    """float32/float16/bfloat16 ndarray -> its exact float32 image, flattened row-major (a copy)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(x).__name__}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); nothing to quantise")
    return x.astype(np.float32).reshape(-1)  # (n,) every input dtype converts to float32 exactly


def _check_packed(packed, n, what):
    """packed must be a uint8 ndarray of (n+1)//2 bytes; ``what`` names n in the message."""
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        got = packed.dtype if isinstance(packed, np.ndarray) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 ndarray, got {got}")
    if packed.size != (n + 1) // 2:
        raise ValueError(f"packed has {packed.size} bytes (shape {packed.shape}); "
                         f"{what} needs (n+1)//2 = {(n + 1) // 2}")


def check_state(packed, absmax, shape, blocksize):
    """Validate a packed tensor against its shape and blocksize; ``(shape, n, blocksize)``. Shared by every
    backend, so a bad argument raises the same exception with the same message everywhere."""
    blocksize = check_blocksize(blocksize)
    try:
        dims = list(shape)
    except TypeError:
        dims = None
    if dims is None or isinstance(shape, (str, bytes)) or not all(
            isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
        raise TypeError(f"shape must be a tuple of ints, got {shape!r}")
    shape = tuple(int(d) for d in dims)
    n = math.prod(shape)  # exact: a huge shape cannot wrap around
    if n >= 2**62:
        raise ValueError(f"shape {shape} has {n} elements, too many for one tensor")
    if any(d < 0 for d in shape) or n == 0:
        raise ValueError(f"shape {shape} must have positive size")
    _check_packed(packed, n, f"shape {shape}")
    if not isinstance(absmax, np.ndarray) or absmax.dtype != np.float32:
        got = absmax.dtype if isinstance(absmax, np.ndarray) else type(absmax).__name__
        raise TypeError(f"absmax must be a float32 ndarray, got {got}")
    nblocks = -(-n // blocksize)
    if absmax.size != nblocks:
        raise ValueError(f"absmax has {absmax.size} entries (shape {absmax.shape}); n={n} with "
                         f"blocksize={blocksize} needs ceil(n/blocksize) = {nblocks}")
    return shape, n, blocksize


def _out_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in _IN_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dt}")
    return dt


# ---------------------------------------------------------------- codes and nibbles
def nf4_codes(v):
    """uint8 NF4 codes of normalised float32 values: #{i : NF4_MID[i] < v} (ties -> lower code), NaN -> 15."""
    v = np.asarray(v)
    if v.dtype != np.float32:
        raise TypeError(f"v must be float32, got dtype {v.dtype}")
    below = np.searchsorted(NF4_MID, v, side="left")  # count of bounds strictly below v
    return np.where(np.isnan(v), 15, below).astype(np.uint8)


def fp4_codes(v):
    """uint8 FP4 codes of normalised float32 values (bitsandbytes CPU rule, spec §5b); NaN -> code 3 (+1.0)."""
    v = np.asarray(v)
    if v.dtype != np.float32:
        raise TypeError(f"v must be float32, got dtype {v.dtype}")
    rank = np.searchsorted(_FP4_MID, v, side="left")  # index into the sorted table
    return _FP4_ORDER[np.where(np.isnan(v), 15, rank)]  # torch.bucketize puts NaN after every bound


def pack_nibbles(codes, pad=ZERO_CODE):
    """Pack 4-bit codes two per byte: element 2k in the HIGH nibble, 2k+1 in the low one; odd n pads ``pad``.

    codes uint8 (n,) -> uint8 ((n+1)//2, 1).
    """
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        got = codes.dtype if isinstance(codes, np.ndarray) else type(codes).__name__
        raise TypeError(f"codes must be a uint8 ndarray, got {got}")
    if codes.ndim != 1:
        raise ValueError(f"codes must be 1-D, got shape {codes.shape}")
    if codes.size and codes.max() > 15:
        raise ValueError(f"codes must be 4-bit (0..15), got max {codes.max()}")
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad))  # (n+1,)
    pairs = codes.reshape(-1, 2)  # ((n+1)//2, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).astype(np.uint8).reshape(-1, 1)  # ((n+1)//2, 1)


def unpack_nibbles(packed, n):
    """Inverse of ``pack_nibbles``: uint8 ((n+1)//2, 1) (any shape of that size) -> uint8 codes (n,)."""
    _check_packed(packed, n, f"n={n}")
    flat = packed.reshape(-1)  # ((n+1)//2,)
    return np.stack([flat >> 4, flat & 0xF], axis=1).reshape(-1)[:n]  # (n,)


# ---------------------------------------------------------------- quantise / dequantise
def _normalise(xf, blocksize):
    """Scale each block into [-1, 1] exactly as bitsandbytes' CPU quantize_4bit (spec §2).

    xf float32 (n,) -> v float32 (n,), absmax float32 (ceil(n/blocksize),).
    """
    n = xf.size
    full = n - n % blocksize
    blocks = xf[:full].reshape(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = np.abs(blocks).max(axis=1)  # (n // blocksize,) NaN propagates; stored unclamped
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        recip = _F(1.0) / np.maximum(absmax, TINY)  # (n // blocksize,)
        v_full = np.clip(blocks * recip[:, None], _F(-1), _F(1)).reshape(-1)  # (full,) multiply by reciprocal
        if full == n:
            return v_full, absmax
        am = np.maximum(np.abs(xf[full:]).max(), TINY)  # last partial block: stored CLAMPED
        v_tail = np.clip(xf[full:] / am, _F(-1), _F(1))  # (n - full,) TRUE division here
    return np.concatenate([v_full, v_tail]), np.append(absmax, am).astype(np.float32)  # (n,), (nblocks,)


def _quantize_4bit(x, blocksize, to_codes):
    blocksize = check_blocksize(blocksize)
    v, absmax = _normalise(_flat_float32(x), blocksize)  # (n,), (nblocks,)
    pad = to_codes(np.zeros(1, np.float32))[0]  # bitsandbytes pads the normalised VALUE 0.0
    return pack_nibbles(to_codes(v), pad), absmax  # ((n+1)//2, 1), (nblocks,)


def _dequantize_4bit(table, packed, absmax, shape, dtype, blocksize):
    shape, n, blocksize = check_state(packed, absmax, shape, blocksize)
    dtype = _out_dtype(dtype)
    values = table[unpack_nibbles(packed, n)]  # (n,) float32
    scale = np.repeat(absmax.reshape(-1), blocksize)[:n]  # (n,)
    with np.errstate(invalid="ignore"):  # 0 * inf = NaN, as in bitsandbytes
        out = values * scale  # (n,) one float32 rounding
    return cast_float32(out, dtype).reshape(shape)  # shape


def cast_float32(a, dtype):
    """Round float32 -> dtype to nearest even; NaN stays NaN (its payload is not part of the contract).

    bfloat16 uses bitsandbytes' bit formula (spec §4) for every non-NaN value. For a NaN whose bits are
    >= 0xFFFF8000 that formula wraps around to +-0.0 (a bitsandbytes bug, see docs/nf4.md), so NaNs are
    truncated instead, with the quiet bit set.
    """
    dtype = _out_dtype(dtype)
    if dtype == np.float32:
        return a
    with np.errstate(over="ignore"):
        if dtype == np.float16:
            return a.astype(np.float16)  # numpy's float32 -> float16 cast rounds to nearest even
    bits = a.view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(np.isnan(a), quiet_nan, rounded).astype(np.uint16).view(ml_dtypes.bfloat16)


def quantize_nf4(x, blocksize=DEFAULT_BLOCKSIZE):
    """NF4-quantise ``x`` (float32/float16/bfloat16, any shape).

    Returns packed uint8 ((n+1)//2, 1) and absmax float32 (ceil(n/blocksize),).
    """
    return _quantize_4bit(x, blocksize, nf4_codes)


def dequantize_nf4(packed, absmax, shape, dtype=np.float32, blocksize=DEFAULT_BLOCKSIZE):
    """out[j] = cast(dtype, float32(NF4[code[j]] * absmax[j // blocksize])), reshaped to ``shape``."""
    return _dequantize_4bit(NF4, packed, absmax, shape, dtype, blocksize)


def quantize_fp4(x, blocksize=DEFAULT_BLOCKSIZE):
    """bitsandbytes "fp4" on CPU: the NF4 scaling rules with the FP4 table; odd n pads code 0 (FP4's +0.0)."""
    return _quantize_4bit(x, blocksize, fp4_codes)


def dequantize_fp4(packed, absmax, shape, dtype=np.float32, blocksize=DEFAULT_BLOCKSIZE):
    """As ``dequantize_nf4`` with the FP4 table (+0.0 at code 8, as bitsandbytes' Python table)."""
    return _dequantize_4bit(FP4, packed, absmax, shape, dtype, blocksize)


def matmul_nf4(x, packed, absmax, N, K, blocksize=DEFAULT_BLOCKSIZE):
    """Reference y = x @ dequant(W).T with W (N, K) NF4, accumulated in float64.

    x float32/float16/bfloat16 (M, K) -> y float64 (M, N).
    """
    if not isinstance(x, np.ndarray) or x.dtype not in _IN_DTYPES:
        got = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"x must be a float32/float16/bfloat16 ndarray, got {got}")
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"x must be (M, K) with K={K}, got shape {x.shape}")
    w = dequantize_nf4(packed, absmax, (N, K), np.float32, blocksize)  # (N, K)
    return x.astype(np.float64) @ w.astype(np.float64).T  # (M, N)


def int16_matmul_error_bound(x, packed, absmax, N, K, blocksize=DEFAULT_BLOCKSIZE):
    """Bound on ``|native.matmul_nf4(..., mode="int16") - x @ dequant(W).T|`` (dequant in float32), float64 (M, N).

    The int16 GEMV (``csrc/nf4_gemv_i16.c``) replaces x_k by x̃_k = q_k·m/8191, q_k = round(x_k·8191/m), m the
    max |x| of x's group of 64, and NF4 by Ñ = round(NF4·2^14)·2^-14; its group sums are exact integers. Per
    weight (a = |absmax|, n = |NF4 value|, u = 2^-24, c = (1 + 2^-37)/16382):

        |x̃_k - x_k| <= c·m      (half a step; scaling x in double adds 2^-37 relative)
        |Ñ - NF4| <= 2^-15      (NF4·2^14 is exact in float32; only the rounding to an integer moves it)
        |x̃Ñ - x·NF4| <= c·m·(n + 2^-15) + |x_k|·2^-15;  the reference's float32 w = fl(NF4·a) adds u·|x_k|·a·n

    plus γ_{K/32+5}·Σ a·|x̃_k|·|Ñ_k| for its float32 steps (the scale rounded once, int32 → float32, × scale,
    FMAs / additions over at most K/32 group sums and the final lane sum; the scalar C variant, which scales
    every 32 weights, takes the most). Groups with max |x| < 2^-99 (a subnormal scale) are outside it.
    """
    _, _, blocksize = check_state(packed, absmax, (N, K), blocksize)
    ax = np.abs(np.asarray(x, dtype=np.float64).reshape(-1, K))  # (M, K)
    u = 2.0**-24
    n = np.abs(NF4.astype(np.float64))[unpack_nibbles(packed, N * K)].reshape(N, K)  # (N, K)
    a = np.repeat(np.abs(absmax.astype(np.float64)), blocksize)[: N * K].reshape(N, K)  # (N, K)
    G = -(-K // 64)
    padded = np.zeros((ax.shape[0], G * 64))  # (M, G*64)
    padded[:, :K] = ax
    cm = np.repeat(padded.reshape(-1, G, 64).max(axis=2), 64, axis=1)[:, :K] * ((1 + 2.0**-37) / 16382)  # (M, K)
    steps = K / 32 + 5
    gamma = steps * u / (1 - steps * u)
    a_n = a * (n + 2.0**-15)  # (N, K) ≥ a·|Ñ|
    return cm @ a_n.T + ax @ (a * 2.0**-15).T + u * (ax @ (a * n).T) + gamma * ((ax + cm) @ a_n.T)  # (M, N)


# ---------------------------------------------------------------- a bundle for callers
@dataclass(frozen=True)
class QuantState:
    """A quantised tensor: packed codes plus what dequantising needs (bitsandbytes' QuantState, flattened).

    With double quantisation ``absmax`` is None and ``nested_codes`` (uint8 (nblocks,)),
    ``nested_absmax`` (float32 (ceil(nblocks/256),)) and ``offset`` (np.float32) hold the statistics.
    """
    packed: np.ndarray
    absmax: Optional[np.ndarray]
    shape: tuple
    dtype: np.dtype
    blocksize: int = DEFAULT_BLOCKSIZE
    quant_type: str = "nf4"
    nested_codes: Optional[np.ndarray] = None
    nested_absmax: Optional[np.ndarray] = None
    offset: Optional[np.float32] = None

    def block_absmax(self):
        """float32 (nblocks,): the stored absmax, or the dequantised nested statistics."""
        if self.nested_codes is None:
            return self.absmax
        return dequantize_absmax(self.nested_codes, self.nested_absmax, self.offset)


_QUANT_TYPES = {"nf4": (quantize_nf4, dequantize_nf4), "fp4": (quantize_fp4, dequantize_fp4)}


def quantize(x, blocksize=DEFAULT_BLOCKSIZE, double_quant=False, quant_type="nf4", offset=None):
    """Quantise ``x`` to a ``QuantState``.

    ``double_quant`` also quantises the absmax; ``offset`` is passed to ``double_quantize``.
    """
    if quant_type not in _QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {tuple(_QUANT_TYPES)}, got {quant_type!r}")
    packed, absmax = _QUANT_TYPES[quant_type][0](x, blocksize)
    state = dict(packed=packed, absmax=absmax, shape=tuple(x.shape), dtype=x.dtype,
                 blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        codes, nested_absmax, off = double_quantize(absmax, offset)
        state.update(absmax=None, nested_codes=codes, nested_absmax=nested_absmax, offset=off)
    return QuantState(**state)


def dequantize(state, dtype=None):
    """Dequantise a ``QuantState`` to its original shape, in ``dtype`` (default: the original dtype)."""
    fn = _QUANT_TYPES[state.quant_type][1]
    return fn(state.packed, state.block_absmax(), state.shape,
              state.dtype if dtype is None else dtype, state.blocksize)
