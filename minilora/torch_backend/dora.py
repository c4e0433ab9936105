"""DoRA in torch: transcriptions of ``minilora.dora``.

``W_eff = (m / n)[:, None] ⊙ (W + s·B A)`` with ``n = ‖W + s·B A‖`` per output row, detached (no gradient
through n). Liu et al. 2024, "DoRA", §4.1 and §4.3; PEFT 0.21 ``DoraLinearLayer``.

Shape legend: ``x (..., K)``, ``W (N, K)``, ``A (R, K)``, ``B (N, R)``, ``m (N,)``, ``y (..., N)``.
The row norm accumulates in float64 and is rounded once to float32, as the reference does. Not here:
DoRA for Embedding / Conv layers.
"""
import torch
import torch.nn.functional as F

from minilora.lora import check_lora_shapes
from minilora.torch_backend import lora as torch_lora  # a cycle: each module uses the other at call time only


def _row_norm(Wd):
    """Transcribes ``minilora.dora._row_norm``: per-row L2 norm of ``Wd (N, K)`` in float64, then float32."""
    return torch.linalg.vector_norm(Wd.to(torch.float64), dim=1).to(torch.float32)  # (N,)


def _adapted(W, A, B, s, fan_in_fan_out):
    """Transcribes ``minilora.dora._adapted``: ``W + ΔW`` in float32, ``(N, K)`` layout."""
    Wd = W.to(torch.float32) + torch_lora.delta_weight(A, B, s, fan_in_fan_out)  # W's layout
    return Wd.T if fan_in_fan_out else Wd  # (N, K)


def dora_magnitude(W, A, B, s, fan_in_fan_out=False):
    """Transcribes ``minilora.dora.dora_magnitude``: ``m = ‖W + s·B A‖`` per output row, float32 ``(N,)``."""
    check_lora_shapes(W, A, B, fan_in_fan_out)
    return _row_norm(_adapted(W, A, B, s, fan_in_fan_out))  # (N,)


def dora_forward(x, W, A, B, s, m, bias=None, fan_in_fan_out=False):
    """Transcribes ``minilora.dora.dora_forward``: ``y = (m/n) ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ) + b``, n detached.

    Runs in float32 (or the dtype of x if wider). x (..., K) -> y (..., N).
    """
    check_lora_shapes(W, A, B, fan_in_fan_out)
    n = _row_norm(_adapted(W.detach(), A.detach(), B.detach(), s, fan_in_fan_out))  # (N,) a constant
    factor = m / n  # (N,)
    Wb = W.T if fan_in_fan_out else W  # (N, K)
    base = x @ Wb.T  # (..., N)
    lora = s * ((x @ A.T) @ B.T)  # (..., N)
    y = factor * (base + lora)  # (..., N)
    return y if bias is None else y + bias


def add_dora(base_out, x, x_dropped, W, bias, A, B, s, m):
    """DoRA added to a base layer's output ``base_out = x Wᵀ + b``, rounded once to its dtype (PEFT order).

    Without dropout (``x_dropped`` None) this is ``dora_forward``: ``(m/n) ⊙ (base_out − b + s·lora) + b``.
    With dropout, spec §3: ``base_out + (m/n − 1) ⊙ (x_d Wᵀ) + (m/n) ⊙ s·(x_d Aᵀ)Bᵀ``.
    """
    n = _row_norm(_adapted(W.detach(), A.detach(), B.detach(), s, False))  # (N,) a constant
    factor = m / n  # (N,) float32
    xl = (x if x_dropped is None else x_dropped).to(A.dtype)  # (..., K)
    lora = ((xl @ A.T) @ B.T) * s  # (..., N)
    if x_dropped is None:
        base = base_out if bias is None else base_out - bias  # (..., N)
        y = factor * (base + lora)  # (..., N)
        y = y if bias is None else y + bias
    else:
        base_d = F.linear(x_dropped.to(W.dtype), W).to(A.dtype)  # (..., N)
        y = base_out + (factor - 1) * base_d + factor * lora  # (..., N)
    return y.to(base_out.dtype)


def dora_merge_weight(W, A, B, s, m, fan_in_fan_out=False):
    """Transcribes ``minilora.dora.dora_merge_weight``: ``(W', n)`` with ``W' = (m / n)[:, None] ⊙ (W + ΔW)``
    rounded once to W's dtype; keep ``n`` to unmerge."""
    N, _, _ = check_lora_shapes(W, A, B, fan_in_fan_out)
    if tuple(m.shape) != (N,):
        raise ValueError(f"DoRA magnitude must have shape ({N},), got {tuple(m.shape)}")
    Wd = _adapted(W, A, B, s, fan_in_fan_out)  # (N, K)
    n = _row_norm(Wd)  # (N,)
    factor = m.to(torch.float32) / n  # (N,)
    out = factor[:, None] * Wd  # (N, K)
    out = (out.T if fan_in_fan_out else out).to(W.dtype)  # W's layout
    torch_lora.check_finite(out, W, "DoRA merge")
    return out, n


def dora_unmerge_weight(W_merged, A, B, s, m, n, fan_in_fan_out=False):
    """Transcribes ``minilora.dora.dora_unmerge_weight``: ``W = W' / (m / n)[:, None] − ΔW``, float32."""
    check_lora_shapes(W_merged, A, B, fan_in_fan_out)
    factor = m.to(torch.float32) / n.to(torch.float32)  # (N,)
    Wm = W_merged.to(torch.float32)
    Wm = Wm.T if fan_in_fan_out else Wm  # (N, K)
    out = Wm / factor[:, None]  # (N, K)
    out = (out.T if fan_in_fan_out else out) - torch_lora.delta_weight(A, B, s, fan_in_fan_out)  # W's layout
    out = out.to(W_merged.dtype)
    torch_lora.check_finite(out, W_merged, "DoRA unmerge")
    return out
