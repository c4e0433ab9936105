"""The C kernels (``csrc/``), wrapped: validate -> marshal -> call -> check. No math here.

Same function names and signatures as the NumPy reference (``minilora.nf4``, ``minilora.double_quant``),
plus two keywords:

``variant``      ``"auto"`` (the C dispatcher: AVX2 + FMA + F16C when the CPU has them, else the scalar
                 reference; for ``matmul_nf4`` the AVX-512F GEMV first where the CPU has it), ``"ref"`` (the
                 scalar C reference), ``"avx2"`` (raises ``RuntimeError`` on a CPU without AVX2; never a silent
                 fallback) or ``"avx512"`` (``matmul_nf4`` / ``PackedNF4`` only: the AVX-512F GEMV for M = 1,
                 the AVX2 GEMM and int16 GEMV otherwise; ``RuntimeError`` without AVX-512F).
                 ``MINILORA_FORCE_REF=1`` in the environment turns ``"auto"`` into ``"ref"`` (read at each
                 call; ``0`` or unset: off, anything else is an ``InputError``); an explicit ``variant`` wins.
``num_threads``  None -> ``MINILORA_NUM_THREADS`` from the environment, else automatic (1 thread for small
                 inputs, 2 for large ones). No result bit of quantise / dequantise / double quantisation
                 depends on it, nor any matmul output (the split is over N).

Bit-exact with the reference: ``quantize_nf4``, ``dequantize_nf4`` (float32, bfloat16, float16 out),
``double_quantize``, ``dequantize_absmax``. ``matmul_nf4`` returns float32 accumulated in float32 (the
reference returns float64): |out - ref| <= gamma_K * (|x| @ |dequant(W)|.T), gamma_K = K u / (1 - K u),
u = 2**-24; with ``mode="int16"`` (opt-in, approximate) within ``nf4.int16_matmul_error_bound``. Inputs in float16 / bfloat16 are widened to float32 first (exact), as the reference does.
Not here: FP4 (NumPy only) and ``matmul_nf4`` with ``K % blocksize != 0`` (ValueError; use the reference).
"""
import functools
import os
import threading

import ml_dtypes
import numpy as np

from minilora.errors import InputError

from minilora._native import ffi, lib
from minilora.double_quant import as_f32_scalar, check_f32_vector
from minilora.nf4 import check_blocksize, check_state
from minilora.tables import DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE

VARIANTS = ("auto", "ref", "avx2", "avx512")
_AVX512_KERNELS = ("matmul_nf4",)  # the only kernels with an AVX-512 variant
_IN_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
_OUT_CODES = {np.dtype(np.float32): lib.MINILORA_FLOAT32, np.dtype(ml_dtypes.bfloat16): lib.MINILORA_BFLOAT16,
              np.dtype(np.float16): lib.MINILORA_FLOAT16}


def has_avx2():
    """True when this CPU runs the AVX2 + FMA + F16C kernels."""
    return bool(lib.minilora_cpu_has_avx2())


def has_avx512():
    """True when this CPU (and OS) runs the AVX-512F GEMV (it also needs AVX2 for the rest of the matmul)."""
    return bool(lib.minilora_cpu_has_avx512()) and has_avx2()


def available_variants():
    """The concrete variants of every kernel this CPU can run: ``("ref",)`` or ``("ref", "avx2")``."""
    return ("ref", "avx2") if has_avx2() else ("ref",)


def matmul_variants():
    """The concrete variants of ``matmul_nf4`` this CPU can run: ``available_variants()`` plus ``"avx512"``."""
    return available_variants() + (("avx512",) if has_avx512() else ())


