"""LoRA math: the NumPy reference that the C and torch backends are tested against.

One layer, one line: ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` with ``ΔW = s · B A`` and ``s = alpha / r``
(rsLoRA: ``s = alpha / √r``). Hu et al. 2021, "LoRA", §4.1; Kalajdzievski 2023, "rsLoRA", §3.
PEFT conventions (0.21): rank / alpha patterns, the two initialisations, GPT-2 Conv1D layout
(``fan_in_fan_out``), Embedding LoRA, merge with one rounding to the base dtype.

Shape legend: ``x (M, K)``, ``W (N, K)`` (Conv1D: ``(K, N)``), ``A (R, K)``, ``B (N, R)``, ``y (M, N)``.
Embedding: ``W (V, d)``, ``A (R, V)``, ``B (d, R)``.

Reductions of the forward and backward (matmuls) accumulate in float64 and return float64. The merge is
an exact operation and reproduces PEFT's bits: ``ΔW`` is PEFT's float32 sum over r in its CPU order
(one FMA per term), then ``·s`` and ``W + ΔW`` in float32, rounded once to the base dtype.
Not here: dropout masks (pass the already-dropped ``x``), DoRA (``minilora.dora``), quantised bases
(``minilora.nf4``), file formats (``minilora.checkpoint``).
"""
import math
import re

import ml_dtypes
import numpy as np

F32 = np.float32
F64 = np.float64


def scaling(alpha, r, use_rslora=False):
    """The LoRA scale: ``alpha / r``, or ``alpha / √r`` with rsLoRA.

    >>> scaling(16, 8), scaling(16, 4, use_rslora=True)
    (2.0, 8.0)
    """
    if not (isinstance(r, (int, np.integer)) and r > 0):
        raise ValueError(f"rank r must be a positive integer, got {r!r}")
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def match_pattern(module_name, patterns):
    """The first key ``k`` of ``patterns`` for which ``re.match(rf"(.*\\.)?({k})$", module_name)``
    holds (PEFT's ``rank_pattern`` / ``alpha_pattern`` rule); else the module name itself if it is a key
    (PEFT's literal fallback, for names such as ``a.b+c`` that do not match themselves as a regex); else None."""
    for key in patterns or {}:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name if module_name in (patterns or {}) else None


def module_rank_alpha(module_name, r, alpha, rank_pattern=None, alpha_pattern=None):
    """(r, alpha) of one module after the per-module overrides of PEFT's patterns."""
    key = match_pattern(module_name, rank_pattern)
    r = rank_pattern[key] if key is not None else r
    key = match_pattern(module_name, alpha_pattern)
    alpha = alpha_pattern[key] if key is not None else alpha
    return r, alpha


def init_lora(K, N, R, method="kaiming", rng=None):
    """PEFT's initialisations, returned as float32 ``(A (R, K), B (N, R))``; B is zero so ΔW = 0.

    ``kaiming``: A ~ U(−1/√K, 1/√K) (kaiming-uniform with a = √5: gain √(2/(1+5)), bound gain·√(3/K)).
    ``gaussian``: A ~ N(0, 1/R).
    """
    rng = np.random.default_rng(rng)
    if method == "kaiming":
        bound = 1.0 / math.sqrt(K)
        A = rng.uniform(-bound, bound, size=(R, K))  # (R, K)
    elif method == "gaussian":
        A = rng.normal(0.0, 1.0 / R, size=(R, K))  # (R, K)
    else:
        raise ValueError(f"init method must be 'kaiming' or 'gaussian', got {method!r}")
    return A.astype(F32), np.zeros((N, R), dtype=F32)


def check_lora_shapes(W, A, B, fan_in_fan_out=False):
    """Return (N, K, R) or raise ValueError naming the mismatching shapes."""
    if W.ndim != 2 or A.ndim != 2 or B.ndim != 2:
        raise ValueError(f"W, A, B must be 2-D, got shapes {W.shape}, {A.shape}, {B.shape}")
    N, K = W.shape[::-1] if fan_in_fan_out else W.shape
    R = A.shape[0]
    if A.shape != (R, K) or B.shape != (N, R):
        layout = "W (K, N)" if fan_in_fan_out else "W (N, K)"
        raise ValueError(
            f"LoRA shapes do not fit: {layout} = {W.shape} needs A (R, {K}) and B ({N}, R), "
            f"got A {A.shape} and B {B.shape}")
    return N, K, R


