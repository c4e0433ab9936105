"""Known answers from PEFT: the NumPy reference against vectors recorded from real PEFT layers.

The vectors (``tests/data/peft``, made by ``tests/data/make_peft_vectors.py``) hold PEFT's own scaling,
ΔW, forward, gradients, merges (default and ``safe_merge``) and unmerges for Linear, GPT-2 Conv1D
(``fan_in_fan_out``), Embedding, rsLoRA, DoRA and rank / alpha patterns, on float32, bfloat16 and
float16 bases. No torch here: the vectors are read with safetensors' NumPy loader.

What is exact and what is bounded:
- scaling and per-module (r, alpha): equal, as Python floats.
- every merge / unmerge step is element-wise once ΔW is known; fed PEFT's ΔW the reference reproduces
  PEFT's merged weights bit for bit in every dtype.
- ΔW = s·BA is a reduction over r. The reference rounds the exact product once; PEFT's CPU matmul
  accumulates in float32 with one FMA per r in order (shown bit for bit below), so ΔW agrees within
  γ_{R+3}·|s|·|B||A|, float32 merges within that plus one rounding, and bf16 / fp16 merges bit for bit
  except where that last float32 bit moves a value across a bf16 / fp16 rounding boundary (≤ 1 ulp).
- forward, gradients, DoRA norms: within bounds derived from float32 accumulation (u = 2⁻²⁴).
"""
import functools
import json
from pathlib import Path

import ml_dtypes  # registers bfloat16, so safetensors can hand it to NumPy
import numpy as np
import pytest
from safetensors import safe_open

from minilora import dora, lora

DATA_DIR = Path(__file__).resolve().parent / "data"
PEFT_DIR = DATA_DIR / "peft"
MANIFEST = json.loads((PEFT_DIR / "manifest.json").read_text())
DTYPES = MANIFEST["dtypes"]
F32, F64 = np.float32, np.float64
U = 2.0 ** -24  # unit roundoff of float32, PEFT's accumulation dtype on CPU


def gamma(n):
    """γ_n = n·u / (1 − n·u): the relative error bound of an n-term float32 accumulation."""
    return n * U / (1 - n * U)


@functools.lru_cache(maxsize=None)
def load(case, dtype):
    with safe_open(PEFT_DIR / f"{case}-{dtype}.safetensors", framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def entries(kind=None, dora_only=None):
    """(case, module) pairs from the manifest, filtered by layer kind and DoRA-ness."""
    out = []
    for case, c in MANIFEST["cases"].items():
        for mod, meta in c["modules"].items():
            is_dora = c["config"].get("use_dora", False)
            if (kind is None or meta["kind"] in kind) and (dora_only is None or dora_only == is_dora):
                out.append(pytest.param(case, mod, id=f"{case}:{mod}"))
    return out


def layer(case, mod, dtype="float32"):
    """Everything about one recorded module: tensors (keys without the module prefix) and config."""
    c, meta = MANIFEST["cases"][case], MANIFEST["cases"][case]["modules"][mod]
    t = {k[len(mod) + 1:]: v for k, v in load(case, dtype).items() if k.startswith(mod + ".")}
    t.update((k, v) for k, v in load(case, dtype).items() if "." not in k)
    fifo = c["config"].get("fan_in_fan_out", False) or meta["kind"] == "embedding"
    return t, meta["scaling"], fifo, meta


def as_factors(delta, fifo):
    """(A, B) with ``delta_weight(A, B, 1, fifo) == delta`` exactly: A = I, B = ΔW in (N, K) layout."""
    BA = delta.T if fifo else delta  # (N, K)
    return np.eye(BA.shape[1], dtype=F32), BA  # (K, K), (N, K)


def abs_delta(t, s):
    return abs(s) * (np.abs(t["B"]).astype(F64) @ np.abs(t["A"]).astype(F64))  # (N, K)


def delta_bound(t, s, fifo):
    """|ΔW_ref − ΔW_peft| ≤ γ_{R+3}·|s|·|B||A|: R-term float32 sum, two roundings of ours, one of s·BA."""
    b = gamma(t["A"].shape[0] + 3) * abs_delta(t, s)  # (N, K)
    return b.T if fifo else b


def bits(a):
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32)


def assert_bits_equal(out, ref, what):
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    bad = bits(out) != bits(ref)
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} elements differ, first at " \
                          f"{tuple(np.argwhere(bad)[0])}: {out[bad][0]!r} vs {ref[bad][0]!r}"


