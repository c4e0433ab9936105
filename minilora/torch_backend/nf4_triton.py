"""NF4 dequantisation on CUDA in one Triton kernel: the fast path of ``NF4Linear`` on a GPU.

``out[j] = cast(dtype, float32(NF4[code[j]] * absmax[j // blocksize]))``, with, under double quantisation,
``absmax[b] = float32(float32(DYN[q[b]] * a2[b // 256]) + offset)`` decoded inside the same kernel. These are
the statements of ``minilora.torch_backend.nf4.dequantize_nf4`` / ``dequantize_absmax`` (themselves
transcriptions of the NumPy reference), so the output is the same bits: each step is one IEEE float32
multiply or add followed by one round-to-nearest-even cast. The multiply of the absmax decoding is written as
PTX ``mul.rn.f32``: an explicitly rounded multiply is never contracted with the following add into an FMA
(which would round once instead of twice), whatever the compiler's fusion setting.
``tests/test_torch_nf4.py`` checks the kernel against the torch functions bit for bit.

Why: the torch transcription makes about ten passes over the weight (nibble unpacking, an int64 gather
index, a repeated absmax vector, the product, the cast), 30-40 bytes of memory traffic per weight; this
kernel reads half a byte and writes two (bfloat16). One program handles ``BLOCK`` packed bytes. Both weights
of byte ``i`` lie in the same NF4 block (block sizes are even), so they share ``absmax[i >> log2(bs / 2)]``,
and they are written together as one word (two bfloat16 / float16 in 32 bits, two float32 in 64 bits,
element ``2i`` in the low half: little-endian), so the stores are plain coalesced words.

``nf4_dequantize`` is a ``torch.library.triton_op``: ``torch.compile`` traces through it (a compiled decoder
block stays one graph, launched by Inductor's own launcher), and eager code calls it like any op.
``NF4MatmulFunction`` is ``y = x · dequant(W)ᵀ`` with W dequantised again in backward (not saved).

Not here: a fused dequantise-matmul (the dequantised weight goes to cuBLAS), FP4, quantisation (torch).
``MINILORA_NO_TRITON=1`` (read at import) sends NF4 layers back to the torch transcription.
"""
import math
import os

import torch

try:  # triton ships with CUDA builds of torch; CPU-only installs have none and never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
if not hasattr(torch.library, "triton_op"):  # torch < 2.6: the torch transcription serves CUDA too
    triton = None

BLOCK = 1024  # packed bytes per program
NUM_WARPS = 8  # bench/nf4_cuda.py and a sweep on an H100: 1024 x 8 was the fastest of 512-4096 x 2-8
USE_TRITON = os.environ.get("MINILORA_NO_TRITON", "") not in ("1", "true", "yes")
_WORD = {torch.float32: torch.int64, torch.float16: torch.int32, torch.bfloat16: torch.int32}  # two weights
_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available(tensor):
    """The kernel can serve ``tensor``'s device: CUDA, triton importable, not switched off."""
    return triton is not None and USE_TRITON and tensor.is_cuda


