"""``minilora merge`` / ``unmerge`` on the inputs an audit found mishandled: outputs inside input folders,
GPT-2 adapters mixing Conv1D and Linear layers, saved base copies and modules_to_save in unmerge, several
adapters ending in DoRA, bias overflow, malformed configs, LoRA variants it cannot merge, SIGTERM."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from minilora import lora
from minilora.checkpoint import LoraModule, save_adapter
from minilora.safetensors_io import load_file
from minilora.safetensors_write import save_file
from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

from test_merge_cli import _expect_error, run, tree_digest

CONFIG = llama_config(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    write_llama_checkpoint(root / "base", CONFIG, seed=0)
    write_lora_adapter(root / "adapter", CONFIG, rank=4, alpha=8, targets=("q_proj",), seed=1)
    return root


def _adapter(folder, config, modules, full_tensors=None):
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}
    save_adapter(folder, {**base, **config}, modules, full_tensors)
    return folder


# ---------------------------------------------------------------- where the output may go
@pytest.mark.parametrize("target", ["base/model.safetensors", "base/config.json", "base/sub", "adapter/adapter_config.json"])
def test_output_inside_an_input_folder_is_refused_even_with_force(models, tmp_path, target):
    for name in ("base", "adapter"):
        os.system(f"cp -r {models / name} {tmp_path / name}")
    out = tmp_path / target
    digests = [tree_digest(tmp_path / "base"), tree_digest(tmp_path / "adapter")]
    code, _, err = run("merge", tmp_path / "base", tmp_path / "adapter", "-o", out, "--force")
    assert code == 2 and err.count("\n") == 1, err
    assert "BASE is a model folder" in err or "lies inside the input folder" in err
    assert [tree_digest(tmp_path / "base"), tree_digest(tmp_path / "adapter")] == digests


def test_bare_adapter_file_protects_its_config(models, tmp_path):
    os.system(f"cp -r {models / 'adapter'} {tmp_path / 'ad'}")
    code, _, err = run("merge", models / "base" / "model.safetensors", tmp_path / "ad" / "adapter_model.safetensors",
                       "-o", tmp_path / "ad" / "adapter_config.json", "--force")
    assert code == 2 and "lies inside the input folder" not in err and "overwrite" in err, err


def test_symlink_and_kind_mismatch_outputs_are_refused_without_leftovers(models, tmp_path):
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    code, _, err = run("merge", models / "base", models / "adapter", "-o", tmp_path / "dangling")
    assert code == 2 and "symbolic link" in err
    (tmp_path / "dir.safetensors").mkdir()
    code, _, err = run("merge", models / "base" / "model.safetensors", models / "adapter",
                       "-o", tmp_path / "dir.safetensors", "--force")
    assert code == 2 and "is a folder" in err
    assert [f for f in os.listdir(tmp_path) if f.startswith(".minilora")] == []


def test_single_file_output_creates_its_folder(models, tmp_path):
    out = tmp_path / "new" / "sub" / "merged.safetensors"
    assert run("merge", models / "base" / "model.safetensors", models / "adapter", "-o", out, "-q")[0] == 0
    assert os.path.isfile(out)


def test_write_errors_name_the_output_not_the_temporary_file(models, tmp_path, monkeypatch):
    import minilora.safetensors_write as io

    def full_disk(self, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(io.SafetensorsWriter, "_put", full_disk)
    for out in (tmp_path / "m", tmp_path / "m.safetensors"):
        base = models / "base" if out.suffix == "" else models / "base" / "model.safetensors"
        code, _, err = run("merge", base, models / "adapter", "-o", out)
        assert code == 2 and f"{out}: cannot write the output: No space left on device" in err, err
        assert ".minilora" not in err
    assert [f for f in os.listdir(tmp_path) if f.startswith(".minilora")] == []


def test_sigterm_leaves_no_output_and_exits_143(models, tmp_path):
    """A SIGTERM delivered while the first tensor is written (deterministic: the writer sends it)."""
    script = f"""
import os, signal, sys
import minilora.safetensors_write as io
put = io.SafetensorsWriter._put
def put_then_term(self, data):
    put(self, data)
    os.kill(os.getpid(), signal.SIGTERM)