def assert_within(out, ref, bound, what):
    err = np.abs(np.asarray(out, F64) - np.asarray(ref, F64))
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"{what}: |out − ref| = {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


def ulps_apart(out, ref):
    """Elementwise distance in units of the last place of ``ref``'s dtype (same-sign finite values)."""
    return np.abs(out.astype(F64) - ref.astype(F64)) / np.spacing(np.abs(ref).astype(ref.dtype)).astype(F64)


def sequential_fma_delta(A, B, s, fifo):
    """ΔW the way PEFT's CPU matmul computed it for these vectors: float32, acc = fma(B[:, r], A[r], acc)
    for r = 0..R−1, then acc · float32(s). FMA is emulated exactly: the float64 product of two float32
    is exact; the float64 sum is made round-to-odd (TwoSum residual), so rounding it to float32 is correct."""
    A, B = A.astype(F64), B.astype(F64)
    acc = np.zeros((B.shape[0], A.shape[1]), F32)  # (N, K)
    for r in range(A.shape[0]):
        p, c = B[:, r:r + 1] * A[r], acc.astype(F64)  # (N, K) exact products
        total = p + c
        bp = total - c
        resid = (p - bp) + (c - (total - bp))  # exact: total + resid == p + c
        i = total.view(np.int64)
        even = (i & 1) == 0
        fix = (resid != 0) & even
        toward = np.where(resid > 0, np.inf, -np.inf)
        total = np.where(fix, np.nextafter(total, toward), total)  # round-to-odd
        acc = total.astype(F32)
    delta = acc * F32(s)
    return delta.T if fifo else delta


# --- scaling and patterns: exact ---------------------------------------------------------------

@pytest.mark.parametrize("case, mod", entries())
def test_rank_alpha_and_scaling_exact(case, mod):
    cfg = MANIFEST["cases"][case]["config"]
    meta = MANIFEST["cases"][case]["modules"][mod]
    r, alpha = lora.module_rank_alpha(mod, cfg["r"], cfg["lora_alpha"], cfg.get("rank_pattern"),
                                      cfg.get("alpha_pattern"))
    assert (r, alpha) == (meta["r"], meta["alpha"])
    assert lora.scaling(alpha, r, cfg.get("use_rslora", False)) == meta["scaling"]


def test_patterns_case_covers_first_match_and_dot_boundary():
    mods = MANIFEST["cases"]["patterns"]["modules"]
    assert (mods["blocks.0.attn.v_proj"]["r"], mods["blocks.0.attn.v_proj"]["alpha"]) == (4, 3)
    assert (mods["blocks.0.attn.xv_proj"]["r"], mods["blocks.0.attn.xv_proj"]["alpha"]) == (8, 16)
    assert (mods["blocks.1.mlp.up_proj"]["r"], mods["blocks.1.mlp.up_proj"]["alpha"]) == (2, 7)


# --- ΔW: bounded (a reduction); PEFT's accumulation order pinned bit for bit -------------------

@pytest.mark.parametrize("case, mod", entries())
def test_delta_weight_within_bound(case, mod):
    t, s, fifo, _ = layer(case, mod)
    ref = lora.delta_weight(t["A"], t["B"], s, fifo)
    assert ref.dtype == F32 and ref.shape == t["delta"].shape
    assert_within(t["delta"], ref, delta_bound(t, s, fifo), "ΔW")


@pytest.mark.parametrize("case, mod", entries())
def test_peft_delta_is_sequential_float32_fma(case, mod):
    """PEFT's ΔW order is a float32 FMA chain over r: the test's own emulation and ``lora.delta_weight``
    (the reference every merge uses) both give PEFT's bits."""
    t, s, fifo, _ = layer(case, mod)
    assert_bits_equal(sequential_fma_delta(t["A"], t["B"], s, fifo), t["delta"], "ΔW in PEFT's order")
    assert_bits_equal(lora.delta_weight(t["A"], t["B"], s, fifo), t["delta"], "lora.delta_weight")


