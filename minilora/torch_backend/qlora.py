"""QLoRA: a frozen NF4 Linear (``NF4Linear``) and LoRA on top of it (``QLoraLinear``).

``y = x · dequant(W)ᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` (Dettmers et al. 2023, §3-§4). The weight is stored as
4-bit NF4 codes plus block absmax values (optionally double quantised: 8-bit codes per block plus one
float32 per 256 blocks), and dequantised on the fly, in the compute dtype, bit-exact with
``minilora.nf4.dequantize``. The dequantised weight is never kept: the backward pass dequantises again
(as bitsandbytes' ``MatMul4Bit`` does), so activations, not weights, dominate training memory.

On the CPU the C kernels of ``minilora.native`` serve the weight: ``dequantize`` runs the C dequantiser
(the same bits as the torch one, both being bit-exact with the reference; ~23× faster on 4096 × 4096), and a
float32 forward over at most ``NATIVE_MATMUL_ROWS`` rows (a decode step, a small batch) runs the exact-mode
NF4 matmul on the packed bytes without materialising W (~200× faster than dequantise + matmul for one
token on 4096 × 4096), within the same γ_K bound as ``F.linear`` on the dequantised weight. On CUDA one
Triton kernel dequantises (``nf4_triton.py``: the same bits, ~15× less memory traffic than the torch
transcription, which stays as its reference and as the path with ``MINILORA_NO_TRITON=1``) and cuBLAS multiplies.

Not here: a fused dequantise-matmul kernel on CUDA, FP4, re-quantising a merged weight (QLoRA merges are lossy;
``QLoraLinear.merged()`` returns a full-precision Linear).
"""
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minilora import native
from minilora.tables import DEFAULT_BLOCKSIZE
from minilora.torch_backend import nf4, nf4_triton
from minilora.torch_backend.lora import LoraLinear

NATIVE_MATMUL_ROWS = 64  # up to here the C matmul on packed bytes beats C dequantise + BLAS (bench/nf4.py)
_PACKED = weakref.WeakKeyDictionary()  # NF4Linear -> (buffer versions, native.PackedNF4): see _packed_nf4


def _bits(t):
    return None if t is None else t.view(torch.int32)


def _float(bits):
    return None if bits is None else bits.view(torch.float32)


class _DequantLinear(torch.autograd.Function):
    """``y = x Wᵀ`` with ``W = layer.dequantize(x.dtype)``, re-dequantised in backward rather than saved.
    ``mode`` is the C matmul's (``"exact"`` or ``"int16"``), chosen by the caller: inside ``forward`` autograd
    has switched gradient recording off, so the layer could not tell training from inference here."""

    @staticmethod
    def forward(ctx, x, layer, mode):
        ctx.layer = layer
        if layer.native_matmul_ok(x):
            return layer.native_matmul(x, mode)  # (..., N)
        return F.linear(x, layer.dequantize(x.dtype))  # (..., N)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_y @ ctx.layer.dequantize(grad_y.dtype), None, None  # (..., K)


