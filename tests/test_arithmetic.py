"""Adapter arithmetic (``minilora.arithmetic``, ``minilora.ties``, ``minilora.extract``): known answers
from PEFT's ``add_weighted_adapter``, properties of the reference, the PEFT defects it does not copy,
and one test per kind of bad input.

Known answers (tests/data/arithmetic, made by make_arithmetic_vectors.py) are compared as ``B @ A``,
never factor by factor: SVD factors are unique only up to signs and order. Tolerances: PEFT runs in
float32 (unit roundoff u). The factor methods round each entry a handful of times (≤ R + 4 = 10
roundings of terms bounded by the result's scale): ``16 u``. The SVD methods add the float32 SVD's
backward error ``p(n) · u · ‖D‖`` with ``p(n) ≈ n = 20`` here, and the truncation's sensitivity to it
(gaps are O(1) for these random inputs): ``16 · 20 · u``.
"""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minilora import arithmetic, extract, lora, ties
from minilora.checkpoint import Adapter, LoraModule, load_adapter
from minilora.errors import InputError
from minilora.merge import merge_checkpoint
from minilora.safetensors_io import load_file
from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

U32 = float(np.finfo(np.float32).eps) / 2
TOL_FACTOR, TOL_SVD = 16 * U32, 16 * 20 * U32


def rel(out, ref):
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def product(m):
    return np.asarray(m.B, np.float64) @ np.asarray(m.A, np.float64)  # (N, K)


def peft_case(data_dir, version, case):
    folder = data_dir / "arithmetic"
    manifest = json.loads((folder / f"manifest-peft-{version}.json").read_text())
    expected = load_file(folder / f"expected-peft-{version}.safetensors")
    rec = manifest["cases"][case]
    adapters = [load_adapter(folder / "inputs" / a) for a in rec["adapters"]]
    ref = {k.split("/")[1]: None for k in expected if k.startswith(case + "/") and "/mask/" not in k}
    for name in ref:
        ref[name] = (expected[f"{case}/{name}/B"].astype(np.float64)
                     @ expected[f"{case}/{name}/A"].astype(np.float64))  # (N, K), PEFT's raw B A
    masks = {(m, p, i): expected[f"{case}/mask/{m}/{p}/{i}"] for m, p, i in rec["masks"]}
    return rec, adapters, ref, masks


def run_case(rec, adapters, masks):
    return arithmetic.combine_adapters(
        adapters, rec["weights"], rec["combination_type"], rank=rec.get("svd_rank"), density=rec.get("density"),
        majority_sign=rec.get("majority_sign_method", "total"), masks=masks or None)


CASES_021 = ["p12_cat", "p12_linear", "p12_svd", "p12_ties", "p12_ties_frequency", "p12_ties_svd",
             "p12_dare_linear", "p12_dare_ties", "p12_dare_linear_svd", "p12_dare_ties_svd",
             "p12_magnitude_prune", "p12_magnitude_prune_svd", "p13_cat", "p13_svd", "p13_svd_r3",
             "p41_cat", "p41_svd"]


def test_manifest_records_the_oracle_versions(data_dir):
    for version in ("0.21.2", "0.20.0"):
        m = json.loads((data_dir / "arithmetic" / f"manifest-peft-{version}.json").read_text())
        assert m["peft"] == version and m["torch"] and m["generator"].endswith("make_arithmetic_vectors.py")
    m = json.loads((data_dir / "arithmetic" / "manifest-peft-0.21.2.json").read_text())
    assert sorted(m["cases"]) == sorted(CASES_021)
    methods = {c["combination_type"] for c in m["cases"].values()}
    assert methods == set(arithmetic.METHODS)  # every method PEFT has


@pytest.mark.parametrize("case", CASES_021)
def test_matches_peft_add_weighted_adapter(data_dir, case):
    rec, adapters, ref, masks = peft_case(data_dir, "0.21.2", case)
    config, modules, rows = run_case(rec, adapters, masks)
    assert {m.name for m in modules} == set(ref)
    tol = TOL_SVD if rec["combination_type"].endswith("svd") else TOL_FACTOR
    for m in modules:
        assert rel(product(m), ref[m.name]) <= tol, m.name
    assert config["r"] == config["lora_alpha"] and not config["use_rslora"]
    assert config["rank_pattern"] == config["alpha_pattern"]