# --- merges: element-wise, so bit-exact given PEFT's ΔW ------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, mod", entries(kind=("linear", "conv1d"), dora_only=False))
def test_merge_bit_exact_given_peft_delta(case, mod, dtype):
    t, _, fifo, _ = layer(case, mod, dtype)
    A, B = as_factors(t["delta"], fifo)
    assert_bits_equal(lora.merge_weight(t["W"], A, B, 1.0, fifo), t["merged"], "merge_and_unload")
    assert_bits_equal(lora.merge_weight_safe(t["W"], A, B, 1.0, fifo), t["merged_safe"], "safe merge")
    # PEFT's unmerge rounds ΔW to the base dtype first: W' − round(ΔW), i.e. a safe merge of −ΔW
    assert_bits_equal(lora.merge_weight_safe(t["merged"], A, B, -1.0, fifo), t["unmerged"], "PEFT unmerge")
    if dtype == "float32":  # there one rounding and two are the same
        assert_bits_equal(lora.unmerge_weight(t["merged"], A, B, 1.0, fifo), t["unmerged"], "unmerge")


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_merge_is_two_roundings_in_peft(dtype):
    """PEFT's Embedding.merge casts ΔW to the base dtype before adding even when not safe (Linear does
    not): its merge_and_unload equals minilora's merge_weight_safe, not merge_weight, for bf16 / fp16."""
    t, s, fifo, _ = layer("embedding", "model.embed_tokens", dtype)
    A, B = as_factors(t["delta"], fifo)
    assert_bits_equal(lora.merge_weight_safe(t["W"], A, B, 1.0, fifo), t["merged"], "embedding merge")
    assert_bits_equal(lora.merge_weight_safe(t["W"], A, B, 1.0, fifo), t["merged_safe"], "safe merge")
    assert_bits_equal(lora.merge_weight_safe(t["merged"], A, B, -1.0, fifo), t["unmerged"], "unmerge")
    one_rounding = lora.merge_weight(t["W"], A, B, 1.0, fifo)
    differ = bits(one_rounding) != bits(t["merged"])
    if dtype == "float32":
        assert not differ.any()
    else:  # the one-rounding merge is the closer one wherever they differ
        exact = t["W"].astype(F64) + t["delta"].astype(F64)
        assert differ.any()
        assert (np.abs(one_rounding[differ] - exact[differ]) <= np.abs(t["merged"][differ] - exact[differ])).all()
        u = float(ml_dtypes.finfo(t["W"].dtype).eps) / 2  # unit roundoff of bf16 / fp16
        # two roundings: |round(W + round(ΔW)) − (W + ΔW)| ≤ u·|ΔW| + u·|W + round(ΔW)| (not 1 ulp:
        # rounding ΔW first costs ulps of ΔW, which exceed those of W + ΔW where they nearly cancel)
        two = np.abs(t["merged"].astype(F64) - exact)
        assert (two <= u * np.abs(t["delta"]) + u * np.abs(t["merged"].astype(F64)) * (1 + 2 * u)).all()
        assert ulps_apart(one_rounding, t["merged"]).max() > 1  # it does happen in these vectors


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, mod", entries(dora_only=False))
def test_merge_from_factors(case, mod, dtype):
    """From A, B: float32 within bound; bf16 / fp16 bit-exact wherever our float32 ΔW equals PEFT's,
    and at most one ulp apart where it does not."""
    t, s, fifo, meta = layer(case, mod, dtype)
    merge = lora.merge_weight_safe if meta["kind"] == "embedding" and dtype != "float32" else lora.merge_weight
    ref = merge(t["W"], t["A"], t["B"], s, fifo)
    out = t["merged"]
    assert ref.dtype == out.dtype
    d_ref = lora.delta_weight(t["A"], t["B"], s, fifo)
    if dtype == "float32":
        bound = delta_bound(t, s, fifo) + 2 * U * (np.abs(t["W"]) + np.abs(d_ref))
        assert_within(out, ref, bound, "merge fp32")
        assert_within(lora.unmerge_weight(out, t["A"], t["B"], s, fifo), t["unmerged"], 2 * bound, "unmerge")
        return
    same_delta = d_ref == t["delta"]
    assert_bits_equal(ref[same_delta], out[same_delta], "merge where ΔW agrees")
    assert (ulps_apart(ref, out) <= 1).all()


# --- forward and gradients: within bounds of float32 accumulation --------------------------------

