"""minilora.torch_backend LoRA / DoRA / QLoRA layers against the NumPy reference (minilora.lora, minilora.dora,
minilora.nf4): forward and every gradient within derived float32 bounds; merges; dropout; errors.

Bounds. In float32 (unit roundoff u = 2^-24, γ_k = k·u / (1 − k·u)), a length-k dot product computed in any
order has |fl(a·b) − a·b| ≤ γ_k · |a|·|b| (Higham, "Accuracy and Stability of Numerical Algorithms", §3.1),
and an error carried into a later product adds its own γ; γ_a + γ_b + γ_a·γ_b ≤ γ_{a+b}. The reference runs in
float64 on the same float32 inputs; its own error (γ_k with u = 2^-53) is below 1e-12 of these bounds.
For ``y = x Wᵀ + b + s·(x Aᵀ)Bᵀ`` (M tokens, K in, N out, R rank) with P = |x|·|W|ᵀ, L = (|x|·|A|ᵀ)·|B|ᵀ:
  y      : γ_{K+R+3} · (P + |s|·L + |b|)        (K-sum, R-sum on an h with K-error, ·s, +, +b)
  ∂L/∂B  : γ_{M+K+2} · |s| · |g|ᵀ(|x||A|ᵀ)      (h with K-error, g·s, M-sum)
  ∂L/∂A  : γ_{M+N+2} · |s| · (|g||B|)ᵀ|x|        (g·s, N-sum, M-sum)
  ∂L/∂x  : γ_{N+R+3} · (|g||W| + |s|·(|g||B|)|A|)
DoRA multiplies by f = m/n with n the float64-accumulated norm of w' = W + s·B A, computed in float32 by
each side (its R-sum may run in another order: γ_{R+2}·(|W| + |s|·|B||A|) per element each way). Cancellation
in w' magnifies that in n: relative to the reference, f is off by ρ_n ≤ ‖2γ_{R+2}·(|W| + |s||B||A|)_n‖₂ / n + 4u.
So every bound above gets |g| → |g|·|f| and k → k + 5, plus the same products taken with |g|·|f|·ρ
(an error of f passes through the linear map unchanged, then picks up at most (1 + γ) more).
"""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from minilora import dora as ref_dora  # noqa: E402
from minilora import lora as ref  # noqa: E402
from minilora import nf4 as ref_nf4  # noqa: E402
from minilora.torch_backend import dora as tdora  # noqa: E402
from minilora.torch_backend import lora as tlora  # noqa: E402
from minilora.torch_backend import nf4 as tnf4  # noqa: E402
from minilora.torch_backend.qlora import NF4Linear, QLoraLinear  # noqa: E402
from test_torch_nf4 import NP_DTYPES, T_DTYPES, assert_same_bits, to_torch  # noqa: E402  (bit-level helpers)

U32, U64 = 2.0**-24, 2.0**-53
SIZES = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA variant needs a GPU"))]


