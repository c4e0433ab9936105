"""NF4 block quantisation and double quantisation in torch, bit-exact with ``minilora.nf4`` /
``minilora.double_quant`` on CPU and on CUDA.

``code[j] = #{ i : MID[i] < clamp(x[j] / absmax[j // blocksize], -1, 1) }``, ``x̂[j] = NF4[code[j]] * absmax``
(QLoRA, Dettmers et al. 2023, §3; ``shared/spec/nf4.md`` §2-§4). Each function below transcribes the
reference function of the same name line by line: every element-wise step is one IEEE float32 operation
(multiply, true division, clamp, compare), which CPUs and GPUs round identically, and no step is a
reduction except ``max``, which is exact. The tables come from ``minilora.tables``, never re-typed.

Not here: FP4 (``minilora.nf4.quantize_fp4``), bitsandbytes' CUDA decision bounds (the reference's
CPU bounds are used on every device), the exact mean of the absmax values (computed on the CPU by
``minilora.native``'s exact integer sum; pass ``offset`` to skip it), ``torch.compile``; the CUDA
dequantiser kernel (``nf4_triton.py``, checked against these functions).
"""
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from minilora import double_quant as ref_dq
from minilora import native
from minilora import nf4 as ref
from minilora.tables import DEFAULT_BLOCKSIZE, DYNAMIC_MAP, NESTED_BLOCKSIZE, NF4, NF4_MID, TINY, ZERO_CODE

IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
                torch.bfloat16: np.dtype(ref.ml_dtypes.bfloat16)}
TORCH_DTYPES = {v: k for k, v in NUMPY_DTYPES.items()}


def numpy_to_torch(arr):
    """A NumPy array -> a CPU torch tensor (sharing its memory when it is contiguous); bfloat16 (ml_dtypes),
    which ``torch.from_numpy`` does not know, goes through its bit pattern."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype == NUMPY_DTYPES[torch.bfloat16]:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


@lru_cache(maxsize=None)
def _table(name, device):
    """A reference table as a float32 tensor on ``device`` (cached; the values come from minilora.tables)."""
    values = {"NF4": NF4, "NF4_MID": NF4_MID, "DYN": DYNAMIC_MAP}[name]
    return torch.from_numpy(np.array(values)).to(device)  # (16,) / (15,) / (256,)


def _tiny(device):
    return torch.tensor(float(TINY), dtype=torch.float32, device=device)


def _flat_float32(x, name="x"):
    """Transcribes ``minilora.nf4._flat_float32``: the exact float32 image of ``x``, flattened."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in IN_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); nothing to quantise")
    return x.detach().to(torch.float32).reshape(-1)  # (n,) exact for every input dtype


def _out_dtype(dtype):
    if dtype not in IN_DTYPES:
        raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    return dtype


# ---------------------------------------------------------------- codes and nibbles
def nf4_codes(v):
    """Transcribes ``minilora.nf4.nf4_codes``: #{i : NF4_MID[i] < v} (ties -> lower code), NaN -> 15."""
    if v.dtype != torch.float32:
        raise TypeError(f"v must be float32, got dtype {v.dtype}")
    below = torch.searchsorted(_table("NF4_MID", v.device), v, right=False)  # count of bounds < v
    return torch.where(torch.isnan(v), 15, below).to(torch.uint8)


