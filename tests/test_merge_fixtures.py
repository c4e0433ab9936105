"""``minilora merge`` on real-layout Hugging Face checkpoints and PEFT adapters against PEFT's own
``merge_and_unload`` + ``save_pretrained`` output (tests/data/expected, made by make_tiny_models.py).

bf16 merges are bit-identical. float32 merges may differ from PEFT by 1 ulp: PEFT's ΔW = B A comes
from a float32 BLAS product (a sequential FMA sum over r on CPU), ours from a float64 sum rounded once
(tests/data/README.md). DoRA's row norm is a reduction: within its derived bound. PEFT's Embedding
merge rounds ΔW before adding (two roundings, unlike its Linear merge); ours rounds once.
"""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minilora import lora
from minilora.checkpoint import load_adapter
from minilora.cli.main import cli
from minilora.safetensors_io import load_file

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = json.load(open(os.path.join(DATA, "fixtures.json")))["merges"]


U = 2.0 ** -24


def _abs_terms(adapter_dir):
    """``{base key: |s|·|B||A|}`` in the base layout: the size of the terms ΔW is summed from."""
    adapter = load_adapter(adapter_dir)
    cfg, out = adapter.config, {}
    for name, m in adapter.modules.items():
        r, alpha = lora.module_rank_alpha(name, cfg["r"], cfg["lora_alpha"], cfg.get("rank_pattern"),
                                          cfg.get("alpha_pattern"))
        s = lora.scaling(alpha, r, bool(cfg.get("use_rslora")))
        t = abs(s) * (np.abs(m.B.astype(np.float64)) @ np.abs(m.A.astype(np.float64)))  # (N, K)
        out[f"{name}.weight"] = t.T if m.kind == "embedding" or cfg.get("fan_in_fan_out") else t
    return out


def _within_merge_bound(out, ref, base, terms):
    """float32: both sides round W + ΔW to float32 once (≤ u|W + ΔW| each) from ΔW that differ by at
    most the float32 rounding of a length-r sum: γ_r·|s||B||A| + u|ΔW| on each side. PEFT's Embedding
    merge adds one more rounding of ΔW."""
    W, R = base.astype(np.float64), ref.astype(np.float64)
    r = 64  # an upper bound on the ranks in the fixtures
    bound = 2 * U * (np.abs(W) + 2 * np.abs(R - W)) + 2 * (r + 2) * U * terms + np.finfo(np.float32).tiny
    return bool(np.all(np.abs(out.astype(np.float64) - R) <= bound))


@pytest.mark.parametrize("case", FIXTURES, ids=lambda c: f"{os.path.basename(c['adapter'])}-{c['dtype']}")
def test_merge_matches_peft(tmp_path, case):
    base, adapter = os.path.join(DATA, case["base"]), os.path.join(DATA, case["adapter"])
    result = CliRunner().invoke(cli, ["merge", base, adapter, "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    ours = load_file(tmp_path / "out" / "model.safetensors")
    expected = load_file(os.path.join(DATA, case["expected"], "model.safetensors"))
    original = load_file(os.path.join(base, "model.safetensors")) if os.path.isfile(
        os.path.join(base, "model.safetensors")) else None
    assert set(ours) == set(expected)
    changed = 0
    for key, ref in expected.items():
        out = ours[key]
        assert out.dtype == ref.dtype and out.shape == ref.shape, key
        if original is not None and original[key].tobytes() != ref.tobytes():
            changed += 1
        if case["dtype"] == "bfloat16":
            assert out.tobytes() == ref.tobytes(), key                      # bit-identical with PEFT
        elif "dora" in case["adapter"]:
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7, err_msg=key)
        else:
            terms = _abs_terms(adapter).get(key, np.zeros(ref.shape))
            assert _within_merge_bound(out, ref, original[key], terms), key
    assert changed > 0
    report = json.loads(result.stdout)
    assert report["totals"]["changed"] >= 1
