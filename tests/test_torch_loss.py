"""minilora.torch_backend.loss: the fused, chunked output projection + cross-entropy against a float64 NumPy
reference, within a derived float32 bound, values and gradients; chunk tails; zero weights; autocast.

Bound (u = 2^-24, γ_k = k·u / (1 − k·u)). Token i has logits z_ij = h_i·W_j, each computed in float32 with
|δ_ij| ≤ E_i = γ_H · max_j (|h_i|·|W_j|). ``loss_i = lse(z_i) − z_it`` moves by at most 2·E_i under those
errors (lse is 1-Lipschitz in the max norm). Evaluating lse in float32 (V exponentials of arguments ≤ 0,
each within 2u relative, a V-sum, a log) adds ≤ (V + 6)·u, and the two final additions 2u·(|m| + |log s| + |z_t|).
The weighted M-sum adds γ_M · Σ|w_i loss_i|. For ∂/∂h_i = w_i Σ_j (p_j − [j = t]) W_j the softmax p_j is
within relative 2E_i + (V + 8)u, and the V-sum adds γ_{V+1} · w_i Σ_j |p_j − [j = t]|·|W_j|.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from minilora.torch_backend import loss as tloss  # noqa: E402

U32 = 2.0**-24


def gamma(k):
    return k * U32 / (1 - k * U32)


def reference(h, W, t, w):
    """float64: (loss sum, ∂/∂h (M, H), per-token bounds on both)."""
    h64, W64, w64 = h.astype(np.float64), W.astype(np.float64), w.astype(np.float64)
    M, H = h.shape
    V = W.shape[0]
    z = h64 @ W64.T  # (M, V)
    m = z.max(1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(1, keepdims=True)
    zt = z[np.arange(M), t]
    loss = (m[:, 0] + np.log(s[:, 0]) - zt)  # (M,)
    p = e / s  # (M, V)
    d = p.copy()
    d[np.arange(M), t] -= 1.0
    grad = (d * w64[:, None]) @ W64  # (M, H)
    E = gamma(H) * (np.abs(h64) @ np.abs(W64).T).max(1)  # (M,)
    per_token = 2 * E + (V + 6) * U32 + 2 * U32 * (np.abs(m[:, 0]) + np.abs(np.log(s[:, 0])) + np.abs(zt))
    loss_bound = float((np.abs(w64) * per_token).sum() + gamma(M) * np.abs(w64 * loss).sum())
    rel_p = (2 * E + (V + 8) * U32)[:, None]  # (M, 1)
    grad_bound = np.abs(w64)[:, None] * ((rel_p * p) @ np.abs(W64) + gamma(V + 1) * (np.abs(d) @ np.abs(W64)))
    return float((w64 * loss).sum()), grad, loss_bound, grad_bound


@st.composite
def problems(draw):
    M, H, V = draw(st.integers(1, 40)), draw(st.sampled_from([1, 3, 8, 17, 64])), draw(st.sampled_from([2, 5, 31, 300]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 4.0]))
    h = (rng.standard_normal((M, H)) * scale).astype(np.float32)
    W = rng.standard_normal((V, H)).astype(np.float32)
    t = rng.integers(0, V, M)
    w = (rng.random(M) < 0.7).astype(np.float32)  # a loss mask with zeros
    return h, W, t, w, draw(st.sampled_from([None, 1, 3, 7]))


@settings(deadline=None, max_examples=60)
@given(p=problems())
def test_fused_loss_and_gradient_within_the_bound(p):
    h, W, t, w, chunk_rows = p
    ref_loss, ref_grad, loss_bound, grad_bound = reference(h, W, t, w)
    old = tloss.CHUNK_ELEMENTS
    tloss.CHUNK_ELEMENTS = old if chunk_rows is None else chunk_rows * W.shape[0]  # several chunks
    try:
        for fn in (tloss.linear_cross_entropy, tloss.reference_linear_cross_entropy):
            ht = torch.from_numpy(h).requires_grad_(True)
            out = fn(ht, torch.from_numpy(W), torch.from_numpy(t), torch.from_numpy(w))
            assert out.dtype == torch.float32 and out.dim() == 0
            out.backward(torch.tensor(2.0))
            value = float(out.detach())
            assert abs(value - ref_loss) <= loss_bound, (fn.__name__, value, ref_loss, loss_bound)
            err = np.abs(ht.grad.double().numpy() - 2 * ref_grad)
            assert (err <= 2 * grad_bound).all(), (fn.__name__, float((err / np.maximum(grad_bound, 1e-300)).max()))
    finally:
        tloss.CHUNK_ELEMENTS = old


def test_no_gradient_wanted_skips_it_and_masked_tokens_count_zero():
    rng = np.random.default_rng(0)
    h, W = torch.from_numpy(rng.standard_normal((6, 4)).astype(np.float32)), torch.randn(9, 4)
    t = torch.arange(6) % 9
    with torch.no_grad():
        full = tloss.linear_cross_entropy(h, W, t, torch.ones(6))
        half = tloss.linear_cross_entropy(h, W, t, torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool))
        first = tloss.linear_cross_entropy(h[:3], W, t[:3], torch.ones(3))
    assert not full.requires_grad
    assert torch.allclose(half, first, rtol=1e-6, atol=0) and float(full) > float(half) > 0


def test_trainable_projection_takes_the_unfused_path_and_gets_its_gradient():
    h, W = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    out = tloss.linear_cross_entropy(h, W, torch.arange(5), torch.ones(5))
    out.backward()
    assert W.grad is not None and h.grad is not None


def test_autocast_bfloat16_on_cpu_matches_the_unfused_path():
    torch.manual_seed(0)
    h, W = torch.randn(37, 16, dtype=torch.bfloat16), torch.randn(50, 16, dtype=torch.bfloat16)
    t, w = torch.randint(0, 50, (37,)), torch.ones(37)
    outs, grads = [], []
    for fn in (tloss.linear_cross_entropy, tloss.reference_linear_cross_entropy):
        x = h.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(x, W, t, w)
        out.backward()
        assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
        outs.append(float(out.detach()))
        grads.append(x.grad.float())
    assert abs(outs[0] - outs[1]) <= 1e-3 * abs(outs[1])
    assert torch.allclose(grads[0], grads[1], rtol=0.02, atol=0.02)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="need h"):
        tloss.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 2), torch.arange(4), torch.ones(4))
    with pytest.raises(ValueError, match="need h"):
        tloss.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.arange(3), torch.ones(3))
