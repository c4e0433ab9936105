"""Properties of the LoRA reference (minilora.lora), checked with hypothesis.

Bounds are derived, not tuned: an n-term float64 sum errs by at most γ_n = n·u/(1 − n·u) (u = 2⁻⁵³)
relative to the sum of absolute terms; a float32 / bf16 / fp16 rounding by u of its dtype.
Sizes hit SIMD and block tails (1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65).
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minilora import lora

F32, F64 = np.float32, np.float64
BF16 = np.dtype(ml_dtypes.bfloat16)
SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65])
RANKS = st.sampled_from([1, 2, 3, 4, 8, 16])
SCALES = st.sampled_from([0.5, 1.0, 2.0, 16 / 8 ** 0.5, 0.125, 3.0])
DTYPES = st.sampled_from([np.dtype(F32), BF16, np.dtype(np.float16)])


def u_of(dtype):
    return float(ml_dtypes.finfo(dtype).eps) / 2


def gamma(n, u=2.0 ** -53):
    return n * u / (1 - n * u)


@st.composite
def problems(draw, dtype=None):
    """A random LoRA layer: x (M, K), W (N, K) in ``dtype``, A (R, K), B (N, R) float32 (B non-zero), s."""
    M, K, N, R = draw(SIZES), draw(SIZES), draw(SIZES), draw(RANKS)
    dt = np.dtype(dtype) if dtype is not None else draw(DTYPES)
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    W = (rng.standard_normal((N, K)) * 0.5).astype(dt)  # (N, K)
    A = rng.uniform(-1, 1, (R, K)).astype(F32) / np.sqrt(K).astype(F32)  # (R, K)
    B = (rng.standard_normal((N, R)) * draw(st.sampled_from([1e-3, 0.1, 1.0]))).astype(F32)  # (N, R)
    x = rng.standard_normal((M, K)).astype(F32)  # (M, K)
    return x, W, A, B, draw(SCALES)


def abs_delta(A, B, s):
    return abs(s) * (np.abs(B).astype(F64) @ np.abs(A).astype(F64))  # (N, K)


# --- scaling and patterns ---------------------------------------------------------------------

def test_scaling_values():
    assert lora.scaling(16, 8) == 2.0
    assert lora.scaling(16, 8, use_rslora=True) == 16 / 8 ** 0.5
    assert lora.scaling(8, 4, use_rslora=True) == 4.0
    assert lora.scaling(1, 3) == 1 / 3


@pytest.mark.parametrize("r", [0, -1, 2.0, None, "8"])
def test_scaling_rejects_bad_rank(r):
    with pytest.raises(ValueError, match="rank"):
        lora.scaling(16, r)


NAME_PART = st.text(alphabet="abcdefgh_", min_size=1, max_size=5)
NAME = st.lists(st.one_of(NAME_PART, st.integers(0, 40).map(str)), min_size=1, max_size=6)


@given(NAME, st.integers(1, 6))
def test_pattern_is_a_suffix_on_dot_boundaries(parts, n):
    name = ".".join(parts)
    suffix = ".".join(parts[-n:])
    assert lora.match_pattern(name, {suffix: 4}) == suffix
    # a key that only matches part of the last component does not count
    if len(parts[-1]) > 1:
        assert lora.match_pattern(name, {parts[-1][1:]: 4}) is None
    # neither does a key that stops before the end
    if len(parts) > 1:
        assume(not parts[-1].endswith(parts[-2]) and parts[-1] != parts[-2])
        assert lora.match_pattern(name, {parts[-2]: 4}) is None


def test_pattern_examples_and_first_match_wins():
    name = "model.layers.11.self_attn.v_proj"
    assert lora.match_pattern(name, {"v_proj": 1}) == "v_proj"
    assert lora.match_pattern(name, {"self_attn.v_proj": 1}) == "self_attn.v_proj"
    assert lora.match_pattern(name, {name: 1}) == name
    assert lora.match_pattern(name, {"_proj": 1}) is None  # not on a dot boundary
    assert lora.match_pattern(name, {"self_attn": 1}) is None  # not a suffix
    assert lora.match_pattern(name, {"layers.1.self_attn.v_proj": 1}) is None  # "11" is not "1"
    assert lora.match_pattern(name, {r"layers\.1\d\..*v_proj": 1}) == r"layers\.1\d\..*v_proj"  # regex keys
    assert lora.match_pattern(name, {"attn.v_proj": 1}) is None  # "self_attn" is one component
    assert lora.match_pattern(name, {"self_attn.v_proj": 2, "v_proj": 3}) == "self_attn.v_proj"
    assert lora.match_pattern(name, {"v_proj": 3, "self_attn.v_proj": 2}) == "v_proj"
    assert lora.match_pattern(name, {}) is None and lora.match_pattern(name, None) is None
    assert lora.module_rank_alpha(name, 8, 16, {"v_proj": 4}, {"q_proj": 3}) == (4, 16)
    assert lora.module_rank_alpha(name, 8, 16, None, {"self_attn.v_proj": 3, "v_proj": 5}) == (8, 3)


# --- initialisation ---------------------------------------------------------------------------

@given(SIZES, SIZES, RANKS, st.sampled_from(["kaiming", "gaussian"]), st.integers(0, 2 ** 32 - 1))
def test_init_gives_zero_delta(K, N, R, method, seed):
    A, B = lora.init_lora(K, N, R, method, rng=seed)
    assert A.shape == (R, K) and B.shape == (N, R) and A.dtype == B.dtype == F32
    assert not B.any() and not lora.delta_weight(A, B, 2.0).any()
    if method == "kaiming":
        assert (np.abs(A) <= np.float32(1 / np.sqrt(K))).all()
    W = np.random.default_rng(seed).standard_normal((N, K)).astype(F32)  # (N, K) no zeros, so no −0 issue
    assert np.array_equal(lora.merge_weight(W, A, B, 2.0).view(np.uint32), W.view(np.uint32))


def test_init_rejects_unknown_method():
    with pytest.raises(ValueError, match="init method"):
        lora.init_lora(4, 4, 2, "pissa")


# --- merge / unmerge --------------------------------------------------------------------------

@given(problems())
def test_scale_zero_merge_is_identity(p):
    _, W, A, B, _ = p
    W = np.where(W == 0, W.dtype.type(1), W).astype(W.dtype)  # −0 + 0 = +0 is the one exception
    out = lora.merge_weight(W, A, B, 0.0)
    assert out.dtype == W.dtype and out.tobytes() == W.tobytes()


@given(problems())
def test_merged_forward_equals_unmerged_forward(p):
    """x W'ᵀ vs x Wᵀ + s(x Aᵀ)Bᵀ: W' = W + ΔW off by the roundings of BA, of ·s and of the merge."""
    x, W, A, B, s = p
    Wm = lora.merge_weight(W, A, B, s)
    ref = lora.lora_forward(x, W, A, B, s)  # (M, N)
    out = x.astype(F64) @ Wm.astype(F64).T  # (M, N)
    u = u_of(W.dtype)
    err_w = u * np.abs(Wm.astype(F64)) * (1 + 2.0 ** -23) + 2.0 ** -24 * np.abs(W.astype(F64) + abs_delta(A, B, s)) \
        + gamma(2, 2.0 ** -24) * abs_delta(A, B, s)  # (N, K) |W' − (W + sBA)|
    K, R = A.shape[1], A.shape[0]
    ax = np.abs(x).astype(F64)
    bound = ax @ err_w.T + gamma(K + R + 2) * (ax @ (np.abs(W.astype(F64)) + abs_delta(A, B, s)).T)
    assert (np.abs(out - ref) <= bound).all()


@given(problems(dtype=F32))
def test_unmerge_of_merge_float32(p):
    _, W, A, B, s = p
    Wm = lora.merge_weight(W, A, B, s)
    back = lora.unmerge_weight(Wm, A, B, s)
    # |fl(fl(W + Δ) − Δ) − W| ≤ u|W'| + u|W''|
    bound = 2.0 ** -24 * (np.abs(Wm) + np.abs(back)).astype(F64)
    assert back.dtype == F32 and (np.abs(back.astype(F64) - W) <= bound).all()


@given(problems(), st.booleans())
def test_unmerge_of_merge_low_precision_error_is_bounded(p, small_delta):
    """In bf16 / fp16 unmerge is NOT an exact inverse. Each of the two merges rounds twice (float32,
    then the dtype), so |W'' − W| ≤ ½ulp(W') + ½ulp(W'') + 2⁻²⁴(|W + ΔW| + |W' − ΔW|); when |ΔW| is
    small against |W| that is at most one ulp of W."""
    _, W, A, B, s = p
    if small_delta:
        B = (B * np.float32(1e-3)).astype(F32)
    Wm = lora.merge_weight(W, A, B, s)
    back = lora.unmerge_weight(Wm, A, B, s)
    d = lora.delta_weight(A, B, s).astype(F64)
    sp = lambda a: np.spacing(np.abs(a)).astype(F64)  # noqa: E731
    bound = (sp(Wm) + sp(back)) / 2 + 2.0 ** -24 * (np.abs(W.astype(F64) + d) + np.abs(Wm.astype(F64) - d))
    err = np.abs(back.astype(F64) - W.astype(F64))
    assert (err <= bound).all()
    if small_delta and W.dtype != np.dtype(F32):
        tiny = np.abs(d) <= np.abs(W.astype(F64)) * 2.0 ** -12  # Δ far below W's ulp: at most one ulp
        assert (err[tiny] <= sp(W)[tiny]).all()


@given(problems(dtype=F32))
def test_safe_merge_equals_merge_in_float32(p):
    _, W, A, B, s = p
    assert np.array_equal(lora.merge_weight_safe(W, A, B, s), lora.merge_weight(W, A, B, s))


@given(problems())
def test_merge_does_not_modify_inputs(p):
    _, W, A, B, s = p
    copies = [a.copy() for a in (W, A, B)]
    lora.merge_weight(W, A, B, s)
    lora.merge_weight_safe(W, A, B, s)
    lora.unmerge_weight(W, A, B, s)
    assert all(np.array_equal(a, c) for a, c in zip((W, A, B), copies))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_merge_that_overflows_raises():
    W = np.ones((2, 3), np.float16)
    A, B = np.ones((1, 3), F32), np.full((2, 1), 1e5, F32)
    with pytest.raises(ValueError, match="NaN/inf"):
        lora.merge_weight(W, A, B, 1.0)
    with pytest.raises(ValueError, match="NaN/inf"):
        lora.merge_weight_safe(W, A, B, 1.0)


# --- layouts ----------------------------------------------------------------------------------

@given(problems())
def test_conv1d_layout_is_the_transposed_linear(p):
    x, W, A, B, s = p
    Wt = np.ascontiguousarray(W.T)  # (K, N) GPT-2 Conv1D storage
    assert np.array_equal(lora.delta_weight(A, B, s, fan_in_fan_out=True), lora.delta_weight(A, B, s).T)
    assert lora.merge_weight(Wt, A, B, s, True).tobytes() == np.ascontiguousarray(lora.merge_weight(W, A, B, s).T).tobytes()
    assert lora.unmerge_weight(Wt, A, B, s, True).tobytes() == np.ascontiguousarray(lora.unmerge_weight(W, A, B, s).T).tobytes()
    ref, out = lora.lora_forward(x, W, A, B, s), lora.lora_forward(x, Wt, A, B, s, fan_in_fan_out=True)
    K, R = A.shape[1], A.shape[0]
    scale = np.abs(x).astype(F64) @ (np.abs(W.astype(F64)) + abs_delta(A, B, s)).T  # (M, N)
    assert (np.abs(out - ref) <= 2 * gamma(K + R + 2) * scale).all()
    g = np.random.default_rng(0).standard_normal(ref.shape)
    for a, b in zip(lora.lora_backward(x, W, A, B, s, g), lora.lora_backward(x, Wt, A, B, s, g, True)):
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12 * (np.abs(a).max() + 1))


@given(SIZES, SIZES, RANKS, SIZES, SCALES, st.integers(0, 2 ** 32 - 1))
def test_embedding_forward_and_delta_agree(V, d, R, M, s, seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((V, d)).astype(F32)  # (V, d)
    A, B = rng.standard_normal((R, V)).astype(F32), rng.standard_normal((d, R)).astype(F32)  # (R, V), (d, R)
    idx = rng.integers(0, V, M)  # (M,)
    y = lora.embedding_forward(idx, W, A, B, s)  # (M, d)
    delta = lora.embedding_delta(A, B, s)  # (V, d)
    assert delta.shape == (V, d) and delta.dtype == F32
    # y = (W + ΔW)[idx] up to the float32 roundings of ΔW
    err = np.abs((W.astype(F64) + delta)[idx] - y)
    # ΔW is a float32 sum of R FMAs then one scaling: γ_{R+1}(2⁻²⁴)·|s||B||A|
    assert (err <= gamma(R + 1, 2.0 ** -24) * abs_delta(A, B, s).T[idx] + gamma(R + 1) * np.abs(y)).all()
    # and Embedding LoRA is fan_in_fan_out LoRA applied to one-hot rows
    onehot = np.eye(V, dtype=F32)[idx]  # (M, V)
    y2 = lora.lora_forward(onehot, W, A, B, s, fan_in_fan_out=True)
    assert (np.abs(y2 - y) <= gamma(V + R + 2) * (np.abs(W.astype(F64))[idx] + abs_delta(A, B, s).T[idx])).all()
    assert np.array_equal(lora.merge_weight(W, A, B, s, fan_in_fan_out=True), (W + delta).astype(F32))


# --- backward ---------------------------------------------------------------------------------

@given(problems(dtype=F32), st.integers(0, 2 ** 32 - 1))
def test_backward_is_the_adjoint_of_the_forward(p, seed):
    """The layer is linear in x, in A and in B separately, so for any direction D:
    ⟨g, y(θ + D) − y(θ)⟩ = ⟨∂L/∂θ, D⟩ exactly in real arithmetic; float64 leaves γ-sized residue."""
    x, W, A, B, s = p
    rng = np.random.default_rng(seed)
    y = lora.lora_forward(x, W, A, B, s)
    g = rng.standard_normal(y.shape)  # (M, N)
    gx, gA, gB = lora.lora_backward(x, W, A, B, s, g)
    assert gx.shape == x.shape and gA.shape == A.shape and gB.shape == B.shape
    for name, grad in (("x", gx), ("A", gA), ("B", gB)):
        D = rng.standard_normal(grad.shape)
        args = {"x": x, "A": A, "B": B}
        args[name] = args[name].astype(F64) + D
        y2 = lora.lora_forward(args["x"], W, args["A"], args["B"], s)
        lhs, rhs = np.sum(g * (y2 - y)), np.sum(grad * D)
        M, K, R, N = x.shape[0], A.shape[1], A.shape[0], B.shape[0]
        big = np.abs(g).sum() * (np.abs(y2).max() + np.abs(y).max()) + np.abs(grad).sum() * np.abs(D).max()
        assert abs(lhs - rhs) <= gamma(M * N + K * R + N * K + 8) * big * 4


# --- bad input --------------------------------------------------------------------------------

def _ok():
    return np.zeros((5, 4), F32), np.zeros((2, 4), F32), np.zeros((5, 2), F32)  # W (N, K), A (R, K), B (N, R)


@pytest.mark.parametrize("bad", ["A_K", "B_N", "B_R", "W_1d", "A_3d"])
@pytest.mark.parametrize("fn", [lora.merge_weight, lora.merge_weight_safe, lora.unmerge_weight])
def test_bad_shapes_raise_value_error(fn, bad):
    W, A, B = _ok()
    W, A, B = {"A_K": (W, np.zeros((2, 3), F32), B), "B_N": (W, A, np.zeros((4, 2), F32)),
               "B_R": (W, A, np.zeros((5, 3), F32)), "W_1d": (W[0], A, B),
               "A_3d": (W, A[None], B)}[bad]
    with pytest.raises(ValueError):
        fn(W, A, B, 1.0)


def test_bad_shapes_in_forward_backward_delta_embedding():
    W, A, B = _ok()
    with pytest.raises(ValueError, match=r"x must be"):
        lora.lora_forward(np.zeros((3, 5)), W, A, B, 1.0)
    with pytest.raises(ValueError, match=r"x must be"):
        lora.lora_forward(np.zeros(4), W, A, B, 1.0)
    with pytest.raises(ValueError):
        lora.lora_backward(np.zeros((3, 4)), W, A, B, 1.0, np.zeros((3, 4)))
    with pytest.raises(ValueError):
        lora.lora_forward(np.zeros((3, 4)), W, A, B, 1.0, fan_in_fan_out=True)  # W is (N, K), not (K, N)
    with pytest.raises(ValueError):
        lora.delta_weight(A, np.zeros((5, 3), F32), 1.0)
    with pytest.raises(ValueError):
        lora.embedding_forward([0, 1], W, np.zeros((2, 4), F32), B, 1.0)  # W (V=5, d=4) needs A (R, 5)