io.SafetensorsWriter._put = put_then_term
from minilora.cli.main import main
sys.argv = ["minilora", "merge", {str(models / 'base')!r}, {str(models / 'adapter')!r}, "-o", {str(tmp_path / 'o')!r}]
main()
"""
    # (cwd: not the checkout, whose cli/ folder is installed as minilora.cli but is not one in the source tree)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "terminated (SIGTERM); no output was written" in p.stderr and "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == []


def test_force_never_deletes_what_an_input_links_to(models, tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/model.safetensors -> ../../blobs/<hash>. `-o blobs --force`
    replaced blobs/ with the output and left the input's links dangling."""
    hub = tmp_path / "hub"
    (hub / "blobs").mkdir(parents=True)
    (hub / "snapshots" / "r").mkdir(parents=True)
    for name, blob in (("model.safetensors", "aaa"), ("config.json", "bbb")):
        os.system(f"cp {models / 'base' / name} {hub / 'blobs' / blob}")
        os.symlink(f"../../blobs/{blob}", hub / "snapshots" / "r" / name)
    digest = tree_digest(hub / "blobs")
    code, _, err = run("merge", hub / "snapshots" / "r", models / "adapter", "-o", hub / "blobs", "--force")
    assert code == 2 and "would overwrite or contain the input" in err and "model.safetensors" in err, err
    assert tree_digest(hub / "blobs") == digest


def test_force_replaces_only_a_folder_of_files_that_does_not_hold_the_cwd(models, tmp_path, monkeypatch):
    """`-o . --force` (or a parent folder) deleted the current directory's other files; a folder that holds
    folders (a home directory, a project) is not a checkpoint to replace either."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work / "sub")
    for out, message in ((work / "sub", "contains the current directory"), (work, "contains the current directory"),
                         (tmp_path, "contains the current directory")):
        code, _, err = run("merge", models / "base", models / "adapter", "-o", out, "--force")
        assert code == 2 and message in err, err
    monkeypatch.chdir(tmp_path)
    code, _, err = run("merge", models / "base", models / "adapter", "-o", work, "--force")
    assert code == 2 and "holds the folder sub/" in err, err
    assert (work / "notes.txt").read_text() == "precious" and (work / "sub").is_dir()
    assert [f for f in os.listdir(tmp_path) if f.startswith(".minilora")] == []


@pytest.mark.parametrize("single", [False, True])
def test_an_output_that_appears_while_writing_is_not_replaced_without_force(models, tmp_path, monkeypatch, single):
    """Two runs writing the same -o: the later one used to replace the other's finished output silently."""
    import minilora.safetensors_write as io

    out = tmp_path / ("m.safetensors" if single else "m")
    put = io.SafetensorsWriter._put

    def put_and_race(self, data):  # "another run" finishes its output while this one writes
        if not os.path.exists(out):
            if single:
                out.write_bytes(b"the other run")
            else:
                out.mkdir()
                (out / "model.safetensors").write_bytes(b"the other run")
        put(self, data)
    monkeypatch.setattr(io.SafetensorsWriter, "_put", put_and_race)
    base = models / "base" / "model.safetensors" if single else models / "base"
    code, _, err = run("merge", base, models / "adapter", "-o", out)
    assert code == 2 and "output appeared while this command ran" in err, err
    assert (out if single else out / "model.safetensors").read_bytes() == b"the other run"
    assert [f for f in os.listdir(tmp_path) if f.startswith(".minilora")] == []
    assert run("merge", base, models / "adapter", "-o", out, "--force")[0] == 0  # asked for: replaced
    assert (out if single else out / "model.safetensors").read_bytes() != b"the other run"


