"""``minilora combine`` / ``resize`` / ``extract`` end to end on synthetic Llama-layout checkpoints and
adapters: the outputs are PEFT adapter folders with scaling 1, the --json reports, and one test per
kind of bad input (one line on stderr, exit code 2)."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from minilora import lora
from minilora.checkpoint import load_adapter, read_json, write_json
from minilora.cli.main import cli
from minilora.safetensors_io import load_file
from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

CONFIG = llama_config(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64, dtype="float32")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("arith")
    write_llama_checkpoint(root / "base", CONFIG, seed=0)
    write_llama_checkpoint(root / "ft", CONFIG, seed=5)
    write_lora_adapter(root / "a1", CONFIG, rank=4, alpha=8, seed=1)
    write_lora_adapter(root / "a2", CONFIG, rank=2, alpha=4, targets=("q_proj", "v_proj"), seed=2, use_rslora=True)
    other = llama_config(hidden=48, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)
    write_lora_adapter(root / "wide", other, rank=4, alpha=8, seed=3)
    write_lora_adapter(root / "named", CONFIG, rank=4, alpha=8, seed=4)
    cfg = read_json(root / "named" / "adapter_config.json")
    write_json(root / "named" / "adapter_config.json", {**cfg, "base_model_name_or_path": "some/other-model"})
    write_lora_adapter(root / "named2", CONFIG, rank=4, alpha=8, seed=5)
    cfg = read_json(root / "named2" / "adapter_config.json")
    write_json(root / "named2" / "adapter_config.json", {**cfg, "base_model_name_or_path": "my/base"})
    return root


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def delta(adapter, name):
    cfg, m = adapter.config, adapter.modules[name]
    r, alpha = lora.module_rank_alpha(name, cfg["r"], cfg["lora_alpha"], cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
    return lora.scaling(alpha, r, cfg.get("use_rslora", False)) * (m.B.astype(np.float64) @ m.A)  # (N, K)


def test_combine_cat_writes_an_exact_scaling_one_adapter(models, tmp_path):
    code, out, err = run("combine", models / "a1", models / "a2", "--weights", "0.5,-1", "-o", tmp_path / "c", "--json")
    assert code == 0, err
    report = json.loads(out)
    a1, a2, got = load_adapter(models / "a1"), load_adapter(models / "a2"), load_adapter(tmp_path / "c")
    assert got.config["use_rslora"] is False and got.config["r"] == got.config["lora_alpha"]
    for row in report["modules"]:
        name = row["module"]
        ref = 0.5 * delta(a1, name) - (delta(a2, name) if name in a2.modules else 0)
        assert np.linalg.norm(delta(got, name) - ref) <= 1e-6 * np.linalg.norm(ref)
        assert row["rel_error"] < 1e-6 and row["rank_out"] == sum(row["rank_in"])
    assert report["totals"]["modules"] == len(a1.modules)


def test_combine_svd_reports_rank_and_error(models, tmp_path):
    code, out, err = run("combine", models / "a1", models / "a2", "--weights=-0.5,1", "--method", "svd",
                         "--rank", "3", "-o", tmp_path / "s", "--json")
    assert code == 0, err
    rows = json.loads(out)["modules"]
    assert {r["rank_out"] for r in rows} == {3}
    assert all(0 < r["rel_error"] < 1 for r in rows)
    code, out, _ = run("combine", models / "a1", "--method", "ties", "--density", "0.5", "-o", tmp_path / "t")
    assert code == 0 and "combined (ties)" in out and "largest relative error" in out


def test_resize_and_its_report(models, tmp_path):
    code, out, err = run("resize", models / "a1", "--rank", "2", "-o", tmp_path / "r", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert all(r["rank_in"] == 4 and r["rank_out"] == 2 and 0 < r["discarded_energy"] < 1 for r in report["modules"])
    assert load_adapter(tmp_path / "r").config["r"] == 2
    code, out, err = run("resize", models / "a1", "--rank", "4", "-o", tmp_path / "full")
    assert code == 0 and "discarded energy" in out
    a1, full = load_adapter(models / "a1"), load_adapter(tmp_path / "full")
    for name in a1.modules:
        assert np.linalg.norm(delta(full, name) - delta(a1, name)) <= 1e-6 * np.linalg.norm(delta(a1, name))


def test_extract_streams_both_checkpoints(models, tmp_path):
    code, out, err = run("extract", models / "base", models / "ft", "--rank", "4", "-o", tmp_path / "x", "--json")
    assert code == 0, err
    report = json.loads(out)
    got = load_adapter(tmp_path / "x")
    assert report["full_rank"] == ["model.embed_tokens.weight"]
    assert got.config["modules_to_save"] == ["model.embed_tokens"]
    ft = load_file(models / "ft" / "model.safetensors")
    np.testing.assert_array_equal(got.full_tensors["model.embed_tokens.weight"], ft["model.embed_tokens.weight"])
    assert len(got.modules) == 2 * 7 + 1  # every Linear and lm_head
    assert all(r["rank_out"] == 4 and 0 < r["rel_error"] < 1 for r in report["modules"])
    code, out, err = run("extract", models / "base", models / "ft", "--energy", "0.5", "--embed-lora",
                         "-o", tmp_path / "e", "-q")
    assert code == 0, err
    got = load_adapter(tmp_path / "e")
    assert got.modules["model.embed_tokens"].kind == "embedding" and got.config["modules_to_save"] is None
    assert len({m.A.shape[0] for m in got.modules.values()}) > 1 and got.config["rank_pattern"]


@pytest.mark.parametrize("args, message", [
    (["combine", "{a1}", "{a2}", "--weights", "1", "-o", "{out}"], "got 1 weights for 2 adapters"),
    (["combine", "{a1}", "{a2}", "--weights", "1,x", "-o", "{out}"], "numbers separated by commas"),
    (["combine", "{a1}", "{a2}", "--method", "ties", "--density", "0", "-o", "{out}"], r"density must be in \(0, 1\]"),
    (["combine", "{a1}", "{a2}", "--method", "dare_linear", "--density", "1.2", "-o", "{out}"], r"density must be in \(0, 1\]"),
    (["combine", "{a1}", "{a2}", "--method", "svd", "--rank", "0", "-o", "{out}"], "positive integer"),
    (["combine", "{a1}", "{a2}", "--method", "svd", "--rank", "40", "-o", "{out}"], r"exceeds min\(N, K\)"),
    (["combine", "{a1}", "{a2}", "--method", "linear", "-o", "{out}"], "needs equal ranks"),
    (["combine", "{a1}", "{wide}", "-o", "{out}"], "shape conflict"),
    (["combine", "{named}", "{named2}", "-o", "{out}"], "different base models"),
    (["resize", "{a1}", "--rank", "-1", "-o", "{out}"], "positive integer"),
    (["resize", "{a1}", "--rank", "33", "-o", "{out}"], r"exceeds min\(N, K\)"),
    (["extract", "{base}", "{ft}", "-o", "{out}"], "give a rank"),
    (["extract", "{base}", "{ft}", "--rank", "100", "-o", "{out}"], r"exceeds min\(N, K\)"),
    (["extract", "{base}", "{ft}", "--rank", "0", "-o", "{out}"], "positive integer"),
    (["extract", "{base}", "{base}", "--rank", "2", "-o", "{out}"], "no Linear weight differs"),
])
def test_bad_input_is_one_line_exit_2(models, tmp_path, args, message):
    paths = {k: models / k for k in ("a1", "a2", "wide", "named", "named2", "base", "ft")}
    code, out, err = run(*[a.format(out=tmp_path / "out", **paths) for a in args])
    assert code == 2, (out, err)
    last = err.strip().splitlines()[-1]  # progress lines may come first
    assert last.startswith("minilora: error: ") and "Traceback" not in err
    assert re.search(message, last), err
    assert not (tmp_path / "out").exists()


def test_extract_of_different_models_names_the_tensor(models, tmp_path):
    write_llama_checkpoint(tmp_path / "other", llama_config(hidden=48, intermediate=64, layers=2, vocab=64), seed=0)
    code, _, err = run("extract", models / "base", tmp_path / "other", "--rank", "2", "-o", tmp_path / "out")
    assert code == 2 and "model.embed_tokens.weight: shape (64, 48) here but (64, 32) in the base" in err


def test_existing_output_needs_force(models, tmp_path):
    assert run("resize", models / "a1", "--rank", "2", "-o", tmp_path / "r")[0] == 0
    code, _, err = run("resize", models / "a1", "--rank", "2", "-o", tmp_path / "r")
    assert code == 2 and "--force" in err
    assert run("resize", models / "a1", "--rank", "2", "-o", tmp_path / "r", "--force")[0] == 0


def test_combine_as_a_subprocess(models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "minilora", "combine", str(models / "a1"), str(models / "a1"),
                           "--weights", "1,1", "--method", "svd", "-o", str(tmp_path / "twice")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)  # not the source tree
    assert proc.returncode == 0, proc.stderr
    a1, twice = load_adapter(models / "a1"), load_adapter(tmp_path / "twice")
    name = next(iter(a1.modules))
    assert np.linalg.norm(delta(twice, name) - 2 * delta(a1, name)) <= 1e-6 * np.linalg.norm(delta(a1, name))