def _base_weight(W, fan_in_fan_out):
    W = np.asarray(W, dtype=F64)
    return W.T if fan_in_fan_out else W  # (N, K)


def lora_forward(x, W, A, B, s, bias=None, fan_in_fan_out=False):
    """``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` in float64. ``x (M, K)`` → ``y (M, N)``."""
    N, K, _ = check_lora_shapes(W, A, B, fan_in_fan_out)
    x = np.asarray(x, dtype=F64)
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"x must be (M, {K}) to match W, got {x.shape}")
    h = x @ np.asarray(A, F64).T  # (M, R)
    y = x @ _base_weight(W, fan_in_fan_out).T + s * (h @ np.asarray(B, F64).T)  # (M, N)
    if bias is not None:
        y = y + np.asarray(bias, F64)  # (M, N)
    return y


def lora_backward(x, W, A, B, s, grad_y, fan_in_fan_out=False):
    """Gradients of a loss L through one LoRA layer, float64; W gets none.

    With ``h = x Aᵀ`` and ``g = ∂L/∂y (M, N)``: ``∂L/∂B = s·gᵀh (N, R)``, ``∂L/∂A = s·(gB)ᵀx (R, K)``,
    ``∂L/∂x = gW + s·(gB)A (M, K)``. Returns ``(grad_x, grad_A, grad_B)``.
    """
    N, K, _ = check_lora_shapes(W, A, B, fan_in_fan_out)
    x, g = np.asarray(x, F64), np.asarray(grad_y, F64)
    if x.ndim != 2 or x.shape[1] != K or g.shape != (x.shape[0], N):
        raise ValueError(f"x must be (M, {K}) and grad_y (M, {N}), got {x.shape} and {g.shape}")
    A, B = np.asarray(A, F64), np.asarray(B, F64)
    h = x @ A.T  # (M, R)
    gB = g @ B  # (M, R)
    grad_B = s * (g.T @ h)  # (N, R)
    grad_A = s * (gB.T @ x)  # (R, K)
    grad_x = g @ _base_weight(W, fan_in_fan_out) + s * (gB @ A)  # (M, K)
    return grad_x, grad_A, grad_B


def fma_f32(a, b, c):
    """``fmaf(a, b, c)`` elementwise on float32 arrays: ``a·b + c`` with ONE rounding to float32.

    The float64 product of two float32 values is exact; ``TwoSum`` gives the exact residual of the float64
    sum; making that sum round-to-odd (Boldo & Melquiond 2008) lets the final cast to float32 round
    correctly, since 53 ≥ 24 + 2 bits.
    """
    p = a.astype(F64) * b.astype(F64)  # exact
    c = c.astype(F64)
    total = p + c
    bp = total - c
    resid = (p - bp) + (c - (total - bp))  # exact: total + resid == p + c
    fix = (resid != 0) & ((total.view(np.int64) & 1) == 0)
    total = np.where(fix, np.nextafter(total, np.where(resid > 0, np.inf, -np.inf)), total)  # round-to-odd
    return total.astype(F32)


def delta_weight(A, B, s, fan_in_fan_out=False):
    """``ΔW = s · B A`` exactly as PEFT computes it on CPU: the float32 sum over r in order, one fused
    multiply-add per term (``acc = fmaf(B[:, r], A[r, :], acc)``, what torch's CPU matmul does for
    LoRA's small R), then ``acc · float32(s)`` in float32. ``(N, K)``, or ``(K, N)`` for Conv1D /
    Embedding layouts. The C kernel ``minilora_lora_merge`` computes the same bits.

    This fixes the summation order instead of accumulating in float64: ΔW's order is part of what a
    merge must reproduce to be bit-identical with PEFT (docs/merge.md, "ΔW and summation order").
    """
    A, B = np.asarray(A), np.asarray(B)
    if A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"need A (R, K) and B (N, R) with the same R, got A {A.shape}, B {B.shape}")
    A, B = A.astype(F32), B.astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported by the merge check
        acc = np.zeros((B.shape[0], A.shape[1]), F32)  # (N, K)
        for r in range(A.shape[0]):
            acc = fma_f32(B[:, r:r + 1], A[r:r + 1, :], acc)  # (N, K)
        delta = acc * F32(s)  # (N, K)
    return delta.T if fan_in_fan_out else delta  # (K, N) when fan_in_fan_out