def lora_bounds(t, s, gam=gamma):
    """Bounds on |PEFT − reference| for y, grad_x, grad_A, grad_B of one Linear LoRA layer, from
    float32 accumulations of n terms (γ_n); ``gam=lambda n: 1`` gives the bare |·| products instead."""
    x, W, A, B, g = (np.abs(t[k]).astype(F64) for k in ("x", "W", "A", "B", "g"))
    M, K, R = x.shape[0], A.shape[1], A.shape[0]
    N = B.shape[0]
    b = np.abs(t["bias"]).astype(F64) if "bias" in t else 0.0
    s = abs(s)
    h = x @ A.T  # (M, R)
    y = gam(K + 2) * (x @ W.T + b) + gam(K + R + 2) * s * (h @ B.T)  # (M, N)
    gx = gam(N + R + 2) * (g @ W + s * (g @ B) @ A)  # (M, K)
    gA = gam(M + N + 1) * s * ((g @ B).T @ x)  # (R, K)
    gB = gam(M + K + 1) * s * (g.T @ h)  # (N, R)
    return y, gx, gA, gB


@pytest.mark.parametrize("case, mod", entries(kind=("linear", "conv1d"), dora_only=False))
def test_forward_and_gradients_within_bound(case, mod):
    t, s, fifo, _ = layer(case, mod)
    W = t["W"].T if fifo else t["W"]  # (N, K) for the bound
    by, bx, bA, bB = lora_bounds({**t, "W": W}, s)
    y = lora.lora_forward(t["x"], t["W"], t["A"], t["B"], s, bias=t.get("bias"), fan_in_fan_out=fifo)
    assert_within(t["y"], y, by, "forward")
    gx, gA, gB = lora.lora_backward(t["x"], t["W"], t["A"], t["B"], s, t["g"], fan_in_fan_out=fifo)
    assert_within(t["grad_x"], gx, bx, "grad_x")
    assert_within(t["grad_A"], gA, bA, "grad_A")
    assert_within(t["grad_B"], gB, bB, "grad_B")


def test_embedding_forward_and_gradients_within_bound():
    t, s, _, _ = layer("embedding", "model.embed_tokens")
    idx = t["x"]  # (M,) token ids
    V = t["W"].shape[0]
    onehot = np.eye(V, dtype=F32)[idx]  # (M, V): Embedding LoRA is fan_in_fan_out LoRA on one-hot rows
    y = lora.embedding_forward(idx, t["W"], t["A"], t["B"], s)
    by, _, bA, bB = lora_bounds({**t, "x": onehot, "W": t["W"].T}, s)
    assert_within(t["y"], y, by, "embedding forward")
    _, gA, gB = lora.lora_backward(onehot, t["W"], t["A"], t["B"], s, t["g"], fan_in_fan_out=True)
    assert_within(t["grad_A"], gA, bA, "embedding grad_A")
    assert_within(t["grad_B"], gB, bB, "embedding grad_B")


# --- DoRA -------------------------------------------------------------------------------------

def dora_norm_bound(t, s, fifo):
    """|n_peft − n_ref| per output row: the ΔW differences and the rounding of W + ΔW, plus a float32
    sum of K squares and a sqrt."""
    Wd = np.abs((t["W"].T if fifo else t["W"]).astype(F64)) + abs_delta(t, s)  # (N, K)
    eps = gamma(t["A"].shape[0] + 4) * abs_delta(t, s) + U * Wd  # (N, K)
    return np.sqrt((eps ** 2).sum(1)) + gamma(Wd.shape[1] + 2) * np.sqrt((Wd ** 2).sum(1))  # (N,)


@pytest.mark.parametrize("case, mod", entries(dora_only=True))
def test_dora_magnitude_within_bound(case, mod):
    for dtype in DTYPES:
        t, s, fifo, _ = layer(case, mod, dtype)
        ref = dora.dora_magnitude(t["W"], t["A"], t["B"], s, fifo)
        assert ref.dtype == F32
        assert_within(t["m_init"], ref, dora_norm_bound(t, s, fifo), f"DoRA magnitude ({dtype})")


