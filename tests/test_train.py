"""``minilora train`` end to end on the tiny Llama fixture: the loss drops, the outputs are there, the
adapter merges; --resume after SIGKILL is bit-identical; 2 processes (torchrun, gloo) equal 1 process
with the same global batch within a derived bound; bad input gets one clear line."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("tokenizers")

from minilora.cli.main import cli  # noqa: E402
from minilora.safetensors_io import load_file  # noqa: E402

MODEL = os.path.join(os.path.dirname(__file__), "data", "models", "tiny-llama")
SMALL = ["--max-length", "24", "--batch-size", "4", "--rank", "4", "--seed", "3"]
import torch  # noqa: E402

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA variant needs a GPU"))]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"text": f"the quick brown fox {i} jumps over the lazy dog {i % 5}"} for i in range(24)]
    rows += [{"instruction": "count", "input": "1 2", "output": "3 4 5"}] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _run(args, env=None, cwd=None):
    """Run the CLI in a fresh process (torch state, threads and RNG start clean each time)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "minilora", *[str(a) for a in args]],
                          capture_output=True, text=True, env=env, cwd=cwd)


@pytest.mark.parametrize("device", DEVICES)
def test_train_reduces_loss_and_writes_a_peft_adapter(tmp_path, data_file, device):
    out = tmp_path / "adapter"
    r = _run(["train", "--model", MODEL, "--data", data_file, "-o", out, "--max-steps", "12", "--lr", "1e-2",
              "--eval-split", "0.2", "--eval-every", "6", "--json", "--device", device, *SMALL], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["final_loss"] < summary["first_loss"] - 0.2
    c = json.load(open(os.path.join(MODEL, "config.json")))
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"])
    per_layer = 4 * ((h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h))   # r · (K + N) per Linear
    assert summary["trainable_parameters"] == c["num_hidden_layers"] * per_layer
    for name in ("adapter_config.json", "adapter_model.safetensors", "train_log.jsonl", "loss.png", "train_summary.json"):
        assert (out / name).is_file(), name
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, 13)) and "eval_loss" in log[5]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    merged = CliRunner().invoke(cli, ["merge", MODEL, str(out), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0, merged.stderr


COMPILE_CASES = ["cpu", pytest.param("cuda", marks=DEVICES[1].marks),
                 pytest.param("cuda-float32", marks=DEVICES[1].marks)]


@pytest.mark.parametrize("case", COMPILE_CASES)
@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_compiled_blocks_train_like_eager_ones(tmp_path, data_file, case, qlora):
    """``--compile`` (torch.compile of every block; the CUDA default) computes the same losses and adapter as
    ``--no-compile`` up to the rounding of its fused kernels: float32 on the CPU and in ``cuda-float32``,
    bfloat16 autocast on CUDA by default. With ``--qlora`` the NF4 layers run inside the compiled graph on CUDA
    (the Triton op) and between its pieces on the CPU (the C kernels). The tolerances are those roundings with
    room (a wrong graph moves the loss by O(1e-2) in 3 steps, and leaves the adapter where it started: on torch
    2.11 the traced hand-written Functions did exactly that in float32, see ``fused_functions_allowed``)."""
    device = case.split("-")[0]
    dtype = ["--dtype", "float32"] if case.endswith("float32") else []
    outs = {}
    for mode in ("--compile", "--no-compile"):
        r = _run(["train", "--model", MODEL, "--data", data_file, "-o", tmp_path / mode, "--max-steps", "3",
                  "--lr", "1e-2", "--device", device, "-q", mode, *dtype, *(["--qlora"] if qlora else []), *SMALL],
                 cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        log = [json.loads(line) for line in (tmp_path / mode / "train_log.jsonl").read_text().splitlines()]
        outs[mode] = ([row["loss"] for row in log], load_file(tmp_path / mode / "adapter_model.safetensors"))
    (la, a), (lb, b) = outs["--compile"], outs["--no-compile"]
    rtol = 3e-2 if case == "cuda" else 1e-4
    np.testing.assert_allclose(la, lb, rtol=rtol)
    assert a.keys() == b.keys()
    # AdamW's first steps move each entry by ~lr·sign(g), so a rounding difference in a near-zero gradient
    # can flip single entries: compare whole matrices (relative Frobenius distance), not entries.
    for key in a:
        x, y = a[key].astype(np.float64), b[key].astype(np.float64)
        assert np.linalg.norm(y) > 0, key  # B starts at zero: both runs must have moved it
        assert np.linalg.norm(x - y) <= (0.3 if case == "cuda" else 1e-3) * np.linalg.norm(y), key


@pytest.mark.parametrize("device", DEVICES)
def test_resume_after_sigkill_is_bit_identical(tmp_path, data_file, device):
    args = ["train", "--model", MODEL, "--data", data_file, "--max-steps", "6", "--save-every", "2",
            "--dropout", "0.1", "--lr", "5e-3", "-q", "--device", device, *SMALL]
    full = _run([*args, "-o", tmp_path / "full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    killed = _run([*args, "-o", tmp_path / "cut"], env={"MINILORA_TEST_KILL_AT_STEP": "5"}, cwd=tmp_path)
    assert killed.returncode == -9                                   # SIGKILL: no cleanup ran
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()
    resumed = _run([*args, "-o", tmp_path / "cut", "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = (tmp_path / "full" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "cut" / "adapter_model.safetensors").read_bytes()
    assert a == b
    bad = _run(["train", "--model", MODEL, "--data", data_file, "--max-steps", "6", "--rank", "8",
                "--max-length", "24", "--seed", "3", "-o", tmp_path / "cut", "--resume"], cwd=tmp_path)
    assert bad.returncode == 2 and "rank=4" in bad.stderr and bad.stderr.count("\n") == 1


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, data_file):
    common = ["--model", MODEL, "--data", data_file, "--max-steps", "1", "--optimizer", "sgd", "--lr", "1.0",
              "--max-grad-norm", "0", "--max-length", "24", "--rank", "4", "--seed", "3", "-q", "--device", "cpu"]
    one = _run(["train", *common, "--batch-size", "4", "-o", tmp_path / "one"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "minilora", "train", *common, "--batch-size", "2", "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    # One SGD step from the same init: p = p0 − lr·g. The two runs sum the same per-token gradients in
    # a different order (2 × 2 rows + all-reduce vs 4 rows): |g1 − g2| ≤ γ_n·Σ|terms|, n ≤ 4096 terms of
    # float32 accumulation along the longest path, bounded by |B| + lr·|g| magnitudes here.
    u, n = 2.0 ** -24, 4096
    gamma = n * u / (1 - n * u)
    for key in a:
        diff = np.abs(a[key].astype(np.float64) - b[key].astype(np.float64))
        scale = np.abs(a[key].astype(np.float64)) + np.abs(b[key].astype(np.float64)).max()
        assert np.all(diff <= gamma * scale), key
    assert sum(np.abs(a[k]).sum() for k in a if "lora_B" in k) > 0        # the step changed B


@pytest.mark.parametrize("case, message", [
    ("empty", "data file has no examples"),
    ("malformed", "line 2: not valid JSON"),
    ("no-tokenizer", "no tokenizer.json"),
    ("no-config", "config.json"),
    ("bad-target", "unknown LoRA target 'wq'"),
])
def test_bad_input(tmp_path, data_file, case, message):
    model, data = MODEL, data_file
    extra = []
    if case == "empty":
        data = tmp_path / "e.jsonl"
        data.write_text("\n")
    elif case == "malformed":
        data = tmp_path / "m.jsonl"
        data.write_text('{"text": "ok"}\n{oops\n')
    elif case in ("no-tokenizer", "no-config"):
        model = tmp_path / "model"
        shutil.copytree(MODEL, model)
        os.remove(model / ("tokenizer.json" if case == "no-tokenizer" else "config.json"))
    elif case == "bad-target":
        extra = ["--targets", "wq"]
    r = CliRunner().invoke(cli, ["train", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "o"),
                                 "--max-steps", "1", *extra])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_trains_and_generate_runs(tmp_path, data_file, device):
    out = tmp_path / "q"
    r = _run(["train", "--model", MODEL, "--data", data_file, "-o", out, "--max-steps", "3", "--qlora",
              "--lr", "1e-2", "--json", "--device", device, *SMALL], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    g = CliRunner().invoke(cli, ["generate", "--model", MODEL, "--adapter", str(out), "--max-new-tokens", "5",
                                 "--json", "the quick"])
    assert g.exit_code == 0, g.output
    result = json.loads(g.stdout)
    assert result["prompt"] == "the quick" and len(result["ids"]) >= 5


def test_generate_on_an_nf4_checkpoint_exact_and_int16(tmp_path):
    """``minilora generate`` on a ``minilora quantize``d folder (CPU, float32): the exact C matmul by default,
    ``--nf4-matmul int16`` for the approximate GEMV (both decode; on this tiny model they pick the same greedy
    tokens or not, so only the shape is checked); int16 outside CPU float32 is refused in one line."""
    nf4_dir = tmp_path / "nf4"
    q = CliRunner().invoke(cli, ["quantize", MODEL, "-o", str(nf4_dir), "--blocksize", "32"])
    assert q.exit_code == 0, q.output
    for mode in ("exact", "int16"):
        g = CliRunner().invoke(cli, ["generate", "--model", str(nf4_dir), "--device", "cpu", "--nf4-matmul", mode,
                                     "--max-new-tokens", "4", "--json", "the quick"])
        assert g.exit_code == 0, g.output
        assert len(json.loads(g.stdout)["ids"]) >= 4
    bad = CliRunner().invoke(cli, ["generate", "--model", str(nf4_dir), "--device", "cpu", "--dtype", "bfloat16",
                                   "--nf4-matmul", "int16", "the quick"])
    assert bad.exit_code == 2 and "float32" in bad.stderr and bad.stderr.count("\n") == 1


def test_qlora_on_a_model_without_linear_layers(tmp_path, data_file):
    model = tmp_path / "empty"
    shutil.copytree(MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 0
    (model / "config.json").write_text(json.dumps(config))
    tensors = {k: v for k, v in load_file(model / "model.safetensors").items() if ".layers." not in k}
    from minilora.safetensors_write import save_file
    save_file(tensors, model / "model.safetensors")
    r = CliRunner().invoke(cli, ["train", "--model", str(model), "--data", data_file, "-o", str(tmp_path / "o"),
                                 "--max-steps", "1", "--qlora"])
    assert r.exit_code == 2 and "no Linear layer" in r.stderr and r.stderr.count("\n") == 1


def test_keep_freed_memory_sets_glibc_thresholds_and_can_be_turned_off(monkeypatch):
    """The trainer's allocator tweak: on glibc both mallopt calls succeed (a non-glibc libc says no and
    nothing changes); MINILORA_MALLOC_DEFAULTS=1 skips it."""
    import ctypes

    from minilora.torch_backend.train import keep_freed_memory
    monkeypatch.setenv("MINILORA_MALLOC_DEFAULTS", "1")
    assert keep_freed_memory() is False
    monkeypatch.delenv("MINILORA_MALLOC_DEFAULTS")
    try:
        glibc = sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        glibc = False
    assert keep_freed_memory() is glibc