def test_dare_masks_were_recorded_and_matter(data_dir):
    """The injected masks are what makes DARE match: our own RNG gives a different (valid) result."""
    rec, adapters, ref, masks = peft_case(data_dir, "0.21.2", "p12_dare_linear")
    assert len(masks) == 2 * 2 * 2 + 2 * 2  # q, v: 2 adapters × A, B; emb, o: 1 adapter × A, B
    _, modules, _ = arithmetic.combine_adapters(adapters, rec["weights"], "dare_linear", density=0.6, seed=0)
    assert max(rel(product(m), ref[m.name]) for m in modules) > 1e-2
    again = arithmetic.combine_adapters(adapters, rec["weights"], "dare_linear", density=0.6, seed=0)[1]
    assert all(np.array_equal(a.A, b.A) for a, b in zip(modules, again))  # seeded: reproducible


def test_missing_injected_mask_is_an_error(data_dir):
    rec, adapters, _, masks = peft_case(data_dir, "0.21.2", "p12_dare_ties")
    masks.pop(next(iter(masks)))
    with pytest.raises(InputError, match="no DARE mask"):
        run_case(rec, adapters, masks)


# ------------------------------------------------------------------------ PEFT defects, demonstrated

def test_peft_021_inherits_rslora_and_inflates_by_sqrt_r(data_dir):
    """p4 (rsLoRA) first: PEFT 0.21 keeps use_rslora=True with r = alpha = r', so the combined adapter
    applies √r' · B A. Its raw B A is right (and equals ours); its effective ΔW is √r' too large."""
    rec, adapters, ref, _ = peft_case(data_dir, "0.21.2", "p41_cat")
    assert rec["peft_config"] == {"r": 8, "lora_alpha": 8, "use_rslora": True}
    config, modules, rows = run_case(rec, adapters, {})
    terms, _ = arithmetic.module_terms(adapters, rec["weights"])
    for m in modules:
        exact = sum(t.w * t.s * (t.B.astype(np.float64) @ t.A.astype(np.float64)) for t in terms[m.name])
        peft_effective = rec["scaling"][m.name] * ref[m.name]
        ours_effective = lora.scaling(config["lora_alpha"], config["r"], config["use_rslora"]) * product(m)
        assert rel(ours_effective, exact) <= TOL_FACTOR
        assert rec["scaling"][m.name] == pytest.approx(math.sqrt(8))
        assert rel(peft_effective, exact) == pytest.approx(math.sqrt(8) - 1, rel=1e-5)


def test_peft_020_svd_scaled_twice(data_dir):
    """PEFT ≤ 0.20 weighted the deltas s·B A by w·s: its SVD paths compute Σ w s² B A. Our reference
    reproduces exactly that when fed w·s, and our svd (w only) is the exact sum, not PEFT 0.20's."""
    for case in ("p12_svd", "p13_svd", "p12_magnitude_prune_svd"):
        rec, adapters, ref, _ = peft_case(data_dir, "0.20.0", case)
        terms, _ = arithmetic.module_terms(adapters, rec["weights"])
        _, modules, _ = run_case(rec, adapters, {})
        for m in modules:
            ts = terms[m.name]
            doubled = [arithmetic.Term(t.index, t.A, t.B, t.s, t.w * t.s) for t in ts]
            A, B = arithmetic.combine_module(doubled, rec["combination_type"], m.A.shape[0], rec.get("density") or 1.0)
            assert rel(B @ A, ref[m.name]) <= TOL_SVD, (case, m.name)
            assert rel(product(m), ref[m.name]) > 0.3, (case, m.name)  # s = 1..4 here: far off


# ------------------------------------------------------------------------ properties

def make_adapter(seed, r=4, alpha=8, modules=(("m.q", 12, 10), ("m.v", 6, 10)), embedding=("m.emb", 8, 14),
                 rslora=False, rank_pattern=None, alpha_pattern=None, base=None):
    rng = np.random.default_rng(seed)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
           "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {},
           "base_model_name_or_path": base, "target_modules": [n for n, *_ in modules]}
    out = Adapter(path=f"<adapter {seed}>", config=cfg)
    specs = [(n, N, K, "linear") for n, N, K in modules] + ([(*embedding, "embedding")] if embedding else [])
    for name, N, K, kind in specs:
        rk, _ = lora.module_rank_alpha(name, r, alpha, rank_pattern, alpha_pattern)
        out.modules[name] = LoraModule(name, kind, A=rng.standard_normal((rk, K)).astype(np.float32),
                                       B=rng.standard_normal((N, rk)).astype(np.float32))
    return out