# ---------------------------------------------------------------- variant, threads, status
def _kernel(name, variant, simd=True):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "auto" and _force_ref():
        variant = "ref"
    if variant in ("avx2", "avx512") and not simd:
        raise ValueError(f"{name} has only a scalar C kernel; use variant='auto' or 'ref'")
    if variant == "avx512" and name not in _AVX512_KERNELS:
        raise ValueError(f"{name} has no AVX-512 kernel; use variant='auto', 'ref' or 'avx2'")
    if variant in ("avx2", "avx512") and not has_avx2():
        raise RuntimeError(f"variant={variant!r} asked for {name}, but this CPU lacks AVX2 + FMA + F16C")
    if variant == "avx512" and not has_avx512():
        raise RuntimeError(f"variant='avx512' asked for {name}, but this CPU lacks AVX-512F")
    suffix = {"auto": "", "ref": "_ref", "avx2": "_avx2", "avx512": "_avx512"}[variant] if simd else ""
    return getattr(lib, f"minilora_{name}{suffix}")


def _force_ref():
    env = os.environ.get("MINILORA_FORCE_REF", "").strip()
    if env not in ("", "0", "1"):
        raise InputError(f"MINILORA_FORCE_REF must be 1 (scalar C reference) or 0, got {env!r}")
    return env == "1"


def check_environment():
    """InputError for a bad ``MINILORA_NUM_THREADS`` / ``MINILORA_FORCE_REF``, before a command starts (later the
    error would seem to come from the file and tensor being processed)."""
    _force_ref()
    _threads(None)


THREADS_CAP = 1 << 16  # passed to C as an int; the pool caps far lower (csrc/threads.c)


def _threads(num_threads):
    if num_threads is None:
        env = os.environ.get("MINILORA_NUM_THREADS", "").strip()
        if not env:
            return 0
        if not (env.isascii() and env.isdigit()) or int(env) < 1:
            raise InputError(f"MINILORA_NUM_THREADS must be a positive integer, got {env!r}")
        return min(int(env), THREADS_CAP)
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    return min(int(num_threads), THREADS_CAP)


def _check(status, name):
    if status == lib.MINILORA_ENOCPU:
        raise RuntimeError(f"{name}: this CPU lacks AVX2 + FMA + F16C")
    if status != lib.MINILORA_OK:
        raise RuntimeError(f"{name} returned status {status}: the wrapper should have rejected these arguments")


def _ptr(ctype, array):
    return ffi.from_buffer(f"{ctype}[]", array) if array.size else ffi.NULL


@functools.lru_cache(maxsize=256)
def _workspace_size(fn_name, *args):
    """``lib.<fn_name>(*args)`` for the scratch-size functions, remembered per shape. Every cffi call releases
    the GIL; for these one-line functions the wait to take it back from the merge's reader / writer threads
    cost more than the call (0.35 ms per tensor in a profile of ``minilora merge``)."""
    return getattr(lib, fn_name)(*args)


_SCRATCH = threading.local()
SCRATCH_CACHE_BYTES = 64 << 20  # workspaces up to this size are kept per thread between calls


def _scratch(nbytes):
    """uint8 (nbytes,): the matmul kernels' workspace (x packed into panels, dequantised strips).

    Kept per thread and reused, up to ``SCRATCH_CACHE_BYTES``: a fresh multi-MB buffer is page-faulted in
    on first touch on every call, which on this project's VM took 10-45 ms of a 240 ms M = 512 GEMM
    (4096 x 4096, 8.2 MiB of workspace). Per thread, because two threads may call the same ``PackedNF4``;
    a kernel only uses it during its call. Larger workspaces are allocated per call and freed after it."""
    if nbytes > SCRATCH_CACHE_BYTES:
        return np.empty(nbytes, dtype=np.uint8)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _SCRATCH.buf = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


# ---------------------------------------------------------------- validation (messages as minilora.nf4)


def _float32_input(x, name):
    """float32/float16/bfloat16 ndarray -> C-contiguous float32 (a view when it already is one)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy ndarray, got {type(x).__name__}")
    if x.dtype not in _IN_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)  # float16 / bfloat16 widen exactly


def _check_state(packed, absmax, shape, blocksize):
    """The reference's validation (same errors), then C-contiguous flat views for the kernels."""
    shape, n, blocksize = check_state(packed, absmax, shape, blocksize)
    return np.ascontiguousarray(packed).reshape(-1), np.ascontiguousarray(absmax).reshape(-1), shape, n, blocksize


