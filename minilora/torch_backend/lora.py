"""LoRA in torch: transcriptions of ``minilora.lora`` and ``LoraLinear``, a trainable adapter on a frozen Linear.

``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with ``s = alpha / r`` (rsLoRA: ``alpha / √r``); Hu et al. 2021 §4.1,
Kalajdzievski 2023 §3. As in PEFT 0.21, the base output keeps the base dtype, the LoRA branch runs in the
adapter dtype (float32) and the sum is rounded once to the base dtype (``shared/spec/lora.md`` §1).

Shape legend: ``x (..., K)``, ``W (N, K)`` (Conv1D: ``(K, N)``), ``A (R, K)``, ``B (N, R)``, ``y (..., N)``.

``LoraLinear`` holds no "merged" state: ``merged()`` returns a new ``nn.Linear`` and the base is never
modified. Gradients come from autograd; ``lora_backward`` writes them out for kernel authors and tests.
Not here: DoRA math (``minilora.torch_backend.dora``), the NF4 base (``minilora.torch_backend.qlora``),
choosing which layers to adapt (``minilora.torch_backend.adapters``).
"""
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from minilora.lora import check_lora_shapes, scaling  # noqa: F401  (scaling: same function, no tensors)
from minilora.torch_backend import dora


def init_lora(K, N, R, method="kaiming", generator=None, device=None):
    """Transcribes ``minilora.lora.init_lora`` with torch's RNG: float32 ``(A (R, K), B (N, R))``, B = 0.

    ``kaiming``: A ~ U(−1/√K, 1/√K); ``gaussian``: A ~ N(0, 1/R).
    """
    A = torch.empty(R, K, device=device)  # (R, K)
    if method == "kaiming":
        bound = 1.0 / math.sqrt(K)
        A.uniform_(-bound, bound, generator=generator)
    elif method == "gaussian":
        A.normal_(0.0, 1.0 / R, generator=generator)
    else:
        raise ValueError(f"init method must be 'kaiming' or 'gaussian', got {method!r}")
    return A, torch.zeros(N, R, device=device)


def _float32(s):
    """The Python float holding float32(s) exactly: ``t * _float32(s)`` is the reference's ``t * F32(s)``."""
    return float(np.float32(s))


def add_lora(base_out, x, A, B, s):
    """``base_out + s · (x Aᵀ) Bᵀ``: the branch in A's dtype, the sum rounded once to ``base_out``'s dtype.

    PEFT's ``lora.Linear.forward`` order: ``lora_B(lora_A(x)) * scaling`` added to the base result.
    When the base output is already in A's dtype (float32 training on CPU), the scale and the add run
    inside one GEMM (``addmm``: ``base + s·(h Bᵀ)``), which saves two passes over (M, N) forward and
    backward (−12 % step time measured by bench/train.py) and rounds once fewer, inside the same bound.
    """
    h = x.to(A.dtype) @ A.T  # (..., R)
    if base_out.dtype == A.dtype and base_out.dim() >= 2:
        out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), h.reshape(-1, h.shape[-1]), B.T, alpha=s)  # (M, N)
        return out.view(base_out.shape)  # (..., N)
    return (base_out + (h @ B.T) * s).to(base_out.dtype)  # (..., N)


def lora_forward(x, W, A, B, s, bias=None, fan_in_fan_out=False):
    """Transcribes ``minilora.lora.lora_forward``: ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ``. x (..., K) -> y (..., N)."""
    check_lora_shapes(W, A, B, fan_in_fan_out)
    base = F.linear(x, W.T if fan_in_fan_out else W, bias)  # (..., N)
    return add_lora(base, x, A, B, s)


def lora_backward(x, W, A, B, s, grad_y, fan_in_fan_out=False):
    """Transcribes ``minilora.lora.lora_backward``: ``(grad_x (M, K), grad_A (R, K), grad_B (N, R))``.

    With ``h = x Aᵀ`` and ``g = ∂L/∂y``: ``∂L/∂B = s·gᵀh``, ``∂L/∂A = s·(gB)ᵀx``, ``∂L/∂x = gW + s·(gB)A``.
    """
    check_lora_shapes(W, A, B, fan_in_fan_out)
    h = x @ A.T  # (M, R)
    gB = grad_y @ B  # (M, R)
    grad_B = s * (grad_y.T @ h)  # (N, R)
    grad_A = s * (gB.T @ x)  # (R, K)
    grad_x = grad_y @ (W.T if fan_in_fan_out else W) + s * (gB @ A)  # (M, K)
    return grad_x, grad_A, grad_B