def mixed_adapters():
    """Different ranks, rsLoRA, rank / alpha patterns, partially overlapping modules."""
    return [make_adapter(1, r=4, alpha=8),
            make_adapter(2, r=2, alpha=4, rslora=True, modules=(("m.q", 12, 10), ("m.o", 10, 6)), embedding=None),
            make_adapter(3, r=3, alpha=3, rank_pattern={"v": 5}, alpha_pattern={"v": 20})]


def exact_sum(adapters, weights):
    terms, _ = arithmetic.module_terms(adapters, weights)
    return {n: sum(t.w * t.s * (t.B.astype(np.float64) @ t.A.astype(np.float64)) for t in ts)
            for n, ts in terms.items()}


def test_cat_is_exact_for_any_mix():
    adapters, weights = mixed_adapters(), [0.5, -1.5, 2.0]
    ref = exact_sum(adapters, weights)
    config, modules, rows = arithmetic.combine_adapters(adapters, weights, "cat")
    for m, row in zip(modules, rows):
        assert rel(product(m), ref[m.name]) <= TOL_FACTOR and row["rel_error"] <= TOL_FACTOR
    ranks = {r["module"]: r["rank_out"] for r in rows}
    assert ranks == {"m.q": 9, "m.v": 9, "m.emb": 7, "m.o": 2}
    assert config["r"] == config["lora_alpha"] == 9 and config["use_rslora"] is False
    for name, k in ranks.items():  # every module's effective scale is 1
        r, alpha = lora.module_rank_alpha(name, config["r"], config["lora_alpha"], config["rank_pattern"],
                                          config["alpha_pattern"])
        assert r == alpha == k


def test_svd_at_full_rank_is_the_exact_sum():
    adapters, weights = mixed_adapters(), [1.0, 0.25, -0.5]
    ref = exact_sum(adapters, weights)
    _, modules, rows = arithmetic.combine_adapters(adapters, weights, "svd", rank=6)
    exact = 0
    for m, row in zip(modules, rows):
        S = np.linalg.svd(ref[m.name], compute_uv=False)
        optimal = np.sqrt(np.sum(S[6:] ** 2) / np.sum(S**2))  # 0 when rank(D) ≤ 6: full rank
        exact += optimal == 0 or optimal < 1e-12
        assert row["rel_error"] == pytest.approx(optimal, rel=1e-5, abs=TOL_FACTOR)
        assert rel(product(m), ref[m.name]) == pytest.approx(optimal, rel=1e-5, abs=TOL_FACTOR)
    assert 0 < exact < len(rows)  # both kinds of module occur


@given(r1=st.integers(1, 5), r2=st.integers(1, 5), N=st.integers(1, 9), K=st.integers(1, 9),
       w=st.floats(-3, 3, allow_nan=False), seed=st.integers(0, 2**16))
def test_cat_and_full_rank_svd_are_exact_for_any_shape(r1, r2, N, K, w, seed):
    a = make_adapter(seed, r=r1, alpha=2 * r1, modules=(("m.x", N, K),), embedding=None)
    b = make_adapter(seed + 1, r=r2, alpha=3, rslora=True, modules=(("m.x", N, K),), embedding=None)
    ref = exact_sum([a, b], [1.0, w])["m.x"]
    scale = np.linalg.norm(ref) + np.linalg.norm(exact_sum([a], [1.0])["m.x"])  # guards w ≈ cancellation
    for method, rank in (("cat", None), ("svd", min(r1 + r2, N, K))):
        _, (m,), _ = arithmetic.combine_adapters([a, b], [1.0, w], method, rank=rank)
        assert np.linalg.norm(product(m) - ref) <= 64 * U32 * scale, method


@pytest.mark.parametrize("method", arithmetic.METHODS)
def test_one_adapter_with_weight_one_is_the_identity(method):
    adapter = make_adapter(7, r=4, alpha=12, rslora=True)
    ref = exact_sum([adapter], [1.0])
    density = 1.0 if method in arithmetic.DENSITY_METHODS else None
    _, modules, rows = arithmetic.combine_adapters([adapter], [1.0], method, density=density)
    for m in modules:
        assert rel(product(m), ref[m.name]) <= 1e-6


