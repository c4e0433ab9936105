"""Properties of the DoRA reference (minilora.dora), checked with hypothesis.

``W_eff = (m / n)[:, None] ⊙ (W + s·B A)`` with ``n`` the per-output-row norm, detached.
Bounds: float64 sums err by γ_n (u = 2⁻⁵³); each float32 step by u = 2⁻²⁴.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import dora, lora

F32, F64 = np.float32, np.float64
U32 = 2.0 ** -24
SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65])
RANKS = st.sampled_from([1, 2, 3, 4, 8, 16])
SCALES = st.sampled_from([0.5, 1.0, 2.0, 16 / 8 ** 0.5, 3.0])


def gamma(n, u=2.0 ** -53):
    return n * u / (1 - n * u)


@st.composite
def problems(draw):
    """x (M, K), W (N, K) float32, A (R, K), B (N, R), s, m (N,) positive."""
    M, K, N, R = draw(SIZES), draw(SIZES), draw(SIZES), draw(RANKS)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    W = (rng.standard_normal((N, K)) * 0.5).astype(F32)  # (N, K)
    A = (rng.uniform(-1, 1, (R, K)) / np.sqrt(K)).astype(F32)  # (R, K)
    B = (rng.standard_normal((N, R)) * 0.3).astype(F32)  # (N, R)
    x = rng.standard_normal((M, K)).astype(F32)  # (M, K)
    s = draw(SCALES)
    m = (lora_free_norm(W, A, B, s) * rng.uniform(0.5, 1.5, N)).astype(F32)  # (N,)
    return x, W, A, B, s, m


def lora_free_norm(W, A, B, s):
    Wd = W.astype(F64) + s * (B.astype(F64) @ A.astype(F64))  # (N, K)
    return np.sqrt((Wd ** 2).sum(1))  # (N,)


def abs_adapted(W, A, B, s):
    return np.abs(W).astype(F64) + abs(s) * (np.abs(B).astype(F64) @ np.abs(A).astype(F64))  # (N, K)


@given(problems())
def test_magnitude_is_the_row_norm_of_the_adapted_weight(p):
    _, W, A, B, s, _ = p
    m = dora.dora_magnitude(W, A, B, s)
    assert m.shape == (W.shape[0],) and m.dtype == F32
    # float32 ΔW (2 roundings) and W + ΔW (1), then a float64 norm rounded once
    err = np.sqrt(((gamma(3, U32) * abs_adapted(W, A, B, s)) ** 2).sum(1)) + U32 * m
    assert (np.abs(m - lora_free_norm(W, A, B, s)) <= err * (1 + 1e-6)).all()
    # with B = 0 (the initialisation) it is the norm of W's rows
    B0 = np.zeros_like(B)
    assert np.array_equal(dora.dora_magnitude(W, A, B0, s), np.sqrt((W.astype(F64) ** 2).sum(1)).astype(F32))


@given(problems())
def test_forward_with_initial_magnitude_is_plain_lora(p):
    """m = n makes every factor exactly 1, so DoRA is LoRA."""
    x, W, A, B, s, _ = p
    m = dora.dora_magnitude(W, A, B, s)
    y, ref = dora.dora_forward(x, W, A, B, s, m), lora.lora_forward(x, W, A, B, s)
    assert (np.abs(y - ref) <= gamma(4) * np.abs(ref)).all()


@given(problems())
def test_merge_then_forward_equals_dora_forward(p):
    x, W, A, B, s, m = p
    Wm, n = dora.dora_merge_weight(W, A, B, s, m)
    assert Wm.dtype == F32 and Wm.shape == W.shape
    assert np.array_equal(n, dora.dora_magnitude(W, A, B, s))  # the norm of merge time
    ref = dora.dora_forward(x, W, A, B, s, m)  # (M, N)
    out = x.astype(F64) @ Wm.astype(F64).T  # (M, N)
    f = (m.astype(F64) / n)[:, None]  # (N, 1)
    K, R = A.shape[1], A.shape[0]
    # |W' − f(W + sBA)| ≤ f·(γ₃·|W + sBA|) + f·2u·|W + sBA| (the rounded factor and the product)
    err_w = f * gamma(5, U32) * abs_adapted(W, A, B, s)  # (N, K)
    ax = np.abs(x).astype(F64)
    bound = ax @ err_w.T + gamma(K + R + 4) * (ax @ (f * abs_adapted(W, A, B, s)).T)
    assert (np.abs(out - ref) <= bound).all()


@given(problems())
def test_unmerge_of_merge_float32(p):
    _, W, A, B, s, m = p
    Wm, n = dora.dora_merge_weight(W, A, B, s, m)
    back = dora.dora_unmerge_weight(Wm, A, B, s, m, n)
    # merge: W' = f̂·fl(W + Δ)·(1 + δ), |δ| ≤ u; unmerge: W'/f̂ to u, − Δ to u, Δ itself to 2u
    bound = gamma(4, U32) * abs_adapted(W, A, B, s) + U32 * np.abs(back)
    assert (np.abs(back.astype(F64) - W) <= bound).all()


@given(problems())
def test_fan_in_fan_out_is_the_transposed_layout(p):
    x, W, A, B, s, m = p
    Wt = np.ascontiguousarray(W.T)  # (K, N)
    assert np.array_equal(dora.dora_magnitude(Wt, A, B, s, True), dora.dora_magnitude(W, A, B, s))
    Wm, n = dora.dora_merge_weight(W, A, B, s, m)
    Wmt, nt = dora.dora_merge_weight(Wt, A, B, s, m, True)
    assert np.array_equal(Wmt, Wm.T) and np.array_equal(n, nt)
    assert np.array_equal(dora.dora_unmerge_weight(Wmt, A, B, s, m, n, True),
                          dora.dora_unmerge_weight(Wm, A, B, s, m, n).T)
    y, yt = dora.dora_forward(x, W, A, B, s, m), dora.dora_forward(x, Wt, A, B, s, m, fan_in_fan_out=True)
    assert (np.abs(y - yt) <= 2 * gamma(A.shape[1] + A.shape[0] + 4) * (np.abs(x) @ abs_adapted(W, A, B, s).T)
            * np.abs(m / n)).all()


@given(problems())
def test_bias_is_added_after_the_scaling(p):
    x, W, A, B, s, m = p
    b = np.linspace(-1, 1, W.shape[0]).astype(F32)
    y0, yb = dora.dora_forward(x, W, A, B, s, m), dora.dora_forward(x, W, A, B, s, m, bias=b)
    assert np.allclose(yb - y0, b, rtol=0, atol=4 * gamma(1) * (np.abs(y0).max() + 1))


def test_bad_shapes_raise_value_error():
    W, A, B = np.ones((5, 4), F32), np.ones((2, 4), F32), np.ones((5, 2), F32)
    m = np.ones(5, F32)
    with pytest.raises(ValueError, match="magnitude"):
        dora.dora_merge_weight(W, A, B, 1.0, np.ones(4, F32))
    with pytest.raises(ValueError):
        dora.dora_forward(np.ones((3, 4)), W, A, B, 1.0, np.ones(4, F32))
    with pytest.raises(ValueError):
        dora.dora_forward(np.ones((3, 5)), W, A, B, 1.0, m)
    with pytest.raises(ValueError):
        dora.dora_magnitude(W, np.ones((2, 3), F32), B, 1.0)
    with pytest.raises(ValueError):
        dora.dora_unmerge_weight(W, A, np.ones((4, 2), F32), 1.0, m, m)