@pytest.fixture(autouse=True)
def _ieee_float32_matmuls():
    """TF32 would make u = 2^-11 on GPUs; the bounds are for IEEE float32."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def gamma(k, u=U32):
    return k * u / (1 - k * u)


def assert_within(out, ref_v, bound, what):
    out = out.detach().cpu().double().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float64)
    err = np.abs(out - ref_v)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} outside the bound; worst err/bound = "
                           f"{float(np.max(err / np.maximum(bound, 1e-300))):.3g}")


@st.composite
def problems(draw):
    """Shapes hitting the tails, values of mixed sign and scale (seeded numpy), s from rsLoRA or not."""
    M, K, N = draw(st.integers(1, 9)), draw(st.sampled_from(SIZES)), draw(st.sampled_from(SIZES))
    R = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    f32 = lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    use_rslora, alpha = draw(st.booleans()), draw(st.sampled_from([1, 8, 16, 32]))
    return dict(x=f32(M, K), W=f32(N, K, scale=0.5), A=f32(R, K), B=f32(N, R), b=f32(N), g=f32(M, N),
                m=(1 + 0.2 * rng.standard_normal(N)).astype(np.float32), R=R, alpha=alpha,
                use_rslora=use_rslora, s=ref.scaling(alpha, R, use_rslora))


def make_layer(p, device, use_dora=False, dropout=0.0):
    N, K = p["W"].shape
    base = torch.nn.Linear(K, N, device=device)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(p["W"]))
        base.bias.copy_(torch.from_numpy(p["b"]))
    layer = tlora.LoraLinear(base, r=p["R"], alpha=p["alpha"], use_rslora=p["use_rslora"], use_dora=use_dora,
                             dropout=dropout)
    with torch.no_grad():
        layer.lora_A.copy_(torch.from_numpy(p["A"]))
        layer.lora_B.copy_(torch.from_numpy(p["B"]))
        if use_dora:
            layer.lora_magnitude.copy_(torch.from_numpy(p["m"]))
    return layer


def run(layer, p, device):
    x = torch.from_numpy(p["x"]).to(device).requires_grad_(True)
    y = layer(x)
    y.backward(torch.from_numpy(p["g"]).to(device))
    return y, x.grad


def lora_bounds(p, g_abs, k_extra=0, carried=False):
    """The bounds of the module docstring; ``carried``: for an error already in |g| (factor 1 + γ, not γ)."""
    M, K = p["x"].shape
    N, R = p["B"].shape
    s, ax, aW, aA, aB, ab = abs(p["s"]), *(np.abs(p[k]).astype(np.float64) for k in ("x", "W", "A", "B", "b"))
    hA = ax @ aA.T  # (M, R)
    gB = g_abs @ aB  # (M, R)
    c = (lambda k: 1 + gamma(k)) if carried else gamma
    return dict(
        y=c(K + R + 3 + k_extra) * (ax @ aW.T + s * hA @ aB.T + ab),
        B=c(M + K + 2 + k_extra) * s * (g_abs.T @ hA),
        A=c(M + N + 2 + k_extra) * s * (gB.T @ ax),
        x=c(N + R + 3 + k_extra) * (g_abs @ aW + s * gB @ aA))


def dora_f_error(p, n):
    """ρ (N,): bound on the relative error of f = m/n (see the module docstring); n the reference norm."""
    aW, aA, aB = (np.abs(p[k]).astype(np.float64) for k in ("W", "A", "B"))
    e = 2 * gamma(p["R"] + 2) * (aW + abs(p["s"]) * aB @ aA)  # (N, K) two float32 computations of w'
    return np.sqrt((e * e).sum(1)) / n + 4 * U32  # (N,)


# ---------------------------------------------------------------- LoRA
@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None)
@given(p=problems())
def test_lora_linear_forward_and_gradients(device, p):
    layer = make_layer(p, device)
    assert layer.scaling == p["s"]
    y, gx = run(layer, p, device)
    bound = lora_bounds(p, np.abs(p["g"]).astype(np.float64))
    assert_within(y, ref.lora_forward(p["x"], p["W"], p["A"], p["B"], p["s"], p["b"]), bound["y"], "y")
    ref_gx, ref_gA, ref_gB = ref.lora_backward(p["x"], p["W"], p["A"], p["B"], p["s"], p["g"])
    assert_within(gx, ref_gx, bound["x"], "grad x")
    assert_within(layer.lora_A.grad, ref_gA, bound["A"], "grad A")
    assert_within(layer.lora_B.grad, ref_gB, bound["B"], "grad B")
    assert layer.base.weight.grad is None and layer.base.bias.grad is None


@st.composite
def groups(draw):
    """2–3 LoRA layers on one x (q/k/v, gate/up): own N, R, alpha, rsLoRA each."""
    M, K, n = draw(st.integers(1, 9)), draw(st.sampled_from(SIZES)), draw(st.integers(2, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    f32 = lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)  # noqa: E731
    x, layers = f32(M, K), []
    for _ in range(n):
        N, R = draw(st.sampled_from(SIZES)), draw(st.integers(1, 8))
        use_rslora, alpha = draw(st.booleans()), draw(st.sampled_from([1, 8, 16, 32]))
        layers.append(dict(x=x, W=f32(N, K, scale=0.5), A=f32(R, K), B=f32(N, R), b=f32(N), g=f32(M, N), R=R,
                           alpha=alpha, use_rslora=use_rslora, s=ref.scaling(alpha, R, use_rslora)))
    return layers, draw(st.booleans())


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None)
@given(case=groups())
def test_grouped_lora_layers_follow_the_reference(device, case):
    """``grouped_forward`` (one LoraGroupFunction): each output and every gradient within the bounds of one
    layer; ∂L/∂x sums the layers' terms (n − 1 more additions)."""
    ps, x_grad = case
    layers = [make_layer(p, device) for p in ps]
    x = torch.from_numpy(ps[0]["x"]).to(device).requires_grad_(x_grad)
    ys = tlora.grouped_forward(x, layers)
    assert len(ys) == len(ps)
    torch.autograd.backward(ys, [torch.from_numpy(p["g"]).to(device) for p in ps])
    ref_gx, bound_x = 0.0, 0.0
    for layer, p, y in zip(layers, ps, ys):
        bound = lora_bounds(p, np.abs(p["g"]).astype(np.float64), k_extra=len(ps))
        assert_within(y, ref.lora_forward(p["x"], p["W"], p["A"], p["B"], p["s"], p["b"]), bound["y"], "y")
        gx, gA, gB = ref.lora_backward(p["x"], p["W"], p["A"], p["B"], p["s"], p["g"])
        assert_within(layer.lora_A.grad, gA, bound["A"], "grad A")
        assert_within(layer.lora_B.grad, gB, bound["B"], "grad B")
        ref_gx, bound_x = ref_gx + gx, bound_x + bound["x"]
    if x_grad:
        assert_within(x.grad, ref_gx, bound_x, "grad x")
    else:
        assert x.grad is None