def test_task_arithmetic_negation_and_difference_are_exact():
    a, b = make_adapter(1), make_adapter(2, r=2, alpha=16)
    ref = exact_sum([a, b], [1.0, -1.0])
    _, modules, _ = arithmetic.combine_adapters([a, b], [1.0, -1.0], "cat")
    assert all(rel(product(m), ref[m.name]) <= TOL_FACTOR for m in modules)
    _, neg, _ = arithmetic.combine_adapters([a], [-1.0], "cat")
    assert all(rel(product(m), -exact_sum([a], [1.0])[m.name]) <= TOL_FACTOR for m in neg)


def test_linear_is_an_approximation_with_cross_terms():
    a, b = make_adapter(1), make_adapter(2)
    _, modules, rows = arithmetic.combine_adapters([a, b], [1.0, 1.0], "linear")
    assert min(r["rel_error"] for r in rows if len(r["adapters"]) == 2) > 0.1


def test_ties_sign_election_and_disjoint_mean():
    t = [np.array([[3.0, -1.0, 0.0, 2.0]]), np.array([[-1.0, -1.0, 0.0, -2.0]])]
    out = ties.merge_tensors("ties", t, [1.0, 1.0], density=1.0)
    # entry 0: total +2 → +, keeps 3; entry 1: both −; entry 2: nothing → 0; entry 3: tie → +, keeps 2
    np.testing.assert_array_equal(out, [[3.0, -1.0, 0.0, 2.0]])
    freq = ties.merge_tensors("ties", [np.array([5.0, 1.0]), np.array([-1.0, -1.0]), np.array([-1.0, 2.0])],
                              [1.0, 1.0, 1.0], majority_sign="frequency")
    np.testing.assert_array_equal(freq, [-1.0, 1.5])
    np.testing.assert_array_equal(ties.prune_magnitude(np.array([1.0, -4.0, 2.0, 3.0]), 0.5), [0, -4.0, 0, 3.0])


def test_svd_clamp_bounds_the_factors():
    adapters = mixed_adapters()
    _, modules, _ = arithmetic.combine_adapters(adapters, [1, 1, 1], "svd", rank=3, clamp=0.9)
    _, free, _ = arithmetic.combine_adapters(adapters, [1, 1, 1], "svd", rank=3)
    for m, f in zip(modules, free):
        hi = np.quantile(np.concatenate([f.B.ravel(), f.A.ravel()]), 0.9)
        assert np.abs(m.A).max() <= hi + 1e-6 and np.abs(m.B).max() <= hi + 1e-6
        assert np.abs(f.B).max() > hi  # the clamp did something


def test_resize_to_full_rank_is_lossless_and_reports_discarded_energy():
    adapter = make_adapter(4, r=5, alpha=10, rslora=True, rank_pattern={"q": 7}, alpha_pattern={"q": 3})
    ref = exact_sum([adapter], [1.0])
    config, modules, rows = extract.resize_adapter(adapter, rank=6)
    for m, row in zip(modules, rows):
        S = np.linalg.svd(ref[m.name], compute_uv=False)
        if row["rank_in"] <= 6:
            assert rel(product(m), ref[m.name]) <= 1e-6 and row["discarded_energy"] <= 1e-12
        else:
            assert row["discarded_energy"] == pytest.approx(np.sum(S[6:] ** 2) / np.sum(S**2), rel=1e-9)
            assert rel(product(m), ref[m.name]) == pytest.approx(row["rel_error"], rel=1e-5)
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"]
    _, by_energy, erows = extract.resize_adapter(adapter, energy=0.9)
    assert all(r["discarded_energy"] <= 0.1 + 1e-12 for r in erows)


def test_choose_rank_by_energy():
    S = np.array([3.0, 2.0, 1.0, 0.0])
    total = float(np.sum(S**2))  # 14
    assert extract.choose_rank(S, total, energy=9 / 14) == 1
    assert extract.choose_rank(S, total, energy=0.8) == 2
    assert extract.choose_rank(S, total, energy=1.0) == 3
    assert extract.choose_rank(S, total, rank=2, energy=1.0) == 2


