"""DoRA (weight-decomposed LoRA): the NumPy reference.

``W_eff = (m / n)[:, None] ⊙ (W + s·B A)`` with ``n = ‖W + s·B A‖`` per output row (norm over the input
dim), ``n`` treated as a constant (no gradient through it). Liu et al. 2024, "DoRA", §4.1 and §4.3
(the detached norm). PEFT 0.21 ``DoraLinearLayer``.

Shape legend: ``x (M, K)``, ``W (N, K)``, ``A (R, K)``, ``B (N, R)``, ``m (N,)``, ``y (M, N)``.
Layouts with ``fan_in_fan_out`` store ``W (K, N)``; the norm is still per output feature.

Element-wise steps follow PEFT in float32; the norm is a reduction and accumulates in float64 before
one rounding to float32. Not here: DoRA for Embedding / Conv layers, dropout masks.
"""
import numpy as np

from minilora.lora import F32, F64, _check_finite, check_float_weight, check_lora_shapes, delta_weight


def _row_norm(Wd):
    """Per-output-row L2 norm of ``Wd (N, K)``, accumulated in float64, rounded once to float32."""
    Wd = Wd.astype(F64)
    return np.sqrt(np.sum(Wd * Wd, axis=1)).astype(F32)  # (N,)


def _adapted(W, A, B, s, fan_in_fan_out):
    """``W + ΔW`` in float32 in ``(N, K)`` layout (one float32 rounding, as PEFT adds them)."""
    Wd = W.astype(F32) + delta_weight(A, B, s, fan_in_fan_out)  # W's layout
    return Wd.T if fan_in_fan_out else Wd  # (N, K)


def dora_magnitude(W, A, B, s, fan_in_fan_out=False):
    """The magnitude vector at initialisation: ``m = ‖W + s·B A‖`` per output row, float32 ``(N,)``."""
    check_lora_shapes(W, A, B, fan_in_fan_out)
    return _row_norm(_adapted(W, A, B, s, fan_in_fan_out))  # (N,)


def dora_forward(x, W, A, B, s, m, bias=None, fan_in_fan_out=False):
    """``y = x W_effᵀ + b`` with the detached norm, float64. ``x (M, K)`` → ``y (M, N)``.

    Equals PEFT's ``(m/n − 1)⊙(x Wᵀ) + (m/n)⊙s·(x Aᵀ)Bᵀ`` added to the base output ``x Wᵀ + b``.
    """
    N, K, _ = check_lora_shapes(W, A, B, fan_in_fan_out)
    x = np.asarray(x, F64)
    if x.ndim != 2 or x.shape[1] != K or np.shape(m) != (N,):
        raise ValueError(f"x must be (M, {K}) and m ({N},), got {x.shape} and {np.shape(m)}")
    n = _row_norm(_adapted(W, A, B, s, fan_in_fan_out)).astype(F64)  # (N,)
    factor = np.asarray(m, F64) / n  # (N,)
    Wb = np.asarray(W, F64).T if fan_in_fan_out else np.asarray(W, F64)  # (N, K)
    base = x @ Wb.T  # (M, N)
    lora = s * ((x @ np.asarray(A, F64).T) @ np.asarray(B, F64).T)  # (M, N)
    y = factor * (base + lora)  # (M, N)
    return y if bias is None else y + np.asarray(bias, F64)


def dora_merge_weight(W, A, B, s, m, fan_in_fan_out=False, adapted=None, norm_of=None):
    """``W' = (m / n)[:, None] ⊙ (W + ΔW)`` rounded once to W's dtype. Returns ``(W', n)``: keep ``n``,
    unmerging needs the norm of merge time (it cannot be recovered from ``W'``). ``adapted``: ``W + ΔW``
    in float32 and W's layout when the caller already has it (the C merge kernel computes the same bits).
    ``norm_of``: take ``n`` over this float32 matrix (W's layout) instead: ``W₀ + ΔW`` with W₀ the weight
    before other adapters were merged into W, as PEFT does when several adapters are merged."""
    check_float_weight(W)
    N, _, _ = check_lora_shapes(W, A, B, fan_in_fan_out)
    if np.shape(m) != (N,):
        raise ValueError(f"DoRA magnitude must have shape ({N},), got {np.shape(m)}")
    if adapted is None:
        Wd = _adapted(W, A, B, s, fan_in_fan_out)  # (N, K)
    else:
        Wd = adapted.T if fan_in_fan_out else adapted  # (N, K)
    if norm_of is not None:
        n = _row_norm(norm_of.T if fan_in_fan_out else norm_of)  # (N,)
    else:
        n = _row_norm(Wd)  # (N,)
    factor = np.asarray(m, F32) / n  # (N,)
    out = factor[:, None] * Wd  # (N, K)
    out = (out.T if fan_in_fan_out else out).astype(W.dtype)  # W's layout
    _check_finite(out, W, "DoRA merge")
    return out, n


def dora_unmerge_weight(W_merged, A, B, s, m, n, fan_in_fan_out=False):
    """``W = W' / (m / n)[:, None] − ΔW`` in float32, rounded to W's dtype; ``n`` from merge time."""
    check_lora_shapes(W_merged, A, B, fan_in_fan_out)
    factor = np.asarray(m, F32) / np.asarray(n, F32)  # (N,)
    Wm = W_merged.astype(F32)
    Wm = Wm.T if fan_in_fan_out else Wm  # (N, K)
    out = Wm / factor[:, None]  # (N, K)
    out = (out.T if fan_in_fan_out else out) - delta_weight(A, B, s, fan_in_fan_out)  # W's layout
    out = out.astype(W_merged.dtype)
    _check_finite(out, W_merged, "DoRA unmerge")
    return out