def _f32_vector(arr, name):
    check_f32_vector(arr, name)
    return np.ascontiguousarray(arr)


def _typed(arr, dtype, name):
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
        got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise TypeError(f"{name} must be a {np.dtype(dtype).name} ndarray, got {got}")
    return np.ascontiguousarray(arr).reshape(-1)








# ---------------------------------------------------------------- the kernels
def quantize_nf4(x, blocksize=DEFAULT_BLOCKSIZE, *, variant="auto", num_threads=None):
    """NF4-quantise ``x`` (any shape) -> packed uint8 ((n+1)//2, 1), absmax float32 (nblocks,)."""
    fn = _kernel("quantize_nf4", variant)
    blocksize = check_blocksize(blocksize)
    xf = _float32_input(x, "x").reshape(-1)  # (n,)
    if xf.size == 0:
        raise ValueError(f"x is empty (shape {x.shape}); nothing to quantise")
    n = xf.size
    packed = np.empty(((n + 1) // 2, 1), dtype=np.uint8)  # ((n+1)//2, 1)
    absmax = np.empty(-(-n // blocksize), dtype=np.float32)  # (nblocks,)
    status = fn(_ptr("float", xf), n, blocksize, _ptr("uint8_t", packed), _ptr("float", absmax),
                _threads(num_threads))
    _check(status, "quantize_nf4")
    return packed, absmax


def dequantize_nf4(packed, absmax, shape, dtype=np.float32, blocksize=DEFAULT_BLOCKSIZE, *,
                   variant="auto", num_threads=None):
    """out[j] = cast(dtype, float32(NF4[code[j]] * absmax[j // blocksize])), reshaped to ``shape``."""
    fn = _kernel("dequantize_nf4", variant)
    packed, absmax, shape, n, blocksize = _check_state(packed, absmax, shape, blocksize)
    dt = np.dtype(dtype)
    if dt not in _OUT_CODES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dt}")
    out = np.empty(n, dtype=dt)  # (n,)
    raw = out if dt == np.float32 else out.view(np.uint16)
    status = fn(_ptr("uint8_t", packed), _ptr("float", absmax), n, blocksize,
                _ptr("float" if dt == np.float32 else "uint16_t", raw), _OUT_CODES[dt], _threads(num_threads))
    _check(status, "dequantize_nf4")
    return out.reshape(shape)  # shape


def exact_mean_float32(absmax):
    """The float32 nearest (ties to even) to the exact mean of absmax float32 (nblocks,): the same value as
    ``minilora.double_quant.exact_mean_float32``, in C (an exact wide-integer sum) instead of Python integers."""
    absmax = _f32_vector(absmax, "absmax")
    mean = ffi.new("float *")
    _check(lib.minilora_exact_mean_f32(_ptr("float", absmax), absmax.size, mean), "exact_mean_f32")
    return np.float32(mean[0])


def double_quantize(absmax, offset=None, *, variant="auto"):
    """absmax float32 (nblocks,) -> codes uint8 (nblocks,), nested_absmax float32 (ceil(nblocks/256),), offset.

    ``offset=None`` takes the float32 nearest to the exact mean (``minilora_exact_mean_f32``).
    """
    fn = _kernel("double_quantize", variant, simd=False)
    absmax = _f32_vector(absmax, "absmax")
    offset = exact_mean_float32(absmax) if offset is None else as_f32_scalar(offset, "offset")
    codes = np.empty(absmax.size, dtype=np.uint8)  # (nblocks,)
    nested = np.empty(-(-absmax.size // NESTED_BLOCKSIZE), dtype=np.float32)  # (ceil(nblocks/256),)
    status = fn(_ptr("float", absmax), absmax.size, float(offset), _ptr("uint8_t", codes), _ptr("float", nested))
    _check(status, "double_quantize")
    return codes, nested, offset


def dequantize_absmax(codes, nested_absmax, offset, *, variant="auto"):
    """absmax[b] = float32(float32(DYN[codes[b]] * nested_absmax[b // 256]) + offset); float32 (nblocks,)."""
    fn = _kernel("dequantize_absmax", variant, simd=False)
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8:
        got = codes.dtype if isinstance(codes, np.ndarray) else type(codes).__name__
        raise TypeError(f"codes must be a uint8 ndarray, got {got}")
    if codes.ndim != 1 or codes.size == 0:
        raise ValueError(f"codes must be a non-empty 1-D array, got shape {codes.shape}")
    nested_absmax = _f32_vector(nested_absmax, "nested_absmax")
    need = -(-codes.size // NESTED_BLOCKSIZE)
    if nested_absmax.size != need:
        raise ValueError(f"nested_absmax has {nested_absmax.size} entries; {codes.size} codes need "
                         f"ceil({codes.size}/{NESTED_BLOCKSIZE}) = {need}")
    offset = as_f32_scalar(offset, "offset")
    codes = np.ascontiguousarray(codes)
    out = np.empty(codes.size, dtype=np.float32)  # (nblocks,)
    status = fn(_ptr("uint8_t", codes), _ptr("float", nested_absmax), codes.size, float(offset), _ptr("float", out))
    _check(status, "dequantize_absmax")
    return out


MATMUL_MODES = ("exact", "int16")


def matmul_nf4(x, packed, absmax, N, K, blocksize=DEFAULT_BLOCKSIZE, *, variant="auto", num_threads=None,
               mode="exact"):
    """y = x @ dequant(W).T with W (N, K) NF4: x (M, K) -> y float32 (M, N), accumulated in float32.

    ``mode="exact"`` (the default): every weight is its exact float32 dequantised value; within
    gamma_K * (|x| @ |dequant(W)|.T) of the exact product. ``mode="int16"``: the approximate GEMV of
    ``csrc/nf4_gemv_i16.c`` (x quantised per 64 to int16, llama.cpp-style), faster where the exact decode is
    compute-bound, error about 1e-5..1e-4 of |x| @ |dequant(W)|.T (bound: ``minilora.nf4.int16_matmul_error_bound``);
    one row of x at a time."""
    return PackedNF4(packed, absmax, N, K, blocksize, variant=variant, num_threads=num_threads).matmul(x, mode=mode)


class PackedNF4:
    """W (N, K) in bitsandbytes' NF4 layout, checked once, for repeated ``y = x @ dequant(W).T``.

    A decode loop calls the GEMV once per token with the same weights; the checks of the state, the
    kernel choice and the pointers to W are done here once, so a call of ``matmul`` only checks x. The
    arrays are referenced, not copied: do not modify them while this object is in use. Each calling thread
    reuses its own workspace between calls (``_scratch``). The kernel and the thread count are chosen when
    it is built (``MINILORA_FORCE_REF`` / ``MINILORA_NUM_THREADS`` are read then, not per call).

    >>> # w = PackedNF4(packed, absmax, N, K); y = w.matmul(x)   # x (M, K) -> y (M, N) float32
    """

    def __init__(self, packed, absmax, N, K, blocksize=DEFAULT_BLOCKSIZE, *, variant="auto", num_threads=None):
        self._fn = _kernel("matmul_nf4", variant)
        self._fn_i16 = _kernel("gemv_nf4_i16", "avx2" if variant == "avx512" else variant)  # no AVX-512 int16
        packed, absmax, (self.N, self.K), _, self.blocksize = _check_state(packed, absmax, (N, K), blocksize)
        if self.K % self.blocksize:
            raise ValueError(f"native matmul_nf4 needs K % blocksize == 0, got K={self.K}, "
                             f"blocksize={self.blocksize}; use minilora.nf4.matmul_nf4 for blocks that span rows")
        self._threads = _threads(num_threads)
        self._arrays = packed, absmax  # keep the buffers alive as long as the pointers
        self._packed, self._absmax = _ptr("uint8_t", packed), _ptr("float", absmax)

    def matmul(self, x, mode="exact"):
        """``x (M, K)`` float32 / float16 / bfloat16 → ``y (M, N)`` float32. ``mode``: ``"exact"`` (default) or
        ``"int16"`` (approximate, see ``matmul_nf4``; a NaN / inf in a row of x runs that row exactly)."""
        if mode not in MATMUL_MODES:
            raise ValueError(f"mode must be one of {MATMUL_MODES}, got {mode!r}")
        if not isinstance(x, np.ndarray) or x.dtype not in _IN_DTYPES:
            raise TypeError(f"x must be a float32/float16/bfloat16 ndarray, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 2 or x.shape[1] != self.K:
            raise ValueError(f"x must be (M, K) with K={self.K}, got shape {x.shape}")
        xf = _float32_input(x, "x")  # (M, K)
        M = xf.shape[0]
        y = np.empty((M, self.N), dtype=np.float32)  # (M, N)
        if M == 0:
            return y
        rows = 1 if mode == "int16" else M  # the int16 mode is a GEMV: one call per row of x
        nbytes = max(_workspace_size("minilora_matmul_nf4_scratch_bytes", rows, self.N, self.K, self._threads), 0)
        scratch = _scratch(nbytes)  # this thread's workspace: two threads may share this object
        if mode == "int16":
            for m in range(M):
                status = self._fn_i16(_ptr("float", xf[m]), self._packed, self._absmax, self.N, self.K,
                                      self.blocksize, _ptr("float", y[m]), _ptr("uint8_t", scratch), nbytes,
                                      self._threads)
                _check(status, "gemv_nf4_i16")
            return y
        status = self._fn(_ptr("float", xf), self._packed, self._absmax, M, self.N, self.K, self.blocksize,
                          _ptr("float", y), _ptr("uint8_t", scratch), nbytes, self._threads)
        _check(status, "matmul_nf4")
        return y


# ---------------------------------------------------------------- QuantState bundles (as minilora.nf4)
def for_quant_type(quant_type):
    """The module whose ``quantize`` / ``dequantize`` a caller should use: these C kernels for NF4 (the same
    bits as ``minilora.nf4``, much faster), the NumPy reference for FP4 (which has no C kernel)."""
    import sys

    from minilora import nf4

    return sys.modules[__name__] if quant_type == "nf4" else nf4


def quantize(x, blocksize=DEFAULT_BLOCKSIZE, double_quant=False, quant_type="nf4", offset=None, *,
             variant="auto", num_threads=None):
    """``minilora.nf4.quantize`` with the C kernels (NF4 only): the same ``QuantState``, bit for bit."""
    from minilora.nf4 import QuantState

    if quant_type != "nf4":
        raise ValueError(f"the C kernels implement NF4 only, got quant_type {quant_type!r}; use minilora.nf4")
    packed, absmax = quantize_nf4(x, blocksize, variant=variant, num_threads=num_threads)
    state = dict(packed=packed, absmax=absmax, shape=tuple(x.shape), dtype=x.dtype, blocksize=blocksize,
                 quant_type="nf4")
    if double_quant:
        codes, nested, off = double_quantize(absmax, offset, variant="ref" if variant == "avx2" else variant)
        state.update(absmax=None, nested_codes=codes, nested_absmax=nested, offset=off)
    return QuantState(**state)


def dequantize(state, dtype=None, *, variant="auto", num_threads=None):
    """``minilora.nf4.dequantize`` with the C kernels (NF4 only): the same bits."""
    if state.quant_type != "nf4":
        raise ValueError(f"the C kernels implement NF4 only, got quant_type {state.quant_type!r}; use minilora.nf4")
    absmax = state.absmax
    if state.nested_codes is not None:
        absmax = dequantize_absmax(state.nested_codes, state.nested_absmax, state.offset,
                                   variant="ref" if variant == "avx2" else variant)
    return dequantize_nf4(state.packed, absmax, state.shape, state.dtype if dtype is None else dtype,
                          state.blocksize, variant=variant, num_threads=num_threads)