def test_grouped_forward_falls_back_with_dropout_or_dora():
    torch.manual_seed(0)
    base = [torch.nn.Linear(6, 4) for _ in range(2)]
    for kwargs in (dict(dropout=0.5), dict(use_dora=True)):
        layers = [tlora.LoraLinear(b, r=2, alpha=4, **kwargs).train() for b in base]
        x = torch.randn(3, 6)
        torch.manual_seed(1)
        ys = tlora.grouped_forward(x, layers)
        torch.manual_seed(1)
        ref_ys = [m(x) for m in layers]
        assert all(y.grad_fn is not None and "LoraGroup" not in type(y.grad_fn).__name__ for y in ys)
        assert all(torch.equal(a, b) for a, b in zip(ys, ref_ys))


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None)
@given(p=problems())
def test_functional_lora_backward_equals_reference(device, p):
    t = {k: torch.from_numpy(p[k]).to(device) for k in ("x", "W", "A", "B", "g")}
    out = tlora.lora_backward(t["x"], t["W"], t["A"], t["B"], p["s"], t["g"])
    bound = lora_bounds(p, np.abs(p["g"]).astype(np.float64))
    for o, r, key in zip(out, ref.lora_backward(p["x"], p["W"], p["A"], p["B"], p["s"], p["g"]), "xAB"):
        assert_within(o, r, bound[key], f"grad {key}")


