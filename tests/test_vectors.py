"""The vectors shipped in the package agree with the reference, and export writes plain files."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from minilora import lora, nf4, vectors
from minilora.double_quant import dequantize_absmax, double_quantize

FLOAT = {"float32": (np.uint32, np.float32), "float16": (np.uint16, np.float16),
         "bfloat16": (np.uint16, ml_dtypes.bfloat16)}
CASES = vectors.manifest()["cases"]


def _float(bits, dtype):
    return bits.view(FLOAT[dtype][1])


def _assert_same(out, ref_bits, exact_zero_sign=True):
    """Bit-equal except NaN payloads (bitsandbytes' NaN bits depend on the torch kernel) and, for FP4,
    the sign of zero (bitsandbytes' C++ dequantiser has -0.0 at code 8; see docs/nf4.md)."""
    out = out.reshape(-1)
    ref = ref_bits.reshape(-1).view(out.dtype)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(out), nan)
    if exact_zero_sign:
        assert out[~nan].tobytes() == ref[~nan].tobytes()
    else:
        assert np.array_equal(out[~nan], ref[~nan])


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["operation"] in ("nf4_quantize", "fp4_quantize")])
def test_shipped_quantize_vectors_match_the_reference(name):
    case, v = CASES[name], vectors.load(name)
    p = case["params"]
    x = _float(v["x"], p["dtype"]).reshape(p["shape"])
    quant, dequant = (nf4.quantize_nf4, nf4.dequantize_nf4) if p["quant_type"] == "nf4" else (nf4.quantize_fp4, nf4.dequantize_fp4)
    packed, absmax = quant(x, p["blocksize"])
    assert packed.tobytes() == v["packed"].tobytes()
    _assert_same(absmax, v["absmax"])
    if p.get("double_quant"):
        codes, nested, _ = double_quantize(absmax, offset=_float(v["dq_offset"], "float32")[0])
        assert codes.tobytes() == v["dq_codes"].tobytes()
        assert nested.view(np.uint32).tobytes() == v["dq_nested_absmax"].tobytes()
        absmax = dequantize_absmax(codes, nested, _float(v["dq_offset"], "float32")[0])
    out = dequant(packed, absmax, p["shape"], np.float32, p["blocksize"])
    _assert_same(out, v["out_float32"], exact_zero_sign=p["quant_type"] == "nf4")


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c["operation"] == "lora_layer" and "bfloat16" in n])
def test_shipped_bf16_merges_match_the_reference(name):
    v = vectors.load(name)
    for module in {k.rsplit(".", 1)[0] for k in v}:
        if f"{module}.merged" not in v or f"{module}.A" not in v:
            continue
        r, alpha = CASES[name]["params"]["modules"][module]["r"], CASES[name]["params"]["modules"][module]["alpha"]
        s = CASES[name]["params"]["modules"][module]["scaling"]
        assert s == lora.scaling(alpha, r, bool(CASES[name]["params"]["config"].get("use_rslora")))
        W = _float(v[f"{module}.W"], "bfloat16")
        out = lora.merge_weight(W, _float(v[f"{module}.A"], "float32"), _float(v[f"{module}.B"], "float32"), s)
        assert out.view(np.uint16).tobytes() == v[f"{module}.merged"].tobytes(), module


def test_export_writes_npy_safetensors_and_manifest(tmp_path):
    assert vectors.main(["export", str(tmp_path / "v")]) == 0
    m = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert m["cases"].keys() == CASES.keys() and "bitsandbytes" in m["cases"]["nf4_bounds"]["oracle"]
    packed = np.load(tmp_path / "v" / "nf4_bounds" / "packed.npy", allow_pickle=False)
    assert packed.tobytes() == vectors.load("nf4_bounds")["packed"].tobytes()
    assert (tmp_path / "v" / "vectors.safetensors").stat().st_size > 100_000
    assert vectors.main(["export", str(tmp_path / "v")]) == 2


def test_command_line_help_and_a_closed_pipe(tmp_path, monkeypatch):
    """`export --help` wrote every case into a folder named "--help"; `list | head` printed a BrokenPipeError."""
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    assert vectors.main(["export", "--help"]) == 0 and os.listdir(tmp_path) == []
    assert vectors.main(["export", "-x"]) == 2 and os.listdir(tmp_path) == []
    p = subprocess.run(f"{sys.executable} -m minilora.vectors list | head -1", shell=True, capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.stdout.count("\n") == 1 and p.stderr == "", p.stderr
