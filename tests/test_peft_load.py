"""The adapters minilora writes load in PEFT: ``PeftModel.from_pretrained`` finds every tensor, and the
ΔW PEFT then computes equals minilora's (combine, resize, extract, train outputs). Needs peft and
transformers (test extras); skipped without them."""
import json
import os
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from minilora import lora  # noqa: E402
from minilora.checkpoint import load_adapter  # noqa: E402
from minilora.cli.main import cli  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
MODEL = os.path.join(DATA, "models", "tiny-llama")


def _peft_deltas(folder):
    base = transformers.LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, folder)
    missing = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert not missing, missing
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            key = name.replace("base_model.model.", "", 1)
            out[key] = module.get_delta_weight("default").detach().numpy()
    return out


def _our_deltas(folder):
    adapter = load_adapter(folder)
    cfg = adapter.config
    out = {}
    for name, m in adapter.modules.items():
        r, alpha = lora.module_rank_alpha(name, cfg["r"], cfg["lora_alpha"], cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
        out[name] = lora.delta_weight(m.A, m.B, lora.scaling(alpha, r, bool(cfg.get("use_rslora"))))
    return out


def _check(folder):
    ours, theirs = _our_deltas(folder), _peft_deltas(folder)
    assert ours.keys() == theirs.keys() and ours
    for key in ours:
        np.testing.assert_array_equal(theirs[key], ours[key], err_msg=key)   # same FMA order on CPU


@pytest.mark.parametrize("args", [
    ["combine", "{a}/llama-lora", "{a}/llama-rslora", "--weights", "0.5,0.5", "--method", "cat"],
    ["combine", "{a}/llama-lora", "{a}/llama-lora", "--weights", "1,-0.5", "--method", "svd", "--rank", "4"],
    ["resize", "{a}/llama-lora", "--rank", "4"],
], ids=["combine-cat", "combine-svd", "resize"])
def test_arithmetic_outputs_load_in_peft(tmp_path, args):
    args = [a.format(a=os.path.join(DATA, "adapters")) for a in args]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    _check(tmp_path / "out")


def test_extract_output_loads_in_peft(tmp_path):
    assert CliRunner().invoke(cli, ["merge", MODEL, os.path.join(DATA, "adapters", "llama-lora"),
                                    "-o", str(tmp_path / "ft")]).exit_code == 0
    r = CliRunner().invoke(cli, ["extract", MODEL, str(tmp_path / "ft"), "--rank", "8", "-o", str(tmp_path / "x")])
    assert r.exit_code == 0, r.output
    _check(tmp_path / "x")
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["peft_type"] == "LORA"
