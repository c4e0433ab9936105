"""LoRA in torch: transcriptions of ``minilora.lora`` and ``LoraLinear``, a trainable adapter on a frozen Linear.

``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` with ``s = alpha / r`` (rsLoRA: ``alpha / √r``); Hu et al. 2021 §4.1,
Kalajdzievski 2023 §3. As in PEFT 0.21, the base output keeps the base dtype, the LoRA branch runs in the
adapter dtype (float32) and the sum is rounded once to the base dtype (``shared/spec/lora.md`` §1).

Shape legend: ``x (..., K)``, ``W (N, K)`` (Conv1D: ``(K, N)``), ``A (R, K)``, ``B (N, R)``, ``y (..., N)``.

``LoraLinear`` holds no "merged" state: ``merged()`` returns a new ``nn.Linear`` and the base is never
modified. ``lora_backward`` writes the gradients out; ``LoraLinearFunction`` (one layer) and
``LoraGroupFunction`` (q/k/v or gate/up on one x, via ``grouped_forward``) compute them by hand in
float32 training, the fast path of docs/train.md; everything else (DoRA, NF4 bases, autocast) goes
through autograd on ``add_lora``. Not here: DoRA math (``minilora.torch_backend.dora``), the NF4 base (``minilora.torch_backend.qlora``),
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


class LoraLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ`` for a frozen ``W`` and ``b``, with a hand-written backward.

    The same products as autograd takes through ``F.linear`` + ``add_lora`` (so the same rounding bounds),
    but each matmul in the layout the CPU BLAS runs fastest for these skinny shapes (``∂L/∂B = s·(hᵀg)ᵀ``
    rather than ``s·gᵀh``, ``gB = (Bᵀgᵀ)ᵀ``, ``∂L/∂A = s·(gB)ᵀx_d``: 2–6× faster each on the M = 1024,
    R = 8 products of bench/train.py), the low-rank terms added in place into the base products
    (``addmm_``), so no extra (M, N) or (M, K) temporary is made, and only ``x_d``, ``W``, ``A``, ``B``, ``h``
    saved. ``x_d`` is ``x`` after dropout; None (no dropout) means ``x`` itself, and then ``∂L/∂x`` gets
    both terms in one tensor. Shapes: ``x, x_d (M, K)``, ``W (N, K)``, ``b (N,)`` or None, ``A (R, K)``,
    ``B (N, R)`` -> ``y (M, N)``; ``h = x_d Aᵀ (M, R)``, ``gB = g B (M, R)``.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, x_d=None):
        xa = x if x_d is None else x_d  # (M, K)
        h = xa @ A.T  # (M, R)
        y = F.linear(x, W, b).addmm_(h, B.T, alpha=s)  # (M, N)
        ctx.save_for_backward(xa, W, A, B, h)
        ctx.s, ctx.dropped = s, x_d is not None
        return y

    @staticmethod
    def backward(ctx, g):  # g (M, N)
        xa, W, A, B, h = ctx.saved_tensors
        need = ctx.needs_input_grad  # x, W, b, A, B, s, x_d
        s = ctx.s
        gB = (B.T @ g.T).T  # (M, R)
        grad_A = (gB.T @ xa).mul_(s) if need[3] else None  # (R, K)
        grad_B = (h.T @ g).T.mul_(s) if need[4] else None  # (N, R)
        grad_x = g @ W if need[0] else None  # (M, K)
        grad_xd = None
        if ctx.dropped and need[6]:
            grad_xd = (gB @ A).mul_(s)  # (M, K)
        elif not ctx.dropped and need[0]:
            grad_x.addmm_(gB, A, alpha=s)  # (M, K)
        return grad_x, None, None, grad_A, grad_B, None, grad_xd


class LoraGroupFunction(torch.autograd.Function):
    """n LoRA Linears reading the same ``x`` (q/k/v; gate/up) as ``LoraLinearFunction`` each, but with their
    A matrices stacked (``A_cat (ΣR, K)``): one ``h = x A_catᵀ``, one ``∂L/∂A_cat = (s·gB)_catᵀ x`` and one
    low-rank term ``(s·gB)_cat A_cat`` of ``∂L/∂x``, instead of n of each (the skinny products are bound by
    reading x, so one pass instead of n saves most of their time); the n base terms of ``∂L/∂x`` are
    accumulated in place (``addmm_``), where autograd would add n separate (M, K) tensors. No dropout
    (each layer has its own mask then). ``forward(x (M, K), scales, W_1..W_n, b_1..b_n, A_1..A_n,
    B_1..B_n)`` -> ``(y_1 (M, N_1), ..., y_n)``.
    """

    @staticmethod
    def forward(ctx, x, scales, *tensors):
        n = len(scales)
        Ws, bs, As, Bs = (tensors[i * n:(i + 1) * n] for i in range(4))
        A_cat = torch.cat(As)  # (ΣR, K)
        h = x @ A_cat.T  # (M, ΣR)
        outs, off = [], 0
        for W, b, B, s in zip(Ws, bs, Bs, scales):
            R = B.shape[1]
            outs.append(F.linear(x, W, b).addmm_(h[:, off:off + R], B.T, alpha=s))  # (M, N_i)
            off += R
        ctx.save_for_backward(x, A_cat, h, *Ws, *Bs)
        ctx.scales = scales
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs):  # gs: (M, N_i) each
        x, A_cat, h, *WB = ctx.saved_tensors
        scales = ctx.scales
        n = len(scales)
        Ws, Bs = WB[:n], WB[n:]
        M, RR = h.shape
        gBT = torch.empty(RR, M, dtype=h.dtype, device=h.device)  # (ΣR, M): rows of s_i·(g_i B_i)ᵀ
        grad_x, grad_Bs, off = None, [], 0
        for g, W, B, s in zip(gs, Ws, Bs, scales):  # an unused output's g is zeros (materialised)
            R = B.shape[1]
            torch.mm(B.T, g.T, out=gBT[off:off + R]).mul_(s)  # (R, M)
            grad_Bs.append((h[:, off:off + R].T @ g).T.mul_(s))  # (N_i, R)
            if ctx.needs_input_grad[0]:
                grad_x = g @ W if grad_x is None else grad_x.addmm_(g, W)  # (M, K)
            off += R
        grad_A = gBT @ x  # (ΣR, K)
        if grad_x is not None:
            grad_x.addmm_(gBT.T, A_cat)  # (M, K)
        grad_As = list(grad_A.split([B.shape[1] for B in Bs]))
        return (grad_x, None, *([None] * (2 * n)), *grad_As, *grad_Bs)


def fused_functions_allowed():
    """The hand-written autograd Functions (``LoraLinearFunction``, ``LoraGroupFunction``, ``RMSNormFunction``)
    serve eager code only. Inside ``torch.compile`` the layers take the plain autograd statements, which
    Inductor fuses itself. Measured on torch 2.11 (an H100 machine, 2026-11-23): with the Functions traced into
    compiled blocks, float32 training did not learn at all (the LoRA weights kept their initial values:
    AdamW and SGD gave the same losses), while torch 2.13 traced them correctly."""
    return not torch.compiler.is_compiling()


def grouped_forward(x, layers):
    """``[layer(x) for layer in layers]``; LoRA layers that qualify for ``LoraLinearFunction`` (and have no
    active dropout) run together as one ``LoraGroupFunction``. ``x (..., K)`` -> ``[(..., N_i)]``."""
    if len(layers) < 2 or not all(isinstance(m, LoraLinear) and m._fused_ok(x) and not m._dropout_active()
                                  for m in layers):
        return [m(x) for m in layers]
    shape = x.shape
    tensors = ([m.base.weight for m in layers] + [m.base.bias for m in layers] + [m.lora_A for m in layers]
               + [m.lora_B for m in layers])
    outs = LoraGroupFunction.apply(x.reshape(-1, shape[-1]), tuple(m.scaling for m in layers), *tensors)
    return [y.view(*shape[:-1], y.shape[-1]) for y in outs]


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
        dropped = self._dropout_active()
        x_d = self.dropout(x)  # (..., K)
        if self._fused_ok(x):
            shape = x.shape
            y = LoraLinearFunction.apply(x.reshape(-1, shape[-1]), self.base.weight, self.base.bias, self.lora_A,
                                         self.lora_B, self.scaling, x_d.reshape(-1, shape[-1]) if dropped else None)
            return y.view(*shape[:-1], y.shape[-1])  # (..., N)
        if self.lora_magnitude is None:
            return add_lora(self.base(x), x_d, self.lora_A, self.lora_B, self.scaling)
        return dora.add_dora(self.base(x), x, x_d if dropped else None, self.base_weight(),
                             getattr(self.base, "bias", None), self.lora_A, self.lora_B, self.scaling,
                             self.lora_magnitude)

    def _dropout_active(self):
        return isinstance(self.dropout, nn.Dropout) and self.training

    def _fused_ok(self, x):
        """``LoraLinearFunction`` applies: plain LoRA on a frozen ``nn.Linear``, all in A's dtype, no autocast,
        not inside ``torch.compile`` (see ``fused_functions_allowed``)."""
        base = self.base
        return (fused_functions_allowed() and self.lora_magnitude is None and type(base) is nn.Linear
                and x.dim() >= 1 and x.dtype == base.weight.dtype == self.lora_A.dtype
                and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
                and not torch.is_autocast_enabled(x.device.type))

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
