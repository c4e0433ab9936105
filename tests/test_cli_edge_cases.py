"""unmerge / dequantize / diff / inspect on the inputs a third audit found mishandled: the round-trip report
under --dtype and for 4-bit bases, the dtype in config.json after --dtype, strict JSON, diff's option checks,
and parameter counts of 4-bit folders."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minilora import lora
from minilora.checkpoint import load_adapter
from minilora.cli.main import cli
from minilora.safetensors_io import load_file
from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

DATA = os.path.join(os.path.dirname(__file__), "data", "bnb")
CONFIG = llama_config(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=64, dtype="float32")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_llama_checkpoint(root / "base", CONFIG, seed=0)
    write_lora_adapter(root / "ad", CONFIG, rank=4, alpha=8, targets=("q_proj", "v_proj"), seed=1, std=0.1)
    return root


def test_unmerge_with_dtype_reports_the_round_trip_of_what_it_wrote(models, tmp_path):
    assert run("merge", models / "base", models / "ad", "-o", tmp_path / "m", "-q")[0] == 0
    code, out, err = run("unmerge", tmp_path / "m", models / "ad", "-o", tmp_path / "u", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    key = "model.layers.0.self_attn.q_proj.weight"
    row = next(r for r in json.loads(out)["tensors"] if r["name"] == key)
    written = load_file(tmp_path / "u" / "model.safetensors")[key]
    given = load_file(tmp_path / "m" / "model.safetensors")[key]
    m = load_adapter(models / "ad").modules[key[: -len(".weight")]]
    again = lora.merge_weight(written, m.A, m.B, 2.0).astype(np.float64)   # merged back in the written dtype
    assert row["roundtrip_max_abs_error"] == float(np.abs(again - given.astype(np.float64)).max()) > 0
    assert row["roundtrip_bit_exact_fraction"] == float((again == given.astype(np.float64)).mean()) < 0.5
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_4bit_unmerge_reports_a_round_trip_and_dtype_reaches_config(tmp_path):
    nf4 = os.path.join(DATA, "bnb-nf4-dq")
    write_lora_adapter(tmp_path / "ad", llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                                                     vocab=128), rank=4, targets=("q_proj",), seed=2, std=0.1)
    code, out, err = run("unmerge", nf4, tmp_path / "ad", "-o", tmp_path / "u", "--json")
    assert code == 0, err
    rows = [r for r in json.loads(out)["tensors"] if r["adapters"]]
    assert rows and all("roundtrip_max_abs_error" in r and "roundtrip_bit_exact_fraction" in r for r in rows)
    for folder, args in ((tmp_path / "dq", ["dequantize", nf4]), (tmp_path / "mg", ["merge", nf4, tmp_path / "ad"])):
        assert run(*args, "-o", folder, "--dtype", "float16", "-q")[0] == 0
        config = json.loads((folder / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "float16" and "quantization_config" not in config
        assert {str(v.dtype) for v in load_file(folder / "model.safetensors").values()} == {"float16"}


def test_diff_json_is_strict_and_options_are_checked(tmp_path):
    np.save(tmp_path / "a.npy", np.array([1.0, np.nan, 3.0], np.float32))
    np.save(tmp_path / "b.npy", np.array([1.0, 2.0, 3.0], np.float32))
    code, out, _ = run("diff", tmp_path / "a.npy", tmp_path / "b.npy", "--json")
    assert code == 1
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert report["tensors"][0]["max_abs_error"] == "inf"
    np.save(tmp_path / "x.npy", np.ones((4, 8), np.float32))
    np.save(tmp_path / "w.npy", np.ones((5, 6), np.float32))
    for args, message in ((["--rtol", "-1"], "--rtol must be"), (["--atol", "nan"], "--atol must be"),
                          (["--tensor", "nosuch"], "--tensor nosuch"), (["--x", tmp_path / "x.npy"], "--bound matmul"),
                          (["--bound", "matmul", "--x", tmp_path / "x.npy", "--w", tmp_path / "w.npy"], "must be (M, K)")):
        code, _, err = run("diff", tmp_path / "b.npy", tmp_path / "b.npy", *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)


def test_inspect_counts_parameters_of_4bit_weights_from_their_shapes():
    counts = []
    for name in ("tiny-llama-bf16", "bnb-nf4", "bnb-nf4-dq"):
        code, out, _ = run("inspect", os.path.join(DATA, name), "--json", "--no-tensors")
        info = json.loads(out)
        assert code == 0 and "tensors" not in info
        counts.append(info["parameters"])
    assert counts[0] == counts[1] == counts[2] == 78144


def test_dtype_conversion_that_overflows_is_refused_for_every_tensor(tmp_path):
    """--dtype float16 on a float32 tensor no adapter touches (a norm of 1e6): one line, not a silent inf."""
    write_llama_checkpoint(tmp_path / "b", CONFIG, seed=0)
    from minilora.safetensors_write import save_file
    tensors = load_file(tmp_path / "b" / "model.safetensors")
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], 1e6)
    save_file(tensors, tmp_path / "b" / "model.safetensors")
    write_lora_adapter(tmp_path / "ad", CONFIG, rank=4, targets=("q_proj",), seed=1)
    code, _, err = run("merge", tmp_path / "b", tmp_path / "ad", "-o", tmp_path / "o", "--dtype", "float16")
    assert code == 2 and "model.norm.weight" in err and "too large for float16" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o")


def test_requantize_report_counts_written_bytes_and_dequantize_wants_a_folder(tmp_path):
    nf4 = os.path.join(DATA, "bnb-nf4-dq")
    write_lora_adapter(tmp_path / "ad", llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                                                     vocab=128), rank=4, targets=("q_proj",), seed=2, std=0.1)
    code, out, err = run("merge", nf4, tmp_path / "ad", "-o", tmp_path / "rq", "--requantize", "--json")
    assert code == 0, err
    report = json.loads(out)
    size = os.path.getsize(tmp_path / "rq" / "model.safetensors")
    assert 0 < size - report["totals"]["bytes"] < 16384                     # the rest is the header
    code, _, err = run("dequantize", nf4, "-o", tmp_path / "dq.safetensors")
    assert code == 2 and "give -o a folder name" in err and not os.path.exists(tmp_path / "dq.safetensors")


def test_a_non_finite_scale_and_bad_environment_are_refused_up_front(models, tmp_path, monkeypatch):
    """`--scale nan` was reported as "the merge produced NaN ... the adapter is too large"; a bad
    MINILORA_NUM_THREADS as a problem of the first file and tensor merged."""
    for scale in ("nan", "inf", "-inf"):
        code, _, err = run("merge", models / "base", models / "ad", "-o", tmp_path / "o", "--scale", scale)
        assert code == 2 and "--scale must be a finite number" in err, err
    monkeypatch.setenv("MINILORA_NUM_THREADS", "abc")
    for args in (["merge", models / "base", models / "ad", "-o", tmp_path / "o"],
                 ["quantize", models / "base", "-o", tmp_path / "q"]):
        code, _, err = run(*args)
        assert code == 2 and err.startswith("minilora: error: MINILORA_NUM_THREADS must be"), err
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "q")


def test_unmerge_summary_never_rounds_a_fraction_up_to_one():
    from minilora.cli.merge import _floor

    assert _floor(0.9999981) == "0.9999" and _floor(1.0) == "1.0000" and _floor(0.5) == "0.5000"