def check_float_weight(W):
    """TypeError unless W is a float16 / bfloat16 / float32 ndarray, as the C kernels say. A merge computes in
    float32 (PEFT's merge of a float32 or 16-bit model), so a float64 W, which it would round to float32 first
    (not even ``scale 0`` the identity), is refused rather than changed."""
    dtype = getattr(W, "dtype", None)
    if not isinstance(W, np.ndarray) or dtype not in (np.dtype(F32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        raise TypeError(f"W must be a float32 / float16 / bfloat16 ndarray, got "
                        f"{dtype if dtype is not None else type(W).__name__}")


def _check_finite(out, W, what):
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(out.astype(F64)) & np.isfinite(np.asarray(W, dtype=F64))  # (a float64 W may exceed float32)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} produced {int(bad.sum())} NaN/inf values (first at index {first}) "
                         f"from finite base weights; the adapter or --scale is too large for {out.dtype}")


def merge_weight(W, A, B, s, fan_in_fan_out=False):
    """``W' = round_to_dtype(float32(W) + ΔW)``: one rounding (PEFT's default merge), in W's dtype.

    Raises ValueError if the merge turns finite weights into NaN/inf, TypeError for a W that is not a float
    array (an integer W would wrap around or truncate). W is not modified.
    """
    check_float_weight(W)
    check_lora_shapes(W, A, B, fan_in_fan_out)
    with np.errstate(over="ignore"):  # overflow to inf is reported by _check_finite
        out = (W.astype(F32) + delta_weight(A, B, s, fan_in_fan_out)).astype(W.dtype)  # W's shape
    _check_finite(out, W, "merge")
    return out


def merge_weight_safe(W, A, B, s, fan_in_fan_out=False):
    """PEFT's ``safe_merge``: ``round(W + round(ΔW))``, two roundings; offered for comparison only."""
    check_float_weight(W)
    check_lora_shapes(W, A, B, fan_in_fan_out)
    delta = delta_weight(A, B, s, fan_in_fan_out).astype(W.dtype)
    out = (W.astype(F32) + delta.astype(F32)).astype(W.dtype)
    _check_finite(out, W, "safe merge")
    return out


def unmerge_weight(W_merged, A, B, s, fan_in_fan_out=False):
    """``W = round_to_dtype(float32(W') − ΔW)``. Exact up to rounding in float32; in bf16 / fp16 it is
    NOT an exact inverse of ``merge_weight`` (measure the round trip, see docs/merge.md)."""
    check_float_weight(W_merged)
    check_lora_shapes(W_merged, A, B, fan_in_fan_out)
    out = (W_merged.astype(F32) - delta_weight(A, B, s, fan_in_fan_out)).astype(W_merged.dtype)
    _check_finite(out, W_merged, "unmerge")
    return out


def embedding_forward(idx, W, A, B, s):
    """Embedding LoRA: ``y = W[idx] + s · A[:, idx]ᵀ Bᵀ`` in float64. ``idx (M,)`` → ``y (M, d)``."""
    V, d = W.shape
    if A.shape[1] != V or B.shape[0] != d or A.shape[0] != B.shape[1]:
        raise ValueError(f"Embedding W (V, d) = {W.shape} needs A (R, {V}) and B ({d}, R), "
                         f"got A {A.shape} and B {B.shape}")
    idx = np.asarray(idx)
    a = np.asarray(A, F64)[:, idx].T  # (M, R)
    return np.asarray(W, F64)[idx] + s * (a @ np.asarray(B, F64).T)  # (M, d)


def embedding_delta(A, B, s):
    """Embedding ``ΔW = s · (B A)ᵀ`` of shape ``(V, d)``, computed as ``delta_weight`` does."""
    return delta_weight(A, B, s, fan_in_fan_out=True)  # (V, d)