if triton is not None:
    @triton.jit
    def _dequant_kernel(packed_ptr, absmax_ptr, codes_ptr, nested_ptr, offset_ptr, dyn_ptr, nf4_ptr, out_ptr,
                        n_bytes, LOG2_HALF_BLOCK: tl.constexpr, DOUBLE_QUANT: tl.constexpr, KIND: tl.constexpr,
                        BLOCK: tl.constexpr):
        byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) packed byte indices
        live = byte < n_bytes
        b = tl.load(packed_ptr + byte, mask=live, other=0).to(tl.int32)  # (BLOCK,)
        blk = byte >> LOG2_HALF_BLOCK  # (BLOCK,) the NF4 block of both weights of the byte
        if DOUBLE_QUANT:
            q = tl.load(codes_ptr + blk, mask=live, other=0).to(tl.int32)
            a2 = tl.load(nested_ptr + (blk >> 8), mask=live, other=0.0)  # nested blocks of 256
            dyn = tl.load(dyn_ptr + q, mask=live, other=0.0)
            scale = tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [dyn, a2], dtype=tl.float32,
                                              is_pure=True, pack=1)  # one float32 rounding
            scale = scale + tl.load(offset_ptr)  # a second one
        else:
            scale = tl.load(absmax_ptr + blk, mask=live, other=0.0)
        hi = tl.load(nf4_ptr + (b >> 4), mask=live, other=0.0) * scale  # weight 2i: the HIGH nibble
        lo = tl.load(nf4_ptr + (b & 15), mask=live, other=0.0) * scale  # weight 2i + 1
        if KIND == 0:  # float32: two in one 64-bit word
            w_hi = hi.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            w_lo = lo.to(tl.int32, bitcast=True).to(tl.int64)
            word = w_hi | (w_lo << 32)
        else:  # bfloat16 (KIND 1) / float16 (KIND 2): RNE casts, two in one 32-bit word
            half = tl.bfloat16 if KIND == 1 else tl.float16
            h16 = hi.to(half, fp_downcast_rounding="rtne")
            l16 = lo.to(half, fp_downcast_rounding="rtne")
            w_hi = h16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            w_lo = l16.to(tl.int16, bitcast=True).to(tl.int32)
            word = w_hi | (w_lo << 16)
        tl.store(out_ptr + byte, word, mask=live)

    def _launch(kernel, packed, absmax, codes, nested, offset, dyn_table, nf4_table, rows, cols, blocksize,
                double_quant, dtype):
        n = rows * cols
        n_bytes = (n + 1) // 2
        words = torch.empty(n_bytes, dtype=_WORD[dtype], device=packed.device)  # (n_bytes,) two weights each
        kernel[(triton.cdiv(n_bytes, BLOCK),)](
            packed, absmax, codes, nested, offset, dyn_table, nf4_table, words, n_bytes,
            LOG2_HALF_BLOCK=(blocksize // 2).bit_length() - 1, DOUBLE_QUANT=double_quant, KIND=_KIND[dtype],
            BLOCK=BLOCK, num_warps=NUM_WARPS)
        return words.view(dtype)[:n].view(rows, cols)  # (rows, cols)

    @torch.library.triton_op("minilora::nf4_dequantize", mutates_args=())
    def nf4_dequantize_op(packed: torch.Tensor, absmax: torch.Tensor, codes: torch.Tensor, nested: torch.Tensor,
                          offset: torch.Tensor, dyn_table: torch.Tensor, nf4_table: torch.Tensor, rows: int,
                          cols: int, blocksize: int, double_quant: bool, dtype: torch.dtype) -> torch.Tensor:
        """W (rows, cols) in ``dtype`` from NF4 bytes and statistics (unused ones: any tensor on the device)."""
        return _launch(torch.library.wrap_triton(_dequant_kernel), packed, absmax, codes, nested, offset,
                       dyn_table, nf4_table, rows, cols, blocksize, double_quant, dtype)


def nf4_dequantize(*args):
    """The op under ``torch.compile`` (traced into the graph); eagerly, the same kernel launched directly,
    without the op's Python dispatch on the host."""
    if torch.compiler.is_compiling():
        return torch.ops.minilora.nf4_dequantize(*args)
    return _launch(_dequant_kernel, *args)


def layer_args(layer):
    """The ``nf4_dequantize`` arguments (all but dtype) of an ``NF4Linear``'s buffers: tensors and fixed ints
    only, so that ``torch.compile`` traces them without specialising on values (the offset is a tensor)."""
    dq = layer.nested_codes is not None
    any_ = layer.packed  # stands in for the statistics the kernel does not read
    f32 = torch.float32
    return (layer.packed, any_ if dq else layer.absmax_bits.view(f32), layer.nested_codes if dq else any_,
            layer.nested_absmax_bits.view(f32) if dq else any_, layer.offset_bits.view(f32) if dq else any_,
            layer.dyn_bits.view(f32), layer.nf4_bits.view(f32), layer.out_features, layer.in_features,
            layer.blocksize, dq)


def dequantize_layer(layer, dtype):
    """``W (N, K)`` in ``dtype`` of an ``NF4Linear`` on CUDA."""
    return nf4_dequantize(*layer_args(layer), dtype)


def state_args(state):
    """The ``nf4_dequantize`` arguments (all but dtype) of a ``minilora.torch_backend.nf4`` state on a CUDA
    device, W as one row of ``prod(shape)`` weights. Built once, they launch the kernel without a host sync
    (the offset becomes a device tensor here)."""
    from minilora.torch_backend import nf4  # the tables, shared with the reference transcription
    shape = tuple(int(d) for d in state.shape)
    n = math.prod(shape)
    if state.packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be {(n + 1) // 2} uint8 bytes for shape {shape}, got {state.packed.numel()}")
    device, dq = state.packed.device, state.nested_codes is not None
    any_ = state.packed
    offset = torch.tensor([float(state.offset) if dq else 0.0], dtype=torch.float32, device=device)
    return (state.packed, any_ if dq else state.absmax, state.nested_codes if dq else any_,
            state.nested_absmax if dq else any_, offset, nf4._table("DYN", device), nf4._table("NF4", device),
            1, n, state.blocksize, dq)


def dequantize(state, dtype):
    """``minilora.torch_backend.nf4.dequantize(state, dtype)`` for a state on a CUDA device, in one kernel."""
    if dtype not in _WORD:
        raise TypeError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
    return nf4_dequantize(*state_args(state), dtype).view(tuple(int(d) for d in state.shape))


class NF4MatmulFunction(torch.autograd.Function):
    """``y = x · dequant(W)ᵀ`` for a frozen NF4 ``layer`` on CUDA; backward ``∂L/∂x = g · dequant(W)``, W
    dequantised again rather than saved (as bitsandbytes' ``MatMul4Bit``). The packed buffers are what is
    saved: the layer's own, no copy. ``x (..., K)`` -> ``y (..., N)``."""

    @staticmethod
    def forward(ctx, x, packed, absmax, codes, nested, offset, dyn_table, nf4_table, rows, cols, blocksize, dq):
        ctx.save_for_backward(packed, absmax, codes, nested, offset, dyn_table, nf4_table)
        ctx.meta = (rows, cols, blocksize, dq)
        W = nf4_dequantize(packed, absmax, codes, nested, offset, dyn_table, nf4_table, rows, cols, blocksize, dq,
                           x.dtype)  # (N, K)
        return x @ W.T  # (..., N)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return (None,) * 12
        W = nf4_dequantize(*ctx.saved_tensors, *ctx.meta, g.dtype)  # (N, K)
        return (g @ W,) + (None,) * 11  # (..., K)


def nf4_linear(x, layer):
    """``x (..., K) @ dequant(W)ᵀ`` for an ``NF4Linear`` on CUDA, in ``x``'s dtype."""
    return NF4MatmulFunction.apply(x, *layer_args(layer))