class NF4Linear(nn.Module):
    """A frozen Linear whose weight ``W (N, K)`` is held as an NF4 ``QuantState`` (buffers move with ``.to``).

    ``compute_dtype`` (default: the original weight's dtype) is the dtype of the dequantised weight, of
    the matmul and of the output; inputs are cast to it.
    """

    def __init__(self, state, bias=None, compute_dtype=None):
        super().__init__()
        if len(state.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight state (N, K), got shape {state.shape}")
        self.out_features, self.in_features = state.shape
        self.shape, self.orig_dtype, self.blocksize = tuple(state.shape), state.dtype, state.blocksize
        self.compute_dtype = compute_dtype or state.dtype
        # float32 statistics are kept as their int32 bit patterns, so that ``model.to(torch.bfloat16)``,
        # which casts every floating-point buffer, cannot round them.
        self.register_buffer("packed", state.packed)  # ((N*K+1)//2, 1) uint8
        self.register_buffer("absmax_bits", _bits(state.absmax))  # (nblocks,) int32, or None with DQ
        self.register_buffer("nested_codes", state.nested_codes)  # (nblocks,) uint8, DQ only
        self.register_buffer("nested_absmax_bits", _bits(state.nested_absmax))  # (ceil(nblocks/256),), DQ only
        self.offset = state.offset  # np.float32 or None
        # the CUDA kernel's inputs (nf4_triton.py), as int32 bit patterns too; not part of the state_dict
        self.register_buffer("offset_bits", None if state.offset is None else _bits(
            torch.tensor([float(state.offset)], dtype=torch.float32, device=state.packed.device)), persistent=False)
        self.register_buffer("nf4_bits", _bits(nf4._table("NF4", state.packed.device)), persistent=False)  # (16,)
        self.register_buffer("dyn_bits", _bits(nf4._table("DYN", state.packed.device)), persistent=False)  # (256,)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.matmul_mode = "exact"  # or "int16" (CPU inference only): see native_matmul, set_nf4_matmul_mode

    @classmethod
    def from_linear(cls, linear, blocksize=DEFAULT_BLOCKSIZE, double_quant=False, compute_dtype=None):
        """Quantise an ``nn.Linear`` (its weight's own dtype and device) with ``minilora.torch_backend.nf4.quantize``."""
        state = nf4.quantize(linear.weight.detach(), blocksize, double_quant)
        return cls(state, linear.bias, compute_dtype)

    @property
    def double_quant(self):
        return self.nested_codes is not None

    def quant_state(self):
        """The ``QuantState`` of the stored bytes, on the buffers' current device."""
        return nf4.QuantState(self.packed, _float(self.absmax_bits), self.shape, self.orig_dtype,
                              self.blocksize, nested_codes=self.nested_codes,
                              nested_absmax=_float(self.nested_absmax_bits), offset=self.offset)

    def dequantize(self, dtype=None):
        """``W (N, K)`` in ``dtype`` (default ``compute_dtype``), bit-exact with ``minilora.nf4.dequantize``
        (on the CPU through the C dequantiser, which is bit-exact with it too)."""
        dtype = self.compute_dtype if dtype is None else dtype
        if nf4_triton.available(self.packed) and dtype in nf4.IN_DTYPES:
            return nf4_triton.dequantize_layer(self, dtype)  # (N, K), one kernel, the same bits
        if self.packed.device.type != "cpu" or dtype not in nf4.NUMPY_DTYPES:
            return nf4.dequantize(self.quant_state(), dtype)
        packed, absmax = self._native_state()
        return nf4.numpy_to_torch(native.dequantize_nf4(packed, absmax, self.shape, nf4.NUMPY_DTYPES[dtype],
                                                        self.blocksize))  # (N, K)

    def _native_state(self):
        """``(packed, absmax)`` as NumPy views for ``minilora.native``: absmax float32 (nblocks,), decoded from
        the double-quantised statistics when there are (C, bit-exact with the reference; 1/64 of the weights)."""
        packed = self.packed.numpy()  # ((N*K+1)//2, 1) uint8
        if self.nested_codes is None:
            return packed, _float(self.absmax_bits).numpy()
        return packed, native.dequantize_absmax(self.nested_codes.numpy(), _float(self.nested_absmax_bits).numpy(),
                                                self.offset)

    def native_matmul_ok(self, x):
        """The C matmul serves ``x``: CPU float32, at most ``NATIVE_MATMUL_ROWS`` rows, K a multiple of the
        blocksize (the C kernel's requirement: no block spans two rows)."""
        return (x.device.type == "cpu" and self.packed.device.type == "cpu" and x.dtype == torch.float32
                and x.numel() <= NATIVE_MATMUL_ROWS * self.in_features and self.in_features % self.blocksize == 0)

    def native_matmul(self, x, mode="exact"):
        """``x (..., K) @ dequant(W)ᵀ`` by ``native.matmul_nf4`` on the packed bytes: float32. Exact mode
        (within γ_K·(|x|·|W|ᵀ) of the exact product, as ``F.linear`` on the dequantised weight is), or
        ``mode="int16"``: the approximate int16 GEMV, within ``minilora.nf4.int16_matmul_error_bound``."""
        x2 = x.detach().reshape(-1, self.in_features).contiguous()  # (M, K)
        y = self._packed_nf4().matmul(x2.numpy(), mode=mode)  # (M, N)
        return torch.from_numpy(y).view(*x.shape[:-1], self.out_features)  # (..., N)

    def _packed_nf4(self):
        """The C matmul's ``native.PackedNF4`` of this layer, built once and reused while the buffers are
        unchanged: the state is checked once, and a double-quantised absmax is decoded to float32 once
        (spec/kernels.md: "decode it once per weight, not per call"; 4 bytes per block, 1/16 of the packed
        weight, held while the layer serves the C matmul). Rebuilt when a buffer is replaced (``.to``) or
        written in place (``load_state_dict``): the key holds each buffer's address and version counter.
        Buffers made under ``torch.inference_mode`` have no version counter: then it is built on every call
        (correct, slower; load the model outside inference mode to keep the cache).
        Decoding per call cost 400 µs of a 611 µs M = 1 call of a 2816 x 1024 layer (a fresh 180 KB absmax
        array each time, page-faulted in on this VM); cached, the call takes the kernel's 220-260 µs."""
        bufs = [b for b in (self.packed, self.absmax_bits, self.nested_codes, self.nested_absmax_bits) if b is not None]
        if any(b.is_inference() for b in bufs):  # made under torch.inference_mode: no version counter, so an
            packed, absmax = self._native_state()  # in-place write could not be seen; build it every call
            return native.PackedNF4(packed, absmax, self.out_features, self.in_features, self.blocksize)
        key = tuple((b.data_ptr(), b._version) for b in bufs) + (self.offset,)
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            packed, absmax = self._native_state()
            cached = key, native.PackedNF4(packed, absmax, self.out_features, self.in_features, self.blocksize)
            _PACKED[self] = cached
        return cached[1]

    def forward(self, x):
        x = x.to(self.compute_dtype)
        if nf4_triton.available(self.packed):  # CUDA: traceable, so a compiled block stays one graph
            y = nf4_triton.nf4_linear(x, self)  # (..., N)
        elif not torch.is_grad_enabled() and not torch.compiler.is_compiling() and self.native_matmul_ok(x):
            y = self.native_matmul(x, self.matmul_mode)  # (..., N): inference, no autograd or compiler wrapper
        else:
            y = self._eager_matmul(x)  # (..., N)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.compiler.disable  # the C kernels (CPU) and the torch transcription run eagerly
    def _eager_matmul(self, x):
        # int16 only for inference (``minilora generate --nf4-matmul int16``): training always runs exact, since
        # its backward multiplies by the exact dequantised weight
        mode = "exact" if torch.is_grad_enabled() else self.matmul_mode
        return _DequantLinear.apply(x, self, mode)  # (..., N)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 blocksize="
                f"{self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


class QLoraLinear(LoraLinear):
    """``LoraLinear`` on a frozen ``NF4Linear``: the same forward, DoRA and merge math, with W dequantised.

    ``QLoraLinear.from_linear(linear, blocksize, double_quant, compute_dtype, r=..., ...)`` quantises and wraps.
    """

    def __init__(self, base, **lora_kwargs):
        if not isinstance(base, NF4Linear):
            raise TypeError(f"QLoraLinear needs an NF4Linear base, got {type(base).__name__}; "
                            f"use LoraLinear for a plain nn.Linear")
        super().__init__(base, **lora_kwargs)

    @classmethod
    def from_linear(cls, linear, blocksize=DEFAULT_BLOCKSIZE, double_quant=False, compute_dtype=None,
                    **lora_kwargs):
        return cls(NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype), **lora_kwargs)

    def base_weight(self):
        """``dequant(W) (N, K)`` in the compute dtype (a fresh tensor each call, never cached)."""
        return self.base.dequantize()


def set_nf4_matmul_mode(model, mode):
    """Set ``matmul_mode`` (``"exact"`` or ``"int16"``) on every ``NF4Linear`` of ``model``; returns how many.
    The mode matters only where the C matmul serves a layer: CPU, float32, at most ``NATIVE_MATMUL_ROWS`` rows,
    no gradient recorded (token-by-token decoding)."""
    if mode not in native.MATMUL_MODES:
        raise ValueError(f"NF4 matmul mode must be one of {', '.join(native.MATMUL_MODES)}, got {mode!r}")
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    for m in layers:
        m.matmul_mode = mode
    return len(layers)


def nf4_nbytes(layer):
    """Bytes held by an ``NF4Linear``'s quantised weight (codes + statistics), for memory reports."""
    return sum(int(np.prod(b.shape)) * b.element_size() for b in
               (layer.packed, layer.absmax_bits, layer.nested_codes, layer.nested_absmax_bits) if b is not None)