# ---------------------------------------------------------------- DoRA
@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None)
@given(p=problems())
def test_dora_linear_forward_and_gradients(device, p):
    layer = make_layer(p, device, use_dora=True)
    y, gx = run(layer, p, device)
    n = ref_dora.dora_magnitude(p["W"], p["A"], p["B"], p["s"]).astype(np.float64)  # the detached norm
    f = p["m"].astype(np.float64) / n  # (N,)
    g_f = np.abs(p["g"]) * np.abs(f)  # (M, N)
    rho = dora_f_error(p, n)  # (N,)
    bound = lora_bounds(p, g_f, k_extra=5)
    carried = lora_bounds(p, g_f * rho, k_extra=5, carried=True)  # f's own error
    bound = {k: bound[k] + carried[k] for k in bound}
    inner_abs = (np.abs(p["x"]) @ np.abs(p["W"]).T + abs(p["s"]) * (np.abs(p["x"]) @ np.abs(p["A"]).T)
                 @ np.abs(p["B"]).T + np.abs(p["b"]))  # (M, N)
    y_bound = (gamma(p["x"].shape[1] + p["R"] + 8) * (np.abs(f) * inner_abs + np.abs(p["b"]))
               + (1 + gamma(p["x"].shape[1] + p["R"] + 8)) * rho * np.abs(f) * inner_abs)
    assert_within(y, ref_dora.dora_forward(p["x"], p["W"], p["A"], p["B"], p["s"], p["m"], p["b"]), y_bound, "y")
    # with n constant, DoRA is LoRA with the upstream gradient g·f, plus ∂L/∂m = Σ_M g·(xWᵀ + s·xAᵀBᵀ) / n
    ref_gx, ref_gA, ref_gB = ref.lora_backward(p["x"], p["W"], p["A"], p["B"], p["s"], p["g"] * f)
    assert_within(gx, ref_gx, bound["x"], "grad x")
    assert_within(layer.lora_A.grad, ref_gA, bound["A"], "grad A")
    assert_within(layer.lora_B.grad, ref_gB, bound["B"], "grad B")
    inner = ref.lora_forward(p["x"], p["W"], p["A"], p["B"], p["s"])  # (M, N)
    k_m = p["x"].shape[0] + p["x"].shape[1] + p["R"] + 8
    m_bound = (gamma(k_m) + (1 + gamma(k_m)) * rho) * (np.abs(p["g"]) * inner_abs).sum(0) / n  # 1/n: off by ρ too
    assert_within(layer.lora_magnitude.grad, (p["g"] * inner).sum(0) / n, m_bound, "grad m")


@pytest.mark.parametrize("device", DEVICES)
def test_dora_magnitude_initialised_to_row_norms(device):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((7, 33)).astype(np.float32)
    base = torch.nn.Linear(33, 7, bias=False, device=device)
    with torch.no_grad():
        base.weight.copy_(torch.from_numpy(W))
    layer = tlora.LoraLinear(base, r=4, alpha=8, use_dora=True)
    A0, B0 = layer.lora_A.detach().cpu().numpy(), layer.lora_B.detach().cpu().numpy()
    ref_m = ref_dora.dora_magnitude(W, A0, B0, layer.scaling)  # B = 0: the row norms of W
    # both round a float64 sum of squares once to float32: equal up to that one rounding
    assert_within(layer.lora_magnitude, ref_m, U32 * np.abs(ref_m) * 2, "magnitude")


# ---------------------------------------------------------------- dropout (LoRA branch only)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_applies_to_the_lora_branch_only(device, use_dora):
    rng = np.random.default_rng(1)
    p = dict(x=rng.standard_normal((6, 17)).astype(np.float32), W=rng.standard_normal((9, 17)).astype(np.float32),
             A=rng.standard_normal((3, 17)).astype(np.float32), B=rng.standard_normal((9, 3)).astype(np.float32),
             b=rng.standard_normal(9).astype(np.float32), m=(1 + 0.1 * rng.standard_normal(9)).astype(np.float32),
             R=3, alpha=6, use_rslora=False, s=2.0)
    layer = make_layer(p, device, use_dora=use_dora, dropout=0.5).train()
    x = torch.from_numpy(p["x"]).to(device)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    x_d = F.dropout(x, 0.5, training=True).cpu().double().numpy()  # the same mask
    assert (x_d == 0).any() and (x_d != 0).any()
    base = p["x"].astype(np.float64) @ p["W"].T.astype(np.float64) + p["b"]  # (M, N)
    lora = ref.lora_forward(x_d, np.zeros_like(p["W"]), p["A"], p["B"], p["s"])  # s·(x_d Aᵀ)Bᵀ
    if use_dora:  # spec §3: y = xWᵀ + b + (m/n − 1)⊙(x_d Wᵀ) + (m/n)⊙s·x_d AᵀBᵀ
        f = p["m"] / ref_dora.dora_magnitude(p["W"], p["A"], p["B"], p["s"]).astype(np.float64)
        ref_y = base + (f - 1) * (x_d @ p["W"].T.astype(np.float64)) + f * lora
    else:
        ref_y = base + lora
    P = np.abs(p["x"]) @ np.abs(p["W"]).T + np.abs(p["b"])
    L = 2.0 * (np.abs(x_d) @ np.abs(p["A"]).T) @ np.abs(p["B"]).T
    assert_within(y, ref_y, gamma(17 + 3 + 10) * 3 * (P + 2 * L + np.abs(x_d) @ np.abs(p["W"]).T), "y with dropout")
    layer.eval()  # no dropout in eval mode: the plain forward
    ref_eval = (ref_dora.dora_forward(p["x"], p["W"], p["A"], p["B"], p["s"], p["m"], p["b"]) if use_dora
                else ref.lora_forward(p["x"], p["W"], p["A"], p["B"], p["s"], p["b"]))
    assert_within(layer(x), ref_eval, gamma(17 + 3 + 10) * 3 * (P + L), "y in eval mode")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_grad", [True, False])