def test_a_signal_while_the_output_is_swapped_in_waits_and_says_it_was_written(models, tmp_path):
    """SIGTERM while `--force` removes the previous output: it used to stop between the two renames or in the
    removal, say "no output was written" and leave `.minilora-old-*`. Now the swap finishes first."""
    assert run("merge", models / "base", models / "adapter", "-o", tmp_path / "want", "-q")[0] == 0
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "old.safetensors").write_bytes(b"previous output")
    script = f"""
import os, signal, sys
import minilora.output as output
rmtree = output.shutil.rmtree
def term_then_rmtree(path, **kw):
    os.kill(os.getpid(), signal.SIGTERM)
    rmtree(path, **kw)
output.shutil.rmtree = term_then_rmtree
from minilora.cli.main import main
sys.argv = ["minilora", "merge", {str(models / 'base')!r}, {str(models / 'adapter')!r}, "-o", "o", "--force", "-q"]
main()
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 128 + signal.SIGTERM, p.stderr
    assert "terminated (SIGTERM) after the output was written" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert sorted(os.listdir(tmp_path)) == ["o", "want"]
    assert tree_digest(tmp_path / "o") == tree_digest(tmp_path / "want")


# ---------------------------------------------------------------- GPT-2: Conv1D and Linear in one adapter
def _gpt2(folder, with_config=True, seed=0):
    """A GPT-2-layout checkpoint: Conv1D weights stored (in, out) = (K, N); the classifier `score` is Linear."""
    rng = np.random.default_rng(seed)
    tensors = {"transformer.h.0.attn.c_attn.weight": rng.standard_normal((32, 96), dtype=np.float32),   # (K, N)
               "transformer.h.0.attn.c_proj.weight": rng.standard_normal((32, 32), dtype=np.float32),   # square
               "transformer.h.0.mlp.c_fc.weight": rng.standard_normal((32, 64), dtype=np.float32),
               "score.weight": rng.standard_normal((2, 32), dtype=np.float32)}                          # (N, K)
    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    if with_config:
        (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    return tensors


def _gpt2_adapter(folder, rng):
    modules = []
    for name, K, N in (("transformer.h.0.attn.c_attn", 32, 96), ("transformer.h.0.attn.c_proj", 32, 32),
                       ("transformer.h.0.mlp.c_fc", 32, 64), ("score", 32, 2)):
        modules.append(LoraModule(name, A=rng.standard_normal((4, K), dtype=np.float32) * np.float32(0.1),
                                  B=rng.standard_normal((N, 4), dtype=np.float32) * np.float32(0.1)))
    # PEFT rewrites fan_in_fan_out to what the last layer it wrapped needed: here the Linear `score`
    return _adapter(folder, {"fan_in_fan_out": False}, modules), {m.name: m for m in modules}


def test_gpt2_adapter_on_conv1d_and_linear_layers_merges_each_in_its_own_layout(tmp_path):
    base = _gpt2(tmp_path / "gpt2")
    adapter, modules = _gpt2_adapter(tmp_path / "ad", np.random.default_rng(1))
    code, out, err = run("merge", tmp_path / "gpt2", adapter, "-o", tmp_path / "m", "-q")
    assert code == 0, err
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for name, m in modules.items():
        conv1d = name != "score"
        want = lora.merge_weight(base[f"{name}.weight"], m.A, m.B, 2.0, fan_in_fan_out=conv1d)
        np.testing.assert_array_equal(merged[f"{name}.weight"], want, err_msg=name)


def test_gpt2_square_layer_without_config_is_refused_not_guessed(tmp_path):
    _gpt2(tmp_path / "gpt2", with_config=False)
    adapter, _ = _gpt2_adapter(tmp_path / "ad", np.random.default_rng(1))
    _expect_error(["merge", tmp_path / "gpt2" / "model.safetensors", adapter, "-o", tmp_path / "o.safetensors"],
                  str(tmp_path / "o.safetensors"), [tmp_path / "gpt2"], "cannot tell whether transformer.h.0.attn.c_proj")


def test_llama_adapter_with_a_wrong_fan_in_fan_out_flag_merges_as_linear(models, tmp_path):
    """PEFT ignores fan_in_fan_out=True on nn.Linear layers (with a warning); so does minilora."""
    write_lora_adapter(tmp_path / "ad", CONFIG, rank=4, alpha=8, targets=("q_proj",), seed=1)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    assert run("merge", models / "base", tmp_path / "ad", "-o", tmp_path / "a", "-q")[0] == 0
    assert run("merge", models / "base", models / "adapter", "-o", tmp_path / "b", "-q")[0] == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- unmerge with full tensors
def test_unmerge_restores_a_saved_base_copy_exactly_and_refuses_modules_to_save(models, tmp_path):
    base = load_file(models / "base" / "model.safetensors")
    rng = np.random.default_rng(3)
    emb = base["model.embed_tokens.weight"]                                  # (vocab, hidden)
    m = LoraModule("model.embed_tokens", kind="embedding", A=rng.standard_normal((4, 64), dtype=np.float32),
                   B=rng.standard_normal((32, 4), dtype=np.float32))
    ad = _adapter(tmp_path / "emb", {"target_modules": ["embed_tokens"]}, [m],
                  {"model.embed_tokens.base_layer.weight": emb})
    assert run("merge", models / "base", ad, "-o", tmp_path / "m", "-q")[0] == 0
    code, out, err = run("unmerge", tmp_path / "m", ad, "-o", tmp_path / "u", "--json")
    assert code == 0, err
    back = load_file(tmp_path / "u" / "model.safetensors")["model.embed_tokens.weight"]
    assert back.tobytes() == emb.tobytes()                                    # the saved copy, not W' − ΔW
    row = next(r for r in json.loads(out)["tensors"] if r["name"] == "model.embed_tokens.weight")
    assert row["replaced_by"] == "saved base copy" and row["roundtrip_bit_exact_fraction"] == 1.0

    head = base["lm_head.weight"] + np.float32(0.5)
    ad2 = _adapter(tmp_path / "mts", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
                   [LoraModule("model.layers.0.self_attn.q_proj", A=np.ones((4, 32), np.float32),
                               B=np.zeros((32, 4), np.float32))], {"lm_head.weight": head})
    code, out, _ = run("merge", models / "base", ad2, "-o", tmp_path / "m2", "--json")
    assert code == 0
    row = next(r for r in json.loads(out)["tensors"] if r["name"] == "lm_head.weight")
    assert row["replaced_by"] == "modules_to_save" and row["adapters"] == [str(ad2 / "adapter_model.safetensors")]
    _expect_error(["unmerge", tmp_path / "m2", ad2, "-o", tmp_path / "u2"], str(tmp_path / "u2"), [tmp_path / "m2"],
                  "unmerge cannot restore them")


# ---------------------------------------------------------------- several adapters, DoRA last
def test_lora_then_dora_takes_the_norm_over_the_original_weight_as_peft(models, tmp_path):
    write_lora_adapter(tmp_path / "lora", CONFIG, rank=4, alpha=8, targets=("q_proj",), seed=5, std=0.2)
    write_lora_adapter(tmp_path / "dora", CONFIG, rank=4, alpha=8, targets=("q_proj",), seed=6, std=0.2,
                       use_dora=True)
    assert run("merge", models / "base", tmp_path / "lora", tmp_path / "dora", "-o", tmp_path / "m", "-q",
               "--dtype", "float32")[0] == 0
    key = "model.layers.0.self_attn.q_proj"
    W = load_file(models / "base" / "model.safetensors")[f"{key}.weight"].astype(np.float64)
    l0, d1 = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("lora", "dora"))
    P = f"base_model.model.{key}"
    dW0 = 2.0 * l0[f"{P}.lora_B.weight"].astype(np.float64) @ l0[f"{P}.lora_A.weight"]
    dW1 = 2.0 * d1[f"{P}.lora_B.weight"].astype(np.float64) @ d1[f"{P}.lora_A.weight"]
    m = d1[f"{P}.lora_magnitude_vector"].astype(np.float64)
    want = (m / np.linalg.norm(W + dW1, axis=1))[:, None] * (W + dW0 + dW1)   # PEFT 0.21's merge
    wrong = (m / np.linalg.norm(W + dW0 + dW1, axis=1))[:, None] * (W + dW0 + dW1)
    got = load_file(tmp_path / "m" / "model.safetensors")[f"{key}.weight"]
    assert np.abs(got - want).max() < 1e-5 < np.abs(got - wrong).max()


# ---------------------------------------------------------------- values a merge must refuse
def test_bias_merge_that_overflows_or_carries_nan_is_refused(models, tmp_path):
    rng = np.random.default_rng(0)
    base = load_file(models / "base" / "model.safetensors")
    base["model.layers.0.self_attn.q_proj.bias"] = np.zeros(32, np.float32)
    os.makedirs(tmp_path / "b")
    save_file(base, tmp_path / "b" / "model.safetensors")
    for value in (np.nan, 3e38):
        m = LoraModule("model.layers.0.self_attn.q_proj", A=rng.standard_normal((4, 32), dtype=np.float32),
                       B=rng.standard_normal((32, 4), dtype=np.float32), bias=np.full(32, value, np.float32))
        ad = _adapter(tmp_path / f"ad{value}", {"lora_bias": True}, [m])
        _expect_error(["merge", tmp_path / "b", ad, "-o", tmp_path / "o"], str(tmp_path / "o"), [tmp_path / "b"],
                      "NaN/inf values in the bias")


def test_float64_and_float8_bases_need_a_dtype(models, tmp_path):
    base = load_file(models / "base" / "model.safetensors")
    base["model.layers.0.self_attn.q_proj.weight"] = base["model.layers.0.self_attn.q_proj.weight"].astype(np.float64)
    save_file(base, tmp_path / "f64.safetensors")
    _expect_error(["merge", tmp_path / "f64.safetensors", models / "adapter", "-o", tmp_path / "o.safetensors"],
                  str(tmp_path / "o.safetensors"), [tmp_path / "f64.safetensors"], "is float64; merging needs")
    assert run("merge", tmp_path / "f64.safetensors", models / "adapter", "-o", tmp_path / "o.safetensors",
               "--dtype", "float32", "-q")[0] == 0


@pytest.mark.parametrize("field, value, message", [
    ("lora_alpha", "8", "lora_alpha must be a number, got '8'"),
    ("lora_alpha", None, "lora_alpha must be a number"),
    ("r", "4", "r must be a positive integer"),
    ("rank_pattern", {"q_proj[": 4}, "is not a regular expression"),
    ("alpha_pattern", {"q_proj": "x"}, "alpha_pattern['q_proj'] must be a number"),
    ("use_rslora", "yes", "use_rslora must be true or false"),
    ("trainable_token_indices", [1, 2], "trainable tokens adapters are not supported"),
    ("alora_invocation_tokens", [5], "aLoRA"),
    ("layer_replication", [[0, 1]], "layer replication"),
    ("init_lora_weights", "pissa_niter_4", "path_initial_model_for_weight_conversion"),
    ("init_lora_weights", "olora", "changed the base weights"),
])
def test_malformed_or_unsupported_configs_are_one_line_errors(models, tmp_path, field, value, message):
    write_lora_adapter(tmp_path / "ad", CONFIG, rank=4, targets=("q_proj",))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(cfg))
    _expect_error(["merge", models / "base", tmp_path / "ad", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [models / "base"], message)


def test_config_that_is_not_utf8_and_unknown_adapter_tensors(models, tmp_path):
    write_lora_adapter(tmp_path / "ad", CONFIG, rank=4, targets=("q_proj",))
    (tmp_path / "ad" / "adapter_config.json").write_bytes(b'{"r": 4, "name": "\xff"}')
    _expect_error(["merge", models / "base", tmp_path / "ad", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [models / "base"], "not valid JSON")
    m = LoraModule("model.layers.0.self_attn.q_proj", A=np.ones((4, 32), np.float32), B=np.ones((32, 4), np.float32))
    ad = _adapter(tmp_path / "kasa", {}, [m], {"model.layers.0.self_attn.q_proj.lora_diag": np.ones(4, np.float32)})
    _expect_error(["merge", models / "base", ad, "-o", tmp_path / "o"], str(tmp_path / "o"), [models / "base"],
                  "neither a LoRA tensor nor a tensor of the base")


# ---------------------------------------------------------------- what the output folder says
def test_dtype_option_updates_config_and_the_report_counts_written_bytes(tmp_path):
    write_llama_checkpoint(tmp_path / "b", CONFIG, seed=0, max_shard_bytes=12_000)
    write_lora_adapter(tmp_path / "ad", CONFIG, rank=4, targets=("q_proj",))
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    index["metadata"]["total_parameters"] = 123
    (tmp_path / "b" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "b" / "modeling_custom.py").write_text("# trust_remote_code\n")
    (tmp_path / "b" / "LICENSE").write_text("licence terms\n")
    (tmp_path / "b" / "original").mkdir()  # e.g. Meta's consolidated weights: not carried along
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    code, out, err = run("merge", tmp_path / "b", tmp_path / "ad", "-o", tmp_path / "m", "--dtype", "float16", "--json")
    assert code == 0, err
    report = json.loads(out)
    written = sum(os.path.getsize(tmp_path / "m" / f) for f in os.listdir(tmp_path / "m") if f.endswith(".safetensors"))
    assert report["totals"]["bytes"] == sum(r["bytes"] for r in report["tensors"])
    assert 0 < written - report["totals"]["bytes"] < 4096 * len(index["weight_map"])   # + headers
    new_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert new_config["torch_dtype" if "torch_dtype" in config else "dtype"] == "float16"
    new_index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert new_index["metadata"] == {"total_parameters": 123, "total_size": report["totals"]["bytes"]}
    assert (tmp_path / "m" / "modeling_custom.py").read_text() == "# trust_remote_code\n"
    assert (tmp_path / "m" / "LICENSE").read_text() == "licence terms\n" and not (tmp_path / "m" / "original").exists()


def test_dtype_merges_from_the_base_values_and_converts_once(tmp_path):
    """--dtype bfloat16 on a float32 base: merged in float32 from W itself, then converted once (PEFT merging in
    float32 and then .to(bfloat16)) — not round(round(W) + ΔW)."""
    config = llama_config(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, vocab=64, dtype="float32")
    write_llama_checkpoint(tmp_path / "b", config, seed=0)
    write_lora_adapter(tmp_path / "ad", config, rank=4, alpha=8, targets=("q_proj",), seed=1, std=0.2)
    assert run("merge", tmp_path / "b", tmp_path / "ad", "-o", tmp_path / "m", "--dtype", "bfloat16", "-q")[0] == 0
    base, ad = load_file(tmp_path / "b" / "model.safetensors"), load_file(tmp_path / "ad" / "adapter_model.safetensors")
    key, P = "model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.self_attn.q_proj"
    W = base[f"{key}.weight"] * np.float32(400)  # (big weights: many bf16 roundings differ between the two orders)
    base[f"{key}.weight"] = W
    save_file(base, tmp_path / "b" / "model.safetensors")
    assert run("merge", tmp_path / "b", tmp_path / "ad", "-o", tmp_path / "m", "--dtype", "bfloat16", "-q",
               "--force")[0] == 0
    got = load_file(tmp_path / "m" / "model.safetensors")[f"{key}.weight"]
    A, B = ad[f"{P}.lora_A.weight"], ad[f"{P}.lora_B.weight"]
    want = lora.merge_weight(W, A, B, 2.0).astype(got.dtype)                  # float32 merge, one conversion
    twice = lora.merge_weight(W.astype(got.dtype), A, B, 2.0)                 # the old order
    assert got.tobytes() == want.tobytes() and got.tobytes() != twice.tobytes()
    for k, v in load_file(tmp_path / "m" / "model.safetensors").items():
        if k != f"{key}.weight":
            assert v.tobytes() == base[k].astype(got.dtype).tobytes(), k


def test_nf4_base_with_modules_to_save_and_dtype(models, tmp_path):
    """An adapter with modules_to_save merged into a 4-bit base: the replaced tensor is the adapter's; with
    --dtype the 4-bit weights are merged in float32 from their dequantised values and converted once."""
    assert run("quantize", models / "base", "-o", tmp_path / "q", "-q")[0] == 0
    base = load_file(models / "base" / "model.safetensors")
    head = (base["lm_head.weight"].astype(np.float32) + np.float32(0.25)).astype(base["lm_head.weight"].dtype)
    rng = np.random.default_rng(4)
    m = LoraModule("model.layers.0.self_attn.q_proj", A=rng.standard_normal((4, 32), dtype=np.float32),
                   B=rng.standard_normal((32, 4), dtype=np.float32))
    ad = _adapter(tmp_path / "ad", {"modules_to_save": ["lm_head"]}, [m], {"lm_head.weight": head})
    assert run("merge", tmp_path / "q", ad, "-o", tmp_path / "m", "-q", "--dtype", "float32")[0] == 0
    assert run("dequantize", tmp_path / "q", "-o", tmp_path / "dq", "-q")[0] == 0
    merged, dq = load_file(tmp_path / "m" / "model.safetensors"), load_file(tmp_path / "dq" / "model.safetensors")
    assert merged["lm_head.weight"].tobytes() == head.astype(np.float32).tobytes()
    key = "model.layers.0.self_attn.q_proj.weight"
    want = lora.merge_weight(dq[key].astype(np.float32), m.A, m.B, 2.0)
    assert merged[key].dtype == np.float32 and merged[key].tobytes() == want.tobytes()


def test_embedding_lora_on_a_tied_embedding_needs_the_flag(tmp_path):
    """With tie_word_embeddings the output layer is the input embedding: merging an embedding LoRA changes
    both, while the adapter model changes only the input side. Refused unless asked for (PEFT merges it)."""
    config = llama_config(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, vocab=64, tie_word_embeddings=True)
    write_llama_checkpoint(tmp_path / "tied", config, seed=0)
    rng = np.random.default_rng(2)
    m = LoraModule("model.embed_tokens", kind="embedding", A=rng.standard_normal((4, 64), dtype=np.float32),
                   B=rng.standard_normal((32, 4), dtype=np.float32))
    ad = _adapter(tmp_path / "ad", {"target_modules": ["embed_tokens"]}, [m])
    _expect_error(["merge", tmp_path / "tied", ad, "-o", tmp_path / "o"], str(tmp_path / "o"), [tmp_path / "tied"],
                  "--merge-tied-embeddings")
    assert run("merge", tmp_path / "tied", ad, "-o", tmp_path / "o", "--merge-tied-embeddings", "-q")[0] == 0
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["ensure_weight_tying"] = True  # PEFT >= 0.18: the adapter applies to the tied output layer too
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    assert run("merge", tmp_path / "tied", ad, "-o", tmp_path / "o2", "-q")[0] == 0


def test_conv_lora_and_a_shared_embedding_get_their_own_reasons(models, tmp_path):
    conv = LoraModule("model.layers.0.self_attn.q_proj", A=np.ones((4, 3, 8, 8), np.float32),
                      B=np.ones((32, 4, 1, 1), np.float32))
    ad = _adapter(tmp_path / "conv", {}, [conv])
    _expect_error(["merge", models / "base", ad, "-o", tmp_path / "o"], str(tmp_path / "o"), [models / "base"],
                  "LoRA on Conv layers is not supported")
    t5 = {"shared.weight": np.ones((64, 32), np.float32), "encoder.block.0.layer.0.SelfAttention.q.weight":
          np.ones((32, 32), np.float32)}
    save_file(t5, tmp_path / "t5.safetensors")
    emb = LoraModule("encoder.embed_tokens", kind="embedding", A=np.ones((4, 64), np.float32),
                     B=np.ones((32, 4), np.float32))
    ad = _adapter(tmp_path / "t5ad", {}, [emb])
    _expect_error(["merge", tmp_path / "t5.safetensors", ad, "-o", tmp_path / "o.safetensors"],
                  str(tmp_path / "o.safetensors"), [tmp_path / "t5.safetensors"], "stores this embedding as shared.weight")


def test_lora_on_moe_expert_parameters_is_refused_by_name(models, tmp_path):
    """PEFT target_parameters on a fused 3-D experts tensor: nested wrappers (``experts.base_layer.lora_A``)."""
    P = "base_model.model.model.layers.0.mlp.experts"
    tensors = {f"{P}.base_layer.lora_A.weight": np.ones((4, 32), np.float32),
               f"{P}.base_layer.lora_B.weight": np.ones((128, 4), np.float32),
               f"{P}.lora_A.weight": np.ones((4, 64), np.float32), f"{P}.lora_B.weight": np.ones((32, 4), np.float32)}
    os.makedirs(tmp_path / "ad")
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_parameters": ["gate_up_proj", "down_proj"]}))
    _expect_error(["merge", models / "base", tmp_path / "ad", "-o", tmp_path / "o"], str(tmp_path / "o"),
                  [models / "base"], "target_parameters, e.g. MoE experts) is not supported")


def test_adapter_names_of_a_renamed_checkpoint_are_mapped_when_unambiguous(tmp_path):
    """A LLaVA-family file keeps `language_model.model.layers…` / `vision_tower…` while a PEFT adapter made with
    transformers 5 names `model.language_model.layers…` / `model.vision_tower…`: a consistent prefix rewrite is
    found, reported and used; where two rewrites would fit (T5's encoder / decoder) nothing is guessed."""
    rng = np.random.default_rng(7)
    disk = {"language_model.model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32), dtype=np.float32),
            "language_model.model.layers.0.mlp.down_proj.weight": rng.standard_normal((32, 64), dtype=np.float32),
            "language_model.lm_head.weight": rng.standard_normal((64, 32), dtype=np.float32),
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight":
                rng.standard_normal((32, 32), dtype=np.float32),
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight": rng.standard_normal((64, 32), dtype=np.float32)}
    os.makedirs(tmp_path / "llava")
    save_file(disk, tmp_path / "llava" / "model.safetensors")
    mods = [LoraModule(n, A=rng.standard_normal((4, K), dtype=np.float32), B=rng.standard_normal((N, 4), dtype=np.float32))
            for n, K, N in (("model.language_model.layers.0.self_attn.q_proj", 32, 32),
                            ("model.language_model.layers.0.mlp.down_proj", 64, 32),
                            ("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj", 32, 32))]
    ad = _adapter(tmp_path / "ad", {}, mods)
    code, out, err = run("merge", tmp_path / "llava", ad, "-o", tmp_path / "m", "--json")
    assert code == 0, err
    assert json.loads(out)["renamed_modules"][str(ad / "adapter_model.safetensors")] == {
        "model.language_model.": "language_model.model.", "model.vision_tower.": "vision_tower."}
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for m, key in zip(mods, ("language_model.model.layers.0.self_attn.q_proj.weight",
                             "language_model.model.layers.0.mlp.down_proj.weight",
                             "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight")):
        np.testing.assert_array_equal(merged[key], lora.merge_weight(disk[key], m.A, m.B, 2.0))
    assert merged["language_model.lm_head.weight"].tobytes() == disk["language_model.lm_head.weight"].tobytes()

    t5 = {f"{side}.block.0.layer.0.SelfAttention.q.weight": np.ones((32, 32), np.float32) for side in ("encoder", "decoder")}
    save_file(t5, tmp_path / "t5.safetensors")
    ad = _adapter(tmp_path / "t5ad", {}, [LoraModule("block.0.layer.0.SelfAttention.q", A=np.ones((4, 32), np.float32),
                                                     B=np.ones((32, 4), np.float32))])
    _expect_error(["merge", tmp_path / "t5.safetensors", ad, "-o", tmp_path / "o.safetensors"],
                  str(tmp_path / "o.safetensors"), [tmp_path / "t5.safetensors"], "an adapter for a different model?")


def test_a_rename_never_changes_a_layer_number_nor_joins_two_modules(tmp_path):
    """An adapter for a deeper model against a 1-layer base: `model.layers.1.` -> `model.layers.0.` would
    "resolve" every missing layer onto layer 0, and the last one's A, B was merged there (exit 0). Refused."""
    rng = np.random.default_rng(9)
    os.makedirs(tmp_path / "one")
    W = rng.standard_normal((32, 32), dtype=np.float32)
    save_file({"model.layers.0.self_attn.q_proj.weight": W}, tmp_path / "one" / "model.safetensors")
    mods = [LoraModule(f"model.layers.{i}.self_attn.q_proj", A=rng.standard_normal((4, 32), dtype=np.float32),
                       B=rng.standard_normal((32, 4), dtype=np.float32)) for i in range(3)]
    for name, chosen in (("deep", mods), ("only1", mods[1:2])):
        ad = _adapter(tmp_path / name, {}, chosen)
        _expect_error(["merge", tmp_path / "one", ad, "-o", tmp_path / "o"], str(tmp_path / "o"), [tmp_path / "one"],
                      "model.layers.1.self_attn.q_proj")
    from minilora.checkpoint import prefix_renames
    assert prefix_renames(["a.x.q", "b.x.q"], ["x.q"]) == {}  # two modules onto one: no rewrite
    assert prefix_renames(["m.lm.layers.3.q"], ["lm.m.layers.3.q"]) == {"m.lm.": "lm.m."}


def test_dora_flag_and_magnitude_tensors_must_agree(models, tmp_path):
    """PEFT merges as DoRA by `use_dora`, not by the tensors present; minilora went by the tensors, so a
    config / tensor mismatch merged silently differently from PEFT (up to 0.35 in an audit). Refused."""
    rng = np.random.default_rng(4)

    def module(name, magnitude):
        return LoraModule(name, A=rng.standard_normal((4, 32), dtype=np.float32),
                          B=rng.standard_normal((32, 4), dtype=np.float32),
                          magnitude=rng.uniform(0.5, 1.5, 32).astype(np.float32) if magnitude else None)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    for name, dora, mags, bad in (("flag-only", True, (False, False), q), ("tensors-only", False, (True, True), q),
                                  ("one-missing", True, (True, False), k)):
        ad = _adapter(tmp_path / name, {"use_dora": dora}, [module(q, mags[0]), module(k, mags[1])])
        _expect_error(["merge", models / "base", ad, "-o", tmp_path / "o"], str(tmp_path / "o"), [models / "base"],
                      bad)
        code, _, err = run("merge", models / "base", ad, "-o", tmp_path / "o")
        assert "use_dora" in err, err


def test_bias_merge_value_and_inspect_figures(models, tmp_path):
    """lora_bias: b' = fl(b + fl(s·bias)); inspect's rank / alpha / scale per module, worked out by hand from
    the committed adapters' configs (patterns: first match wins; rsLoRA: alpha/√r)."""
    rng = np.random.default_rng(0)
    base = load_file(models / "base" / "model.safetensors")
    base["model.layers.0.self_attn.q_proj.bias"] = rng.standard_normal(32, dtype=np.float32)
    os.makedirs(tmp_path / "b")
    save_file(base, tmp_path / "b" / "model.safetensors")
    bias = rng.standard_normal(32, dtype=np.float32)
    m = LoraModule("model.layers.0.self_attn.q_proj", A=rng.standard_normal((4, 32), dtype=np.float32),
                   B=rng.standard_normal((32, 4), dtype=np.float32), bias=bias)
    ad = _adapter(tmp_path / "ad", {"lora_bias": True, "lora_alpha": 6}, [m])   # s = 6/4 = 1.5
    assert run("merge", tmp_path / "b", ad, "-o", tmp_path / "m", "-q")[0] == 0
    got = load_file(tmp_path / "m" / "model.safetensors")["model.layers.0.self_attn.q_proj.bias"]
    b = base["model.layers.0.self_attn.q_proj.bias"]
    want = (b.astype(np.float32) + np.float32(1.5) * bias).astype(b.dtype)
    assert got.tobytes() == want.tobytes()

    data = os.path.join(os.path.dirname(__file__), "data", "adapters")
    code, out, _ = run("inspect", os.path.join(data, "llama-patterns"), "--json")
    mods = {m["module"]: m for m in json.loads(out)["modules"]}
    expect = {"model.layers.0.self_attn.k_proj": (8, 32, 4.0), "model.layers.1.self_attn.q_proj": (4, 16, 4.0),
              "model.layers.0.self_attn.v_proj": (2, 16, 8.0), "model.layers.1.self_attn.o_proj": (8, 4, 0.5)}
    for name, (r, alpha, scale) in expect.items():
        assert (mods[name]["rank"], mods[name]["alpha"], mods[name]["scale"]) == (r, alpha, scale), name
    code, out, _ = run("inspect", os.path.join(data, "llama-rslora"), "--json")
    assert {m["scale"] for m in json.loads(out)["modules"]} == {16 / 8 ** 0.5}