@pytest.mark.parametrize("case, mod", entries(dora_only=True))
def test_dora_forward_and_gradients_within_bound(case, mod):
    """PEFT's DoRA forward, and its gradients, which are LoRA's with g scaled by m / n (n detached)."""
    t, s, fifo, _ = layer(case, mod)
    W = (t["W"].T if fifo else t["W"]).astype(F64)  # (N, K)
    n = dora.dora_magnitude(t["W"], t["A"], t["B"], s, fifo).astype(F64)  # (N,) the norm, not m
    f = t["m"].astype(F64) / n  # (N,)
    rel_f = dora_norm_bound(t, s, fifo) / n + 2 * U  # (N,) relative error of PEFT's m / n
    by = lora_bounds({**t, "W": W}, s)[0]
    x, g = t["x"].astype(F64), t["g"].astype(F64)
    P = np.abs(x) @ np.abs(W).T  # (M, N)
    L = abs(s) * (np.abs(x) @ np.abs(t["A"]).T) @ np.abs(t["B"]).T  # (M, N)
    bias = np.abs(t["bias"]) if "bias" in t else 0.0

    y = dora.dora_forward(t["x"], t["W"], t["A"], t["B"], s, t["m"], bias=t.get("bias"), fan_in_fan_out=fifo)
    bound = (np.abs(f) * rel_f) * (P + L) + (1 + np.abs(f - 1) + np.abs(f)) * by \
        + 4 * U * (bias + P + np.abs(f - 1) * P + np.abs(f) * L)
    assert_within(t["y"], y, bound, "DoRA forward")

    gx, gA, gB = lora.lora_backward(t["x"], t["W"], t["A"], t["B"], s, g * f, fan_in_fan_out=fifo)
    g_f = np.abs(g) * np.abs(f)  # (M, N)
    rounding = lora_bounds({**t, "W": W, "g": g_f * (1 + rel_f)}, s)[1:]
    f_error = lora_bounds({**t, "W": W, "g": g_f * rel_f}, s, gam=lambda n: 1.0)[1:]
    for name, ref, b_r, b_f in zip(("grad_x", "grad_A", "grad_B"), (gx, gA, gB), rounding, f_error):
        assert_within(t[name], ref, b_r + b_f, f"DoRA {name}")

    # ∂L/∂m = Σ_M g ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) / n
    pre = lora.lora_forward(t["x"], t["W"], t["A"], t["B"], s, fan_in_fan_out=fifo)  # (M, N)
    gm = (g * pre).sum(0) / n  # (N,)
    bm = (np.abs(g) * (gamma(x.shape[0] + W.shape[1] + t["A"].shape[0] + 4) * (P + L))).sum(0) / n \
        + np.abs(gm) * (rel_f + 2 * U)
    assert_within(t["grad_m"], gm, bm, "DoRA grad_m")


def dora_merge_bound(t, s, fifo, m, n):
    """|W'_peft − W'_ref| for a float32 DoRA merge: f·(ΔW differences + roundings of W + ΔW and of the
    product) + |W + ΔW|·(error of PEFT's factor m / n, from its norm)."""
    f = np.abs(m.astype(F64) / n)  # (N,)
    rel_f = dora_norm_bound(t, s, fifo) / n + 2 * U  # (N,)
    Wd = np.abs((t["W"].T if fifo else t["W"]).astype(F64)) + abs_delta(t, s)  # (N, K)
    d_bound = delta_bound(t, s, fifo)
    d_bound = d_bound.T if fifo else d_bound  # (N, K)
    bound = f[:, None] * (d_bound + 4 * U * Wd) + (f * rel_f)[:, None] * Wd  # (N, K)
    return bound.T if fifo else bound


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, mod", entries(dora_only=True))
def test_dora_merge_and_unmerge(case, mod, dtype):
    """float32: within bound. bf16 / fp16: bit-exact in every output row where PEFT's float32 norm
    (not correctly rounded) equals ours and its ΔW row equals ours; at most one ulp elsewhere."""
    t, s, fifo, _ = layer(case, mod, dtype)
    ref, n = dora.dora_merge_weight(t["W"], t["A"], t["B"], s, t["m"], fifo)
    out = t["merged"]
    assert ref.dtype == out.dtype and n.dtype == F32
    assert_within(t["merge_norm"], n, dora_norm_bound(t, s, fifo), "DoRA merge norm")
    bound = dora_merge_bound(t, s, fifo, t["m"], n)
    # the unmerge W'/(m/n) − ΔW, given PEFT's merged weight and its norm of merge time
    un = dora.dora_unmerge_weight(out, t["A"], t["B"], s, t["m"], t["merge_norm"], fifo)
    if dtype == "float32":
        assert_within(out, ref, bound, "DoRA merge fp32")
        d_ref = lora.delta_weight(t["A"], t["B"], s, fifo)
        assert_within(t["unmerged"], un, delta_bound(t, s, fifo) + 2 * U * (np.abs(un) + np.abs(d_ref)),
                      "DoRA unmerge fp32")
        return
    assert (ulps_apart(ref, out) <= 1).all()
    # given PEFT's ΔW, the merge is element-wise except for the row norm, which PEFT sums in float32
    # (not correctly rounded): bit-exact in every row where the two norms agree
    A, B = as_factors(t["delta"], fifo)
    ref_p, n_p = dora.dora_merge_weight(t["W"], A, B, 1.0, t["m"], fifo)
    same_row = n_p == t["merge_norm"]  # (N,)
    rows = (slice(None), same_row) if fifo else (same_row,)
    assert same_row.any()
    assert_bits_equal(ref_p[rows], out[rows], "DoRA merge given PEFT's ΔW, where the norm agrees")
    # and given PEFT's ΔW and norm the unmerge is element-wise, hence bit-exact
    assert_bits_equal(dora.dora_unmerge_weight(out, A, B, 1.0, t["m"], t["merge_norm"], fifo), t["unmerged"],
                      "DoRA unmerge given PEFT's ΔW and norm")