def test_dropout_gradients_follow_the_reference(device, x_grad):
    """Backward with dropout: ∂L/∂x = gW + mask·s·(gB)A (mask ∈ {0, 1/(1−p)}), ∂L/∂A and ∂L/∂B taken on x_d;
    and no ∂L/∂x at all for an input that does not need one (the first layer)."""
    rng = np.random.default_rng(2)
    p = dict(x=rng.standard_normal((2, 5, 17)).astype(np.float32), W=rng.standard_normal((9, 17)).astype(np.float32),
             A=rng.standard_normal((3, 17)).astype(np.float32), B=rng.standard_normal((9, 3)).astype(np.float32),
             b=rng.standard_normal(9).astype(np.float32), R=3, alpha=6, use_rslora=False, s=2.0)
    layer = make_layer(p, device, dropout=0.5).train()
    g = rng.standard_normal((2, 5, 9)).astype(np.float32)
    x = torch.from_numpy(p["x"]).to(device).requires_grad_(x_grad)
    torch.manual_seed(7)
    layer(x).backward(torch.from_numpy(g).to(device))
    torch.manual_seed(7)
    x_d = F.dropout(x.detach(), 0.5, training=True).cpu().numpy().reshape(10, 17)  # the same mask
    g2 = g.reshape(10, 9)
    mask = np.where(x_d != 0, 2.0, 0.0)  # ∂x_d/∂x
    ref_lx, ref_gA, ref_gB = ref.lora_backward(x_d, np.zeros_like(p["W"]), p["A"], p["B"], p["s"], g2)
    bound = lora_bounds(dict(p, x=x_d), np.abs(g2).astype(np.float64), k_extra=2)
    assert_within(layer.lora_A.grad, ref_gA, bound["A"], "grad A")
    assert_within(layer.lora_B.grad, ref_gB, bound["B"], "grad B")
    if not x_grad:
        assert x.grad is None
        return
    ref_gx = g2.astype(np.float64) @ p["W"].astype(np.float64) + mask * ref_lx  # (M, K)
    lora_x = (np.abs(g2) @ np.abs(p["B"])) @ np.abs(p["A"])  # (M, K)
    bound_x = gamma(9 + 3 + 6) * (np.abs(g2) @ np.abs(p["W"]) + 2 * mask * lora_x)
    assert_within(x.grad.reshape(10, 17), ref_gx, bound_x, "grad x")


# ---------------------------------------------------------------- ΔW, merge, unmerge
def delta_bound(A, B, s):
    """Both backends round a float64 R-sum (orders may differ: ≤ 2γ_R(u64)·|B||A| apart) to float32, then
    multiply by float32(s): |out − ref| ≤ |s|·(2γ_R(u64) + 5u)·(|B||A|)."""
    T = np.abs(B).astype(np.float64) @ np.abs(A).astype(np.float64)
    return abs(s) * (2 * gamma(A.shape[0], U64) + 5 * U32) * T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@settings(deadline=None, max_examples=10)
