"""``minilora merge`` on real-layout Hugging Face checkpoints and PEFT adapters against PEFT's own
``merge_and_unload`` + ``save_pretrained`` output (tests/data/expected, made by make_tiny_models.py).

Every LoRA merge is bit-identical with PEFT's, in float32 and bf16: the reference computes ΔW in
PEFT's CPU order (a float32 FMA chain over r) and rounds W + ΔW once. DoRA's row norm is a reduction
(float64 here, float32 in PEFT): within its bound. PEFT's Embedding merge rounds ΔW to the base dtype
before adding; in float32 that rounding is the identity, so it is bit-identical too.
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


def _within_dora_bound(out, ref, base, terms):
    """DoRA: W' = (m/n)(W + ΔW) with the row norm n a length-K reduction (float64 here, float32 in
    PEFT): |n_ours − n_peft| ≤ γ_K·n, so |out − ref| ≤ (γ_K + 4u)·|m/n|·(|W| + |ΔW|) elementwise;
    with m/n ≈ 1 (the magnitude starts at n; the factor 2 covers m/n ≤ 2). K: the layer's own input size.
    (Tighter checks of DoRA against PEFT's own numbers: test_peft_vectors.py and test_dora.py.)"""
    W, R = base.astype(np.float64), ref.astype(np.float64)
    K = W.shape[-1] if W.ndim == 2 else 1
    bound = (K * U / (1 - K * U) + 4 * U) * 2 * (np.abs(W) + terms + np.abs(R)) + np.finfo(np.float32).tiny
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
        if "dora" in case["adapter"]:
            terms = _abs_terms(adapter).get(key, np.zeros(ref.shape))
            assert _within_dora_bound(out, ref, original[key], terms), key
        else:
            assert out.tobytes() == ref.tobytes(), key                      # bit-identical with PEFT
    assert changed > 0
    report = json.loads(result.stdout)
    assert report["totals"]["changed"] >= 1