def test_randomized_svd_is_close_to_the_exact_truncation():
    rng = np.random.default_rng(0)
    D = (rng.standard_normal((300, 8)) @ rng.standard_normal((8, 200))
         + 0.01 * rng.standard_normal((300, 200))).astype(np.float32)  # (300, 200): rank 8 + noise
    A, B, info = extract.low_rank(D, rank=8, svd="randomized")
    S = np.linalg.svd(D.astype(np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(S[8:] ** 2) / np.sum(S**2))
    assert info["svd"] == "randomized" and info["rel_error"] <= optimal * (1 + 1e-4)
    assert info["rel_error"] == pytest.approx(rel(B.astype(np.float64) @ A, D.astype(np.float64)), rel=1e-4)


def test_extract_recovers_a_merged_adapter(tmp_path):
    """W_ft = fp32(W_base + s·B A): extraction at rank ≥ r recovers s·B A up to the rounding of W_ft
    (≤ u·|W_ft| per entry) and the float32 SVD (≤ 20 u·‖ΔW‖, p(n) margin)."""
    config = llama_config(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, vocab=64, dtype="float32")
    write_llama_checkpoint(tmp_path / "base", config, seed=0)
    write_lora_adapter(tmp_path / "ad", config, rank=4, alpha=8, seed=3, std=0.05)
    merge_checkpoint(tmp_path / "base", [tmp_path / "ad"], tmp_path / "ft")
    adapter = load_adapter(tmp_path / "ad")
    ft = load_file(tmp_path / "ft" / "model.safetensors")
    for rank in (4, 6):
        out = tmp_path / f"lora{rank}"
        report = extract.extract_checkpoints(tmp_path / "base", tmp_path / "ft", out, rank=rank)
        got = load_adapter(out)
        assert set(got.modules) == set(adapter.modules) and got.config["r"] == got.config["lora_alpha"] == rank
        for name, m in adapter.modules.items():
            ref = 2.0 * (m.B.astype(np.float64) @ m.A)  # s = alpha / r = 2
            tol = U32 * np.linalg.norm(ft[name + ".weight"]) + 20 * U32 * np.linalg.norm(ref)
            assert np.linalg.norm(product(got.modules[name]) - ref) <= tol, name
        assert "model.embed_tokens.weight" in report["unchanged"] and report["full_rank"] == []


# ------------------------------------------------------------------------ bad input

def test_bad_inputs_are_one_line_errors():
    a, b = make_adapter(1), make_adapter(2)
    cases = [
        (lambda: arithmetic.combine_adapters([a, b], [1.0], "cat"), "2 adapters"),
        (lambda: arithmetic.combine_adapters([a, b], [1.0, 1.0], "ties", density=0.0), r"density must be in \(0, 1\]"),
        (lambda: arithmetic.combine_adapters([a, b], [1.0, 1.0], "ties", density=1.5), r"density must be in \(0, 1\]"),
        (lambda: arithmetic.combine_adapters([a, b], [1.0, 1.0], "ties"), "needs a density"),
        (lambda: arithmetic.combine_adapters([a, b], [1.0, 1.0], "svd", rank=0), "positive integer"),
        (lambda: arithmetic.combine_adapters([a, b], [1.0, 1.0], "svd", rank=7), r"exceeds min\(N, K\) = 6"),
        (lambda: arithmetic.combine_adapters([a, b], [1.0, 1.0], "cat", rank=2), "svd methods only"),
        (lambda: arithmetic.combine_adapters([a, b], [1.0, 1.0], "average"), "unknown method"),
        (lambda: arithmetic.combine_adapters([a, make_adapter(2, r=2)], [1.0, 1.0], "linear"), "equal ranks"),
        (lambda: extract.resize_adapter(a, rank=0), "positive integer"),
        (lambda: extract.resize_adapter(a, rank=11), r"exceeds min\(N, K\)"),
        (lambda: extract.resize_adapter(a), "give a rank"),
    ]
    for call, message in cases:
        with pytest.raises(InputError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


def test_different_base_models_and_shape_conflicts():
    a = make_adapter(1, base="meta-llama/Llama-3.2-1B")
    b = make_adapter(2, base="Qwen/Qwen2.5-0.5B")
    with pytest.raises(InputError, match="different base models"):
        arithmetic.combine_adapters([a, b], [1.0, 1.0], "cat")
    c = make_adapter(3, modules=(("m.q", 12, 11),))
    with pytest.raises(InputError, match=r"m\.q: shape conflict"):
        arithmetic.combine_adapters([make_adapter(1), c], [1.0, 1.0], "cat")
    n = make_adapter(5)
    n.modules["m.v"].B[0, 0] = np.nan
    with pytest.raises(InputError, match=r"m\.v: lora_A or lora_B holds NaN/inf"):
        arithmetic.combine_adapters([make_adapter(1), n], [1.0, 1.0], "cat")
    d = make_adapter(4)
    d.modules["m.q"].magnitude = np.ones(12, np.float32)
    with pytest.raises(InputError, match="DoRA"):
        arithmetic.combine_adapters([make_adapter(1), d], [1.0, 1.0], "cat")
