"""``minilora diff``: exit codes 0 / 1 / 2, the per-tensor numbers, NF4 code mismatches, the matmul bound."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
from click.testing import CliRunner

from minilora.cli.main import cli
from minilora.diff import ulp_distance
from minilora.safetensors_io import load_file
from minilora.safetensors_write import save_file

DATA = os.path.join(os.path.dirname(__file__), "data", "bnb")


def run(*args):
    r = CliRunner().invoke(cli, ["diff", *[str(a) for a in args]])
    return r.exit_code, r.stdout, r.stderr


def test_ulp_distance():
    a = np.array([1.0, -0.0, np.nan, -1.0], np.float32)
    b = np.array([np.nextafter(np.float32(1), np.float32(2)), 0.0, np.nan, -1.0], np.float32)
    assert ulp_distance(a, b) == 1                      # -0 and +0 are adjacent: distance 0 or 1
    h = np.array([1.0], ml_dtypes.bfloat16)
    assert ulp_distance(h, np.array([1.0078125], ml_dtypes.bfloat16)) == 1


def test_identical_different_and_tolerance(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    save_file({"w": x, "v": np.arange(3, dtype=np.int32)}, tmp_path / "a.safetensors")
    save_file({"w": x, "v": np.arange(3, dtype=np.int32)}, tmp_path / "b.safetensors")
    y = x.copy()
    y[1, 2] = np.nextafter(y[1, 2], np.float32(np.inf))
    save_file({"w": y, "v": np.arange(3, dtype=np.int32)}, tmp_path / "c.safetensors")
    assert run(tmp_path / "a.safetensors", tmp_path / "b.safetensors")[0] == 0
    code, out, _ = run(tmp_path / "c.safetensors", tmp_path / "a.safetensors", "--json")
    report = json.loads(out)
    w = next(r for r in report["tensors"] if r["name"] == "w")
    assert code == 1 and w["max_ulp"] == 1 and w["outside"] == 1 and w["identical_fraction"] == 19 / 20
    assert run(tmp_path / "c.safetensors", tmp_path / "a.safetensors", "--rtol", "1e-6")[0] == 0
    save_file({"w": x}, tmp_path / "d.safetensors")
    code, out, _ = run(tmp_path / "d.safetensors", tmp_path / "a.safetensors", "--json")
    assert code == 1 and json.loads(out)["only_in_b"] == ["v"]


def test_nf4_folders_report_code_mismatches(tmp_path):
    shutil.copytree(os.path.join(DATA, "bnb-nf4"), tmp_path / "q")
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][5, 0] ^= 0x01       # one code of element 11
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    code, out, _ = run(tmp_path / "q", os.path.join(DATA, "bnb-nf4"), "--json")
    rows = {r["name"]: r for r in json.loads(out)["tensors"]}
    assert code == 1 and rows["model.layers.0.self_attn.q_proj.weight"]["code_mismatches"] == 1
    assert rows["model.layers.0.self_attn.k_proj.weight"]["code_mismatches"] == 0
    # 4-bit against float: dequantised first, so bnb's own dequantisation is bit-identical.
    code, out, _ = run(os.path.join(DATA, "bnb-nf4"), os.path.join(DATA, "bnb-nf4-dequantized.safetensors"), "--json")
    assert json.loads(out)["only_in_b"] == [] and all(
        r["identical_fraction"] == 1.0 for r in json.loads(out)["tensors"])


def test_matmul_bound(tmp_path):
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((3, 999)).astype(np.float32), rng.standard_normal((4, 999)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", w)
    np.save(tmp_path / "ref.npy", (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32))
    np.save(tmp_path / "out.npy", x @ w.T)
    args = ["--bound", "matmul", "--x", tmp_path / "x.npy", "--w", tmp_path / "w.npy"]
    assert run(tmp_path / "out.npy", tmp_path / "ref.npy", *args)[0] == 0
    assert run(tmp_path / "out.npy", tmp_path / "ref.npy")[0] == 1          # not bit-identical
    np.save(tmp_path / "bad.npy", x @ w.T + 1.0)
    assert run(tmp_path / "bad.npy", tmp_path / "ref.npy", *args)[0] == 1
    # integer files (minilora.vectors' bit patterns) were read as numbers ~1e9: a huge bound passed anything
    for name in ("x", "w"):
        np.save(tmp_path / f"{name}_bits.npy", np.load(tmp_path / f"{name}.npy").view(np.uint32))
    bits_args = ["--bound", "matmul", "--x", tmp_path / "x_bits.npy", "--w", tmp_path / "w_bits.npy"]
    code, _, err = run(tmp_path / "bad.npy", tmp_path / "ref.npy", *bits_args)
    assert code == 2 and "holds uint32 values, not floats" in err and err.count("\n") == 1, err
    np.save(tmp_path / "ref_bits.npy", np.load(tmp_path / "ref.npy").view(np.uint32))
    code, _, err = run(tmp_path / "out.npy", tmp_path / "ref_bits.npy", *args)
    assert code == 2 and "not floats" in err, err
    # an output that is not (M, N): one line (was a broadcasting traceback)
    code, _, err = run(tmp_path / "out.npy", tmp_path / "ref.npy", "--bound", "matmul", "--x", tmp_path / "x.npy",
                       "--w", tmp_path / "x.npy")
    assert code == 2 and "do not match the (M, N) = (3, 3)" in err and "Traceback" not in err, err


def test_bad_input_exits_2(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    code, _, err = run(tmp_path / "junk.safetensors", tmp_path / "junk.safetensors")
    assert code == 2 and "shorter than" in err and err.count("\n") == 1
    np.save(tmp_path / "x.npy", np.zeros(3))
    code, _, err = run(tmp_path / "x.npy", tmp_path / "x.npy", "--bound", "matmul")
    assert code == 2 and "needs --x and --w" in err


def test_compare_in_slices_gives_the_whole_tensor_figures(monkeypatch):
    """diff compares slices of CHUNK elements (memory O(CHUNK) beyond the two tensors: 3.1 GB for one 65 MB
    bf16 tensor before); the figures do not depend on the slicing."""
    from minilora import diff as d

    rng = np.random.default_rng(1)
    b = rng.standard_normal((37, 101)).astype(ml_dtypes.bfloat16)
    a = b.copy()
    a[3, 7], a[36, 100], a[20, 0] = np.nan, a[36, 100] * 2, np.inf
    b[5, 5] = a[5, 5] = np.nan
    bound = np.full(b.shape, 1e-3)
    whole = d.compare("t", a, b, 0.0, 1e-3)
    with_bound = d.compare("t", a, b, bound=bound)
    monkeypatch.setattr(d, "CHUNK", 64)
    assert d.compare("t", a, b, 0.0, 1e-3) == whole and d.compare("t", a, b, bound=bound) == with_bound
    assert whole["outside"] == 3 and whole["identical_fraction"] == (b.size - 3) / b.size  # NaN pairs: within


def test_relative_error_ignores_zero_references():
    """A 0 in the reference (NF4's code 7 dequantises to exact 0) gave `rel 3.4e+305`."""
    from minilora import diff as d

    row = d.compare("t", np.array([1e-3, 1.0], np.float32), np.array([0.0, 0.5], np.float32))
    assert row["max_rel_error"] == 1.0 and row["max_abs_error"] == 0.5