def test_manifest_records_versions():
    v = MANIFEST["versions"]
    assert {"peft", "transformers", "torch", "safetensors"} <= set(v)


# --- the tiny checkpoints: PEFT's merge_and_unload of each adapter vs the reference -----------

FIXTURES = json.loads((DATA_DIR / "fixtures.json").read_text())
FIXTURE_MERGES = [(m["adapter"], m["base"], m["expected"]) for m in FIXTURES["merges"]]


def read_all(path):
    with safe_open(path, framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("adapter, base, expected", FIXTURE_MERGES, ids=[e.split("/")[1] for _, _, e in FIXTURE_MERGES])
def test_fixture_merges_match_reference(adapter, base, expected):
    """Keys are mapped here by hand (PEFT's ``base_model.model.<module>.lora_A.weight`` → base
    ``<module>.weight``); minilora.checkpoint owns that mapping in the library."""
    cfg = json.loads((DATA_DIR / adapter / "adapter_config.json").read_text())
    W_all = read_all(DATA_DIR / base / "model.safetensors")
    ad = read_all(DATA_DIR / adapter / "adapter_model.safetensors")
    out_all = read_all(DATA_DIR / expected / "model.safetensors")
    assert set(out_all) == set(W_all)
    prefix = "base_model.model."
    modules = {k[len(prefix):].rsplit(".lora_", 1)[0] for k in ad if ".lora_" in k}
    assert modules
    for mod in sorted(modules):
        W, out = W_all[mod + ".weight"], out_all[mod + ".weight"]
        r, alpha = lora.module_rank_alpha(mod, cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"])
        s = lora.scaling(alpha, r, cfg["use_rslora"])
        if prefix + mod + ".lora_embedding_A" in ad:
            A, B, fifo = ad[prefix + mod + ".lora_embedding_A"], ad[prefix + mod + ".lora_embedding_B"], True
        else:
            A, B, fifo = ad[prefix + mod + ".lora_A.weight"], ad[prefix + mod + ".lora_B.weight"], cfg["fan_in_fan_out"]
        assert A.shape[0] == r
        t = {"A": A, "B": B, "W": W}
        if cfg["use_dora"]:
            m = ad[prefix + mod + ".lora_magnitude_vector"]
            ref, n = dora.dora_merge_weight(W, A, B, s, m, fifo)
        else:
            ref = lora.merge_weight(W, A, B, s, fifo)
        assert ref.dtype == out.dtype, mod
        if out.dtype == F32:
            d = np.abs(lora.delta_weight(A, B, s, fifo)).astype(F64)
            bound = delta_bound(t, s, fifo) + 2 * U * (np.abs(W) + d)
            if cfg["use_dora"]:
                bound = dora_merge_bound(t, s, fifo, m, n)
            assert_within(out, ref, bound, f"{expected}: {mod}")
        else:
            assert (ulps_apart(ref, out) <= 1).all(), mod
            same = lora.delta_weight(A, B, s, fifo) == sequential_fma_delta(A, B, s, fifo)
            assert_bits_equal(ref[same], out[same], f"{expected}: {mod} where ΔW agrees")
        # and with PEFT's own accumulation order of ΔW the merge is bit-exact
        if not cfg["use_dora"]:
            A1, B1 = as_factors(sequential_fma_delta(A, B, s, fifo), fifo)
            assert_bits_equal(lora.merge_weight(W, A1, B1, 1.0, fifo), out, f"{expected}: {mod} (PEFT's ΔW)")
    for key in set(W_all) - {m + ".weight" for m in modules}:  # everything else is copied unchanged
        assert W_all[key].tobytes() == out_all[key].tobytes(), key