@given(p=problems())
def test_delta_merge_unmerge_follow_the_reference(device, dtype, p):
    W_np = p["W"].astype(NP_DTYPES[dtype])
    A, B = torch.from_numpy(p["A"]).to(device), torch.from_numpy(p["B"]).to(device)
    ref_d, out_d = ref.delta_weight(p["A"], p["B"], p["s"]), tlora.delta_weight(A, B, p["s"])
    assert_within(out_d, ref_d, delta_bound(p["A"], p["B"], p["s"]), "delta_weight")
    same = (out_d.cpu().numpy() == ref_d)  # where ΔW agrees bit for bit, merges must too
    W = to_torch(W_np, device)
    for ref_fn, out_fn in ((ref.merge_weight, tlora.merge_weight), (ref.unmerge_weight, tlora.unmerge_weight)):
        r, o = ref_fn(W_np, p["A"], p["B"], p["s"]), out_fn(W, A, B, p["s"])
        assert o.dtype == T_DTYPES[dtype]
        o_np = o.cpu().view(torch.int16).numpy().view(NP_DTYPES[dtype]) if dtype == "bfloat16" else o.cpu().numpy()
        assert_same_bits(r[same], o_np[same], f"{ref_fn.__name__} where ΔW agrees")
        eps = 2 ** -{"float32": 24, "float16": 11, "bfloat16": 8}[dtype] + U32
        assert_within(o.float(), r.astype(np.float64), delta_bound(p["A"], p["B"], p["s"]) + 2 * eps * np.abs(
            r.astype(np.float64)), ref_fn.__name__)
    m = torch.from_numpy(p["m"]).to(device)
    r, r_n = ref_dora.dora_merge_weight(p["W"], p["A"], p["B"], p["s"], p["m"])
    o, o_n = tdora.dora_merge_weight(torch.from_numpy(p["W"]).to(device), A, B, p["s"], m)
    assert_within(o_n, r_n, 2 * U32 * np.abs(r_n) + np.sqrt(delta_bound(p["A"], p["B"], p["s"]).sum(1) * (
        2 * np.abs(p["W"]).sum(1) + 1)), "DoRA norm at merge")
    back = tdora.dora_unmerge_weight(o, A, B, p["s"], m, o_n)
    assert back.shape == W.shape