def delta_weight(A, B, s, fan_in_fan_out=False):
    """Transcribes ``minilora.lora.delta_weight``: ``BA`` accumulated in float64, rounded once to float32,
    then times float32(s) in float32. ``(N, K)``, or ``(K, N)`` with ``fan_in_fan_out``."""
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"need A (R, K) and B (N, R) with the same R, got A {tuple(A.shape)}, B {tuple(B.shape)}")
    BA = (B.to(torch.float64) @ A.to(torch.float64)).to(torch.float32)  # (N, K)
    delta = BA * _float32(s)  # (N, K)
    return delta.T if fan_in_fan_out else delta


def check_finite(out, W, what):
    """Transcribes ``minilora.lora._check_finite``: ValueError if finite base weights became NaN/inf."""
    bad = ~torch.isfinite(out.float()) & torch.isfinite(W.float())
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"{what} produced {int(bad.sum())} NaN/inf values (first at index {first}) "
                         f"from finite base weights; the adapter or --scale is too large for {out.dtype}")


def merge_weight(W, A, B, s, fan_in_fan_out=False):
    """Transcribes ``minilora.lora.merge_weight``: ``W' = round_to_dtype(float32(W) + ΔW)``, one rounding."""
    check_lora_shapes(W, A, B, fan_in_fan_out)
    out = (W.to(torch.float32) + delta_weight(A, B, s, fan_in_fan_out)).to(W.dtype)  # W's shape
    check_finite(out, W, "merge")
    return out


def unmerge_weight(W_merged, A, B, s, fan_in_fan_out=False):
    """Transcribes ``minilora.lora.unmerge_weight``: ``W = round_to_dtype(float32(W') − ΔW)``."""
    check_lora_shapes(W_merged, A, B, fan_in_fan_out)
    out = (W_merged.to(torch.float32) - delta_weight(A, B, s, fan_in_fan_out)).to(W_merged.dtype)
    check_finite(out, W_merged, "unmerge")
    return out


class LoraLinear(nn.Module):
    """A frozen ``base`` Linear plus a trainable low-rank update (optionally rsLoRA, DoRA, dropout).

    Parameters: ``lora_A (R, K)``, ``lora_B (N, R)`` (float32, B = 0 at init so the layer starts as its
    base), and with DoRA ``lora_magnitude (N,)`` initialised to the row norms of W. ``parameters()``
    with ``requires_grad`` are exactly the adapter's, so a trainer can hand them to an optimizer.
    """

    def __init__(self, base, r=8, alpha=16, dropout=0.0, use_rslora=False, use_dora=False,
                 init="kaiming", generator=None):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = scaling(alpha, r, use_rslora)
        N, K = base.out_features, base.in_features
        device = next(itertools.chain(base.parameters(), base.buffers())).device
        A, B = init_lora(K, N, r, init, generator, device)
        self.lora_A = nn.Parameter(A)  # (R, K)
        self.lora_B = nn.Parameter(B)  # (N, R)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude = None
        if use_dora:
            m = dora.dora_magnitude(self.base_weight().detach(), A, B, self.scaling)  # (N,)
            self.lora_magnitude = nn.Parameter(m)

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def base_weight(self):
        """The frozen base weight ``W (N, K)`` as the math sees it (QLoraLinear dequantises it)."""
        return self.base.weight

    def forward(self, x):
        dropped = isinstance(self.dropout, nn.Dropout) and self.training
        x_d = self.dropout(x)  # (..., K)
        if self.lora_magnitude is None:
            return add_lora(self.base(x), x_d, self.lora_A, self.lora_B, self.scaling)
        return dora.add_dora(self.base(x), x, x_d if dropped else None, self.base_weight(),
                             getattr(self.base, "bias", None), self.lora_A, self.lora_B, self.scaling,
                             self.lora_magnitude)

    def delta_weight(self):
        """``ΔW = s · B A`` (N, K) float32, as ``minilora.lora.delta_weight``."""
        return delta_weight(self.lora_A.detach(), self.lora_B.detach(), self.scaling)

    def merged_weight(self):
        """The merged weight in the base dtype (a new tensor): LoRA ``merge_weight``, DoRA ``dora_merge_weight``."""
        W, A, B = self.base_weight().detach(), self.lora_A.detach(), self.lora_B.detach()
        if self.lora_magnitude is None:
            return merge_weight(W, A, B, self.scaling)
        return dora.dora_merge_weight(W, A, B, self.scaling, self.lora_magnitude.detach())[0]

    @torch.no_grad()
    def merged(self):
        """A new ``nn.Linear`` holding the merged weight (and the base bias); this layer is unchanged."""
        W = self.merged_weight()  # (N, K)
        bias = getattr(self.base, "bias", None)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=W.device, dtype=W.dtype)
        out.weight.copy_(W)
        if bias is not None:
            out.bias.copy_(bias)
        return out.requires_grad_(False)

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.use_rslora}, "
                f"dora={self.use_dora}")
