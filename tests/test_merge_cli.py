"""``minilora merge`` / ``unmerge`` / ``inspect`` end to end on synthetic Llama-layout checkpoints:
streaming behaviour, layouts, reports, and one test per kind of bad input."""
import hashlib
import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from minilora import lora
from minilora.checkpoint import Checkpoint, load_adapter
from minilora.cli.main import cli
from minilora.safetensors_io import load_file
from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

CONFIG = llama_config(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    write_llama_checkpoint(root / "base", CONFIG, seed=0)
    write_llama_checkpoint(root / "sharded", CONFIG, seed=0, max_shard_bytes=12_000)
    write_lora_adapter(root / "adapter", CONFIG, rank=4, alpha=8, seed=1)
    write_lora_adapter(root / "adapter2", CONFIG, rank=2, alpha=4, targets=("q_proj", "v_proj"), seed=2)
    (root / "base" / "tokenizer.json").write_text('{"model": {}}')
    return root


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def tree_digest(folder):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(dirpath, f), "rb").read())
    return h.hexdigest()


def test_merge_matches_the_reference_and_copies_the_rest(models, tmp_path):
    code, out, _ = run("merge", models / "base", models / "adapter", "-o", tmp_path / "m", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert report["totals"]["changed"] == 14            # 7 Linear layers x 2 blocks
    base = load_file(models / "base" / "model.safetensors")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    adapter = load_adapter(models / "adapter")
    assert list(merged) == list(base)
    for name, W in base.items():
        module = adapter.modules.get(name[: -len(".weight")])
        if module is None:
            assert merged[name].tobytes() == W.tobytes(), name      # byte-identical copy
            continue
        ref = lora.merge_weight(W, module.A, module.B, 2.0)
        assert merged[name].dtype == ml_dtypes.bfloat16
        assert merged[name].view(np.uint16).tobytes() == ref.view(np.uint16).tobytes(), name
    rows = {r["name"]: r for r in report["tensors"]}
    q = rows["model.layers.0.self_attn.q_proj.weight"]
    assert q["scale"] == [2.0] and q["dtype"] == "bfloat16" and q["max_abs_delta"] > 0
    assert (tmp_path / "m" / "config.json").read_text() == (models / "base" / "config.json").read_text()
    assert (tmp_path / "m" / "tokenizer.json").exists()


def test_no_fsync_writes_the_same_bytes_and_fsync_is_called_by_default(models, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    assert run("merge", models / "sharded", models / "adapter", "-o", tmp_path / "durable")[0] == 0
    shards = len([f for f in os.listdir(models / "sharded") if f.startswith("model-")])
    assert len(synced) == shards                       # one fsync per output shard, before its rename
    synced.clear()
    assert run("merge", models / "sharded", models / "adapter", "-o", tmp_path / "fast", "--no-fsync")[0] == 0
    assert synced == []
    assert tree_digest(tmp_path / "durable") == tree_digest(tmp_path / "fast")


def test_sharded_base_gives_the_same_tensors_and_keeps_its_shards(models, tmp_path):
    assert run("merge", models / "base", models / "adapter", "-o", tmp_path / "one")[0] == 0
    assert run("merge", models / "sharded", models / "adapter", "-o", tmp_path / "many")[0] == 0
    single = load_file(tmp_path / "one" / "model.safetensors")
    with Checkpoint(tmp_path / "many") as ckpt:
        shards = sorted(f for f in os.listdir(models / "sharded") if f.startswith("model-"))
        assert len(ckpt.readers) >= 3 and sorted(ckpt.readers) == shards
        for name in ckpt.keys():
            assert ckpt.get(name).tobytes() == single[name].tobytes(), name
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((models / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]


def test_scale_zero_is_the_identity_and_dtype_option(models, tmp_path):
    assert run("merge", models / "base", models / "adapter", "-o", tmp_path / "z", "--scale", "0")[0] == 0
    assert load_file(tmp_path / "z" / "model.safetensors").keys() == load_file(models / "base" / "model.safetensors").keys()
    for name, W in load_file(models / "base" / "model.safetensors").items():
        assert load_file(tmp_path / "z" / "model.safetensors")[name].tobytes() == W.tobytes()
    assert run("merge", models / "base", models / "adapter", "-o", tmp_path / "f", "--dtype", "float32")[0] == 0
    assert all(a.dtype == np.float32 for a in load_file(tmp_path / "f" / "model.safetensors").values())


def test_two_adapters_apply_in_order_and_unmerge_reports_the_round_trip(models, tmp_path):
    code, out, _ = run("merge", models / "base", models / "adapter", models / "adapter2", "-o", tmp_path / "m2", "--json")
    assert code == 0
    W = load_file(models / "base" / "model.safetensors")["model.layers.1.self_attn.v_proj.weight"]
    a1, a2 = load_adapter(models / "adapter"), load_adapter(models / "adapter2")
    m1, m2 = (a.modules["model.layers.1.self_attn.v_proj"] for a in (a1, a2))
    ref = lora.merge_weight(lora.merge_weight(W, m1.A, m1.B, 2.0), m2.A, m2.B, 2.0)
    got = load_file(tmp_path / "m2" / "model.safetensors")["model.layers.1.self_attn.v_proj.weight"]
    assert got.tobytes() == ref.tobytes()
    code, out, _ = run("unmerge", tmp_path / "m2", models / "adapter", models / "adapter2", "-o", tmp_path / "u", "--json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["tensors"] if r["adapters"]}
    back = load_file(tmp_path / "u" / "model.safetensors")["model.layers.1.self_attn.v_proj.weight"]
    again = lora.merge_weight(lora.merge_weight(back, m1.A, m1.B, 2.0), m2.A, m2.B, 2.0)  # the report's round trip
    row = rows["model.layers.1.self_attn.v_proj.weight"]
    assert row["roundtrip_bit_exact_fraction"] == float((again.view(np.uint16) == got.view(np.uint16)).mean()) < 1.0
    assert row["roundtrip_max_abs_error"] == float(np.abs(again.astype(np.float64) - got.astype(np.float64)).max()) > 0
    bf16_ulp = np.abs(W.astype(np.float32)) * 2.0**-7 + 1e-30
    assert np.all(np.abs(back.astype(np.float32) - W.astype(np.float32)) <= 4 * bf16_ulp)


def test_single_file_in_single_file_out_and_inspect(models, tmp_path):
    out_file = tmp_path / "merged.safetensors"
    assert run("merge", models / "base" / "model.safetensors", models / "adapter", "-o", out_file)[0] == 0
    assert os.listdir(tmp_path) == ["merged.safetensors"]
    code, out, _ = run("inspect", models / "adapter", "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "adapter" and len(info["modules"]) == 14
    assert set(info["targets"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    code, out, _ = run("inspect", out_file)
    assert code == 0 and "total:" in out and "model.norm.weight" in out


def test_subprocess_entry_point(models, tmp_path):
    exe = [sys.executable, "-m", "minilora"]
    ok = subprocess.run(exe + ["merge", str(models / "base"), str(models / "adapter"), "-o", str(tmp_path / "s")],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0 and "merged 1 adapter(s)" in ok.stdout
    bad = subprocess.run(exe + ["merge", str(models / "base"), str(models / "adapter"), "-o", str(tmp_path / "s")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


# --- bad input: one line on stderr, exit code 2, no output, inputs untouched -------------------------

def _expect_error(args, output, inputs, message):
    digests = [tree_digest(p) if os.path.isdir(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
               for p in inputs]
    code, _, err = run(*args)
    assert code == 2, err
    assert message in err and err.strip().count("\n") == 0 and "Traceback" not in err
    assert not os.path.exists(output) or output in [str(p) for p in inputs]
    assert [tree_digest(p) if os.path.isdir(p) else hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in inputs] == digests
    leftovers = [f for f in os.listdir(os.path.dirname(output)) if f.startswith(".minilora")]
    assert leftovers == []


def test_adapter_for_a_different_model(models, tmp_path):
    other = llama_config(hidden=48, intermediate=64, layers=3, heads=4, kv_heads=2, vocab=64)
    write_lora_adapter(tmp_path / "wrong-shape", other, targets=("q_proj",))
    _expect_error(["merge", models / "base", tmp_path / "wrong-shape", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [models / "base"], "does not fit base tensor model.layers.0.self_attn.q_proj.weight")
    deeper = llama_config(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2, vocab=64)
    write_lora_adapter(tmp_path / "wrong-depth", deeper, targets=("q_proj",))
    _expect_error(["merge", models / "base", tmp_path / "wrong-depth", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [models / "base"], "model.layers.2.self_attn.q_proj.weight in the base checkpoint")


def test_missing_and_truncated_files(models, tmp_path):
    write_lora_adapter(tmp_path / "ad", CONFIG, targets=("q_proj",))
    os.remove(tmp_path / "ad" / "adapter_model.safetensors")
    _expect_error(["merge", models / "base", tmp_path / "ad", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [models / "base"], "adapter weights are missing")
    write_llama_checkpoint(tmp_path / "cut", CONFIG)
    data = (tmp_path / "cut" / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(["merge", tmp_path / "cut", models / "adapter", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [tmp_path / "cut"], "file is truncated")
    os.remove(tmp_path / "cut" / "model.safetensors")
    _expect_error(["merge", tmp_path / "cut", models / "adapter", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [tmp_path / "cut"], "no model.safetensors")


def test_unknown_dtype_and_lying_header(models, tmp_path):
    import struct
    folder = tmp_path / "weird"
    folder.mkdir()
    header = json.dumps({"model.layers.0.self_attn.q_proj.weight": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    _expect_error(["merge", folder, models / "adapter", "-o", tmp_path / "o"], str(tmp_path / "o"), [folder],
                  "unknown dtype 'Q4_K'")
    header = json.dumps({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    _expect_error(["merge", folder, models / "adapter", "-o", tmp_path / "o"], str(tmp_path / "o"), [folder],
                  "header says 8 bytes but shape [8] of F32 needs 32")


def test_merge_that_overflows_to_inf(models, tmp_path):
    _expect_error(["merge", models / "base", models / "adapter", "-o", tmp_path / "o", "--scale", "1e39"],
                  str(tmp_path / "o"), [models / "base"], "NaN/inf")


def test_index_naming_a_shard_outside_the_folder(models, tmp_path):
    folder = tmp_path / "evil"
    write_llama_checkpoint(folder, CONFIG, max_shard_bytes=12_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(["merge", folder, models / "adapter", "-o", tmp_path / "o"], str(tmp_path / "o"), [folder],
                  "is not a plain file name inside the checkpoint folder")


def test_output_equal_to_an_input_or_existing(models, tmp_path):
    write_llama_checkpoint(tmp_path / "b", CONFIG)
    _expect_error(["merge", tmp_path / "b", models / "adapter", "-o", tmp_path / "b", "--force"], str(tmp_path / "b"),
                  [tmp_path / "b"], "would overwrite or contain the input")
    (tmp_path / "exists").mkdir()
    code, _, err = run("merge", tmp_path / "b", models / "adapter", "-o", tmp_path / "exists")
    assert code == 2 and "pass --force" in err and os.listdir(tmp_path / "exists") == []
    assert run("merge", tmp_path / "b", models / "adapter", "-o", tmp_path / "exists", "--force")[0] == 0
    assert "model.safetensors" in os.listdir(tmp_path / "exists")


def test_rank_in_file_disagrees_with_config(models, tmp_path):
    write_lora_adapter(tmp_path / "ad", CONFIG, rank=4, targets=("q_proj",))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"q_proj": 16}
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_error(["merge", models / "base", tmp_path / "ad", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [models / "base"], "lora_A has rank 4 but the config gives r=16")


def test_dora_unmerge_is_refused(models, tmp_path):
    write_lora_adapter(tmp_path / "dora", CONFIG, targets=("q_proj",), use_dora=True)
    assert run("merge", models / "base", tmp_path / "dora", "-o", tmp_path / "m")[0] == 0
    _expect_error(["unmerge", tmp_path / "m", tmp_path / "dora", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [tmp_path / "m"], "DoRA cannot be unmerged")