def test_merged_returns_a_new_linear_and_leaves_the_layer_alone():
    rng = np.random.default_rng(2)
    base = torch.nn.Linear(16, 8)
    layer = tlora.LoraLinear(base, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.copy_(torch.from_numpy(rng.standard_normal((8, 2)).astype(np.float32)))
    W0 = base.weight.detach().clone()
    merged = layer.merged()
    assert isinstance(merged, torch.nn.Linear) and merged is not base
    assert torch.equal(base.weight, W0)  # no hidden merged state
    assert torch.equal(merged.weight, tlora.merge_weight(W0, layer.lora_A.detach(), layer.lora_B.detach(), 2.0))
    assert torch.equal(merged.bias, base.bias)


def test_merge_refuses_nan_and_bad_shapes_like_the_reference():
    W = torch.full((4, 3), 6e4, dtype=torch.float16)
    A, B = torch.ones(2, 3), torch.full((4, 2), 1e4)
    with pytest.raises(ValueError, match="NaN/inf"):
        tlora.merge_weight(W, A, B, 1.0)
    for bad_A in (torch.ones(2, 5), torch.ones(3)):
        with pytest.raises(ValueError):
            ref.merge_weight(np.zeros((4, 3), np.float32), bad_A.numpy(), B.numpy(), 1.0)
        with pytest.raises(ValueError):
            tlora.merge_weight(W, bad_A, B, 1.0)
    with pytest.raises(ValueError):
        tlora.LoraLinear(torch.nn.Linear(3, 4), r=0)


# ---------------------------------------------------------------- QLoRA
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("double_quant", [False, True])
@settings(deadline=None, max_examples=10)
@given(p=problems())
def test_qlora_linear_forward_and_gradients(device, double_quant, p):
    N, K = p["W"].shape
    state = ref_nf4.quantize(p["W"], 32, double_quant)  # the reference's frozen base
    W_deq = ref_nf4.dequantize(state, np.float32)  # (N, K)
    base = NF4Linear(tnf4.QuantState.from_numpy(state, device), torch.from_numpy(p["b"]).to(device))
    assert_same_bits(W_deq, base.dequantize(), "dequantised base")
    layer = QLoraLinear(base, r=p["R"], alpha=p["alpha"], use_rslora=p["use_rslora"])
    with torch.no_grad():
        layer.lora_A.copy_(torch.from_numpy(p["A"]))
        layer.lora_B.copy_(torch.from_numpy(p["B"]))
    y, gx = run(layer, p, device)
    q = dict(p, W=W_deq)
    bound = lora_bounds(q, np.abs(p["g"]).astype(np.float64))
    assert_within(y, ref.lora_forward(p["x"], W_deq, p["A"], p["B"], p["s"], p["b"]), bound["y"], "y")
    ref_gx, ref_gA, ref_gB = ref.lora_backward(p["x"], W_deq, p["A"], p["B"], p["s"], p["g"])
    assert_within(gx, ref_gx, bound["x"], "grad x")
    assert_within(layer.lora_A.grad, ref_gA, bound["A"], "grad A")
    assert_within(layer.lora_B.grad, ref_gB, bound["B"], "grad B")
    assert [n for n, t in layer.named_parameters() if t.requires_grad] == ["lora_A", "lora_B"]


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_linear_on_cpu_dequantises_in_c_to_the_torch_bits(double_quant, dtype):
    """On the CPU ``NF4Linear.dequantize`` runs the C dequantiser: the same bits as the torch one."""
    linear = torch.nn.Linear(192, 24, bias=False)
    layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    out = layer.dequantize(dtype)
    assert out.dtype == dtype and out.shape == (24, 192)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(out.view(bits), tnf4.dequantize(layer.quant_state(), dtype).view(bits))


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_made_under_inference_mode_runs_and_sees_in_place_writes(double_quant):
    """Buffers made under ``torch.inference_mode`` have no version counter (the C matmul's cache key used it:
    RuntimeError on the first forward). The layer still runs, gives the bits of a layer made outside, and
    an in-place write to its buffers (allowed in inference mode) shows in the next output."""
    linear = torch.nn.Linear(128, 16)
    x = torch.randn(1, 128)
    outside = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    with torch.no_grad():
        want = outside(x)
    with torch.inference_mode():
        layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
        assert torch.equal(layer(x), want)
        layer.packed.zero_()  # every code 0: NF4 -1.0 times the block absmax
        assert not torch.equal(layer(x), want)
        W = layer.dequantize()  # (N, K) all -absmax
        exact = x.double() @ W.double().T + linear.bias.detach().double()
        bound = gamma(128) * (x.abs().double() @ W.abs().double().T) + 2 * U32 * exact.abs()
        assert bool(((layer(x).double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_small_batches_use_the_c_matmul_within_the_bound(double_quant, monkeypatch):
    """Up to ``NATIVE_MATMUL_ROWS`` float32 rows on the CPU, the forward is the C matmul on the packed bytes
    (``native.PackedNF4``, exact mode): within γ_K·(|x|·|W|ᵀ) of the float64 product; more rows take
    dequantise + ``F.linear`` (the same bits as before). The backward is ``g @ dequant(W)`` either way, and
    the inference path (no gradient recording) gives the training path's bits."""
    from minilora import native
    from minilora.torch_backend import qlora
    N, K = 40, 256
    linear = torch.nn.Linear(K, N)
    layer = NF4Linear.from_linear(linear, blocksize=64, double_quant=double_quant)
    W = layer.dequantize()  # (N, K) float32
    calls, real = [], native.PackedNF4.matmul
    monkeypatch.setattr(native.PackedNF4, "matmul", lambda self, x, **k: calls.append(x.shape) or real(self, x, **k))
    for M in (1, 3, qlora.NATIVE_MATMUL_ROWS, qlora.NATIVE_MATMUL_ROWS + 1):
        x = torch.randn(M, K, requires_grad=True)
        y = layer(x)  # (M, N)
        bound = gamma(K) * (x.detach().abs().double() @ W.abs().double().T)
        exact = x.detach().double() @ W.double().T + linear.bias.detach().double()
        assert bool(((y.detach().double() - exact).abs() <= bound + 2 * U32 * exact.abs()).all())  # + the bias add
        if M > qlora.NATIVE_MATMUL_ROWS:
            assert torch.equal(y, F.linear(x, W) + linear.bias)
        g = torch.randn(M, N)
        (gx,) = torch.autograd.grad(y, x, g)
        assert torch.equal(gx, g @ W)
        with torch.no_grad():
            assert torch.equal(layer(x), y)  # the inference path: the same kernel, no autograd Function
    small = [(1, K), (3, K), (qlora.NATIVE_MATMUL_ROWS, K)]
    assert calls == [shape for shape in small for _ in range(2)]  # the C kernel ran exactly for the small ones


def test_nf4_linear_c_matmul_state_follows_the_buffers():
    """The layer's cached C-matmul state (double-quantised absmax decoded once, the state checked once) is
    rebuilt when a buffer is written in place: new nested codes give the output of a fresh layer built
    from the new state, not the old decoded absmax's."""
    torch.manual_seed(7)
    N, K = 40, 128 * 64
    a = NF4Linear.from_linear(torch.nn.Linear(K, N, bias=False), blocksize=64, double_quant=True)
    x = torch.randn(2, K)
    with torch.no_grad():
        y0 = a(x)
        a.nested_codes.copy_(a.nested_codes.flip(0))  # other statistics, same tensors (in place)
        y1 = a(x)
        assert not torch.equal(y1, y0)
        assert torch.equal(y1, NF4Linear(a.quant_state())(x))


def test_nf4_linear_int16_mode_only_in_inference():
    """``matmul_mode = "int16"`` (``minilora generate --nf4-matmul int16``): without gradient recording the C
    int16 GEMV serves small batches, within ``int16_matmul_error_bound`` of the float64 product and not equal
    to the exact mode; with gradients recorded (training) the layer stays exact, bit for bit."""
    from minilora import native, nf4 as ref_nf4_mod
    from minilora.torch_backend.qlora import set_nf4_matmul_mode
    N, K = 48, 256
    torch.manual_seed(5)
    model = torch.nn.Sequential(NF4Linear.from_linear(torch.nn.Linear(K, N, bias=False), blocksize=64))
    layer = model[0]
    x = torch.randn(2, K)
    with torch.no_grad():
        exact = layer(x)
    assert set_nf4_matmul_mode(model, "int16") == 1 and layer.matmul_mode == "int16"
    with torch.no_grad():
        approx = layer(x)
    packed, absmax = layer._native_state()
    bound = ref_nf4_mod.int16_matmul_error_bound(x.numpy(), packed, absmax, N, K, 64)  # (M, N)
    truth = x.double().numpy() @ layer.dequantize().double().numpy().T
    assert np.all(np.abs(approx.double().numpy() - truth) <= bound) and not torch.equal(approx, exact)
    xg = x.clone().requires_grad_(True)
    assert torch.equal(layer(xg).detach(), exact)  # training: exact mode
    with pytest.raises(ValueError, match="int16"):
        set_nf4_matmul_mode(model, "int8")
    assert native.MATMUL_MODES == ("exact", "int16")


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_bf16_base_dequantises_bit_exactly_and_survives_dtype_casts(device):
    W = np.random.default_rng(3).standard_normal((24, 40)).astype(ml_dtypes.bfloat16)  # (N, K)
    linear = torch.nn.Linear(40, 24, bias=False, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(to_torch(W, device))
    layer = QLoraLinear.from_linear(linear, blocksize=64, double_quant=True, r=4, alpha=8)
    ref_W = ref_nf4.dequantize(ref_nf4.quantize(W, 64, double_quant=True))  # bf16 (24, 40)
    assert_same_bits(ref_W, layer.base_weight(), "bf16 dequantised weight")
    layer.to(torch.float16)  # casts floating buffers; the statistics are stored as int32 bits
    assert_same_bits(ref_W, layer.base_weight(), "after .to(float16)")
    y = layer(torch.randn(3, 40, device=device, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 24)
    with pytest.raises(TypeError):
        QLoraLinear(torch.nn.Linear(4, 4))