def pack_nibbles(codes, pad=ZERO_CODE):
    """Transcribes ``minilora.nf4.pack_nibbles``: element 2k in the HIGH nibble, 2k+1 in the low one.

    codes uint8 (n,) -> uint8 ((n+1)//2, 1).
    """
    if codes.dtype != torch.uint8 or codes.dim() != 1:
        raise TypeError(f"codes must be a 1-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), pad)])  # (n+1,)
    pairs = codes.reshape(-1, 2)  # ((n+1)//2, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).reshape(-1, 1)  # ((n+1)//2, 1)


def unpack_nibbles(packed, n):
    """Transcribes ``minilora.nf4.unpack_nibbles``: uint8 ((n+1)//2, 1) -> uint8 codes (n,)."""
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be {(n + 1) // 2} uint8 bytes for n={n}, "
                         f"got {packed.numel()} {packed.dtype}")
    flat = packed.reshape(-1)  # ((n+1)//2,)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]  # (n,)


# ---------------------------------------------------------------- quantise / dequantise
def _normalise(xf, blocksize):
    """Transcribes ``minilora.nf4._normalise``. xf float32 (n,) -> v (n,), absmax (nblocks,)."""
    n = xf.numel()
    full = n - n % blocksize
    tiny = _tiny(xf.device)
    blocks = xf[:full].reshape(-1, blocksize)  # (n // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=1)  # (n // blocksize,) amax propagates NaN, like numpy's max
    recip = 1.0 / torch.maximum(absmax, tiny)  # (n // blocksize,) maximum propagates NaN
    v_full = torch.clamp(blocks * recip[:, None], -1.0, 1.0).reshape(-1)  # (full,) multiply by reciprocal
    if full == n:
        return v_full, absmax
    am = torch.maximum(xf[full:].abs().amax(), tiny)  # last partial block: stored CLAMPED
    v_tail = torch.clamp(xf[full:] / am, -1.0, 1.0)  # (n - full,) TRUE division here
    return torch.cat([v_full, v_tail]), torch.cat([absmax, am.reshape(1)])  # (n,), (nblocks,)


def quantize_nf4(x, blocksize=DEFAULT_BLOCKSIZE):
    """Transcribes ``minilora.nf4.quantize_nf4``: x (any shape) -> packed uint8 ((n+1)//2, 1), absmax (nblocks,)."""
    blocksize = ref.check_blocksize(blocksize)
    v, absmax = _normalise(_flat_float32(x), blocksize)  # (n,), (nblocks,)
    pad = int(nf4_codes(torch.zeros(1, device=v.device))[0])  # bitsandbytes pads the VALUE 0.0
    return pack_nibbles(nf4_codes(v), pad), absmax  # ((n+1)//2, 1), (nblocks,)


def cast_float32(a, dtype):
    """Transcribes ``minilora.nf4.cast_float32``: float32 -> dtype, round to nearest even.

    torch's float32 -> bfloat16 / float16 conversions round to nearest even, which is the reference's bit
    formula for every non-NaN value (the tests check it bit for bit); a NaN stays a NaN.
    """
    return a if dtype == torch.float32 else a.to(dtype)


def check_state(packed, absmax, shape, blocksize):
    """``minilora.nf4.check_state`` for tensors: ``(shape, n, blocksize)``, the same exception types and
    messages (the sizes are checked by the reference on stand-ins of the tensors' shapes and dtypes)."""
    for name, t, dtype in (("packed", packed, torch.uint8), ("absmax", absmax, torch.float32)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{name} must be a {dtype} tensor, got {got}")
    return ref.check_state(np.broadcast_to(np.uint8(0), tuple(packed.shape)),  # no copy: zero strides
                           np.broadcast_to(np.float32(0), tuple(absmax.shape)), shape, blocksize)


def dequantize_nf4(packed, absmax, shape, dtype=torch.float32, blocksize=DEFAULT_BLOCKSIZE):
    """Transcribes ``minilora.nf4.dequantize_nf4``: out[j] = cast(dtype, float32(NF4[code[j]] * absmax[j // bs]))."""
    shape, n, blocksize = check_state(packed, absmax, shape, blocksize)
    values = _table("NF4", packed.device)[unpack_nibbles(packed, n).long()]  # (n,) float32
    scale = absmax.reshape(-1).repeat_interleave(blocksize)[:n]  # (n,)
    return cast_float32(values * scale, _out_dtype(dtype)).reshape(shape)  # shape, one float32 rounding


# ---------------------------------------------------------------- double quantisation
@lru_cache(maxsize=None)
def _nested_lut(device):
    """Transcribes ``minilora.double_quant._nested_lut`` on ``device``: uint8 (65536,)."""
    dyn = _table("DYN", device)
    mids = 0.5 * (dyn[:-1] + dyn[1:])  # (255,) float32
    i = torch.arange(65536, dtype=torch.float32, device=device)  # (65536,) exact integers
    points = -1.0 + (2.0 * i) / 65535.0  # (65536,) float32
    return torch.searchsorted(mids, points, right=False).to(torch.uint8)  # (65536,)


def _lut_index(t):
    """Transcribes ``minilora.double_quant._lut_index``: trunc(fmaf((t+1)*0.5, 65535, 0.5)), NaN -> 0.
    The float64 multiply-add is exact (see the reference), so its one cast to float32 is fmaf's rounding."""
    u = (t + 1.0) * 0.5  # float32
    fused = (u.to(torch.float64) * 65535.0 + 0.5).to(torch.float32)  # one rounding == fmaf
    nan = torch.isnan(fused)
    return torch.where(nan, 0.0, torch.trunc(torch.where(nan, 0.0, fused))).long()


def double_quantize(absmax, offset=None):
    """Transcribes ``minilora.double_quant.double_quantize``: absmax float32 (nblocks,) ->
    codes uint8 (nblocks,), nested_absmax float32 (ceil(nblocks/256),), offset (np.float32).

    ``offset=None`` asks the reference for the correctly rounded exact mean (rational arithmetic, on the CPU).
    """
    if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.dim() != 1:
        raise TypeError(f"absmax must be a 1-D float32 tensor, got {getattr(absmax, 'dtype', type(absmax))}")
    if offset is None:  # the C exact sum: the reference's value (tests/test_native.py), ~20× faster
        offset = native.exact_mean_float32(absmax.detach().cpu().numpy())
    offset = ref_dq.as_f32_scalar(offset, "offset")
    n = absmax.numel()
    nn_ = -(-n // NESTED_BLOCKSIZE)
    c = torch.full((nn_ * NESTED_BLOCKSIZE,), float("nan"), device=absmax.device)  # (nn*256,) NaN pad
    c[:n] = absmax - float(offset)  # float32 (a Python float holds the float32 offset exactly)
    c = c.reshape(nn_, NESTED_BLOCKSIZE)  # (nn, 256)
    abs_c = c.abs()
    abs_c = torch.where(torch.isnan(abs_c), 0.0, abs_c)  # NaN does not count in the nested absmax
    a2 = abs_c.amax(dim=1)  # (nn,)
    recip = 1.0 / a2  # (nn,) IEEE division
    t = torch.clamp(c * recip[:, None], -1.0, 1.0)  # (nn, 256) NaN passes through
    codes = _nested_lut(absmax.device)[_lut_index(t)]  # (nn, 256)
    codes[a2 == 0] = 0  # an all-zero (or all-NaN) nested block stores code 0
    return codes.reshape(-1)[:n].clone(), a2, offset  # (n,), (nn,), np.float32


def dequantize_absmax(codes, nested_absmax, offset):
    """Transcribes ``minilora.double_quant.dequantize_absmax``: float32(float32(DYN[q] * a2[b // 256]) + offset).
    Two separate torch ops, so two roundings and no fused multiply-add, on every device."""
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]  # (nblocks,)
    return (_table("DYN", codes.device)[codes.long()] * scale) + float(offset)  # (nblocks,) float32


# ---------------------------------------------------------------- a bundle for callers
@dataclass(frozen=True)
class QuantState:
    """``minilora.nf4.QuantState`` with torch tensors (NF4 only). With double quantisation ``absmax`` is
    None and ``nested_codes`` / ``nested_absmax`` / ``offset`` (np.float32) hold the statistics."""
    packed: torch.Tensor
    absmax: Optional[torch.Tensor]
    shape: tuple
    dtype: torch.dtype
    blocksize: int = DEFAULT_BLOCKSIZE
    quant_type: str = "nf4"
    nested_codes: Optional[torch.Tensor] = None
    nested_absmax: Optional[torch.Tensor] = None
    offset: Optional[np.float32] = None

    def block_absmax(self):
        """Transcribes ``minilora.nf4.QuantState.block_absmax``: float32 (nblocks,)."""
        if self.nested_codes is None:
            return self.absmax
        return dequantize_absmax(self.nested_codes, self.nested_absmax, self.offset)

    def to_numpy(self):
        """The reference ``minilora.nf4.QuantState`` holding the same bytes."""
        arr = {k: None if getattr(self, k) is None else getattr(self, k).cpu().numpy()
               for k in ("packed", "absmax", "nested_codes", "nested_absmax")}
        return ref.QuantState(shape=self.shape, dtype=NUMPY_DTYPES[self.dtype], blocksize=self.blocksize,
                              quant_type=self.quant_type, offset=self.offset, **arr)

    @classmethod
    def from_numpy(cls, state, device=None):
        """From a reference ``minilora.nf4.QuantState`` (e.g. ``minilora.nf4_checkpoint.read_state``)."""
        if state.quant_type != "nf4":
            raise ValueError(f"the torch backend supports NF4 only, got quant_type {state.quant_type!r}")
        tensor = {k: None if getattr(state, k) is None else torch.from_numpy(np.array(getattr(state, k))).to(device)
                  for k in ("packed", "absmax", "nested_codes", "nested_absmax")}
        return cls(shape=tuple(state.shape), dtype=TORCH_DTYPES[np.dtype(state.dtype)],
                   blocksize=state.blocksize, offset=state.offset, **tensor)


def quantize(x, blocksize=DEFAULT_BLOCKSIZE, double_quant=False, quant_type="nf4", offset=None):
    """Transcribes ``minilora.nf4.quantize`` (NF4 only): x -> ``QuantState`` on x's device."""
    if quant_type != "nf4":
        raise ValueError(f"the torch backend supports quant_type 'nf4' only, got {quant_type!r}")
    packed, absmax = quantize_nf4(x, blocksize)
    state = dict(packed=packed, absmax=absmax, shape=tuple(x.shape), dtype=x.dtype, blocksize=blocksize)
    if double_quant:
        codes, nested_absmax, off = double_quantize(absmax, offset)
        state.update(absmax=None, nested_codes=codes, nested_absmax=nested_absmax, offset=off)
    return QuantState(**state)


def dequantize(state, dtype=None):
    """Transcribes ``minilora.nf4.dequantize``: the original shape, in ``dtype`` (default: the original)."""
    return dequantize_nf4(state.packed, state.block_absmax(), state.shape,
                          state.dtype if dtype is None else dtype, state.blocksize)
