"""``minilora merge --requantize`` against PEFT's ``merge_and_unload()`` into a 4-bit base, tensor by tensor
(tests/data/peft_requantize, made by tests/data/make_peft_requantize.py with PEFT 0.21.2 + bitsandbytes 0.50.2
on the CPU): packed codes, absmax, nested statistics, maps and every field of the quant-state JSON.

PEFT's Linear4bit.merge dequantises, adds one adapter's ΔW in float32 and quantises again, adapter by adapter;
bitsandbytes records the dtype of the tensor it quantised (float32 for a LoRA sum, the layer's dtype after
DoRA, which rounds to it). The double quantisation offset is bitsandbytes' torch.mean: ``--nested-offset torch``.
"""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from minilora.cli.main import cli
from minilora.nf4_checkpoint import STATE_PREFIX
from minilora.safetensors_io import load_file

DATA = os.path.join(os.path.dirname(__file__), "data")
GOLDEN = os.path.join(DATA, "peft_requantize")
with open(os.path.join(GOLDEN, "manifest.json")) as f:
    MANIFEST = json.load(f)


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("case", sorted(MANIFEST["cases"]))
def test_requantize_matches_peft_merge_and_unload(tmp_path, case):
    entry = MANIFEST["cases"][case]
    base = os.path.join(GOLDEN, entry["base"])
    double_quant = entry["quantization_config"]["bnb_4bit_use_double_quant"]
    if double_quant:
        pytest.importorskip("torch")  # --nested-offset torch computes bitsandbytes' offset with torch.mean
    adapters = [os.path.join(GOLDEN, a) for a in entry["adapters"]]
    offset = ["--nested-offset", "torch"] if double_quant else []
    code, _, err = run("merge", base, *adapters, "-o", tmp_path / "m", "--requantize", *offset, "-q")
    assert code == 0, err
    ours, ref = load_file(tmp_path / "m" / "model.safetensors"), load_file(os.path.join(GOLDEN, f"{case}.safetensors"))
    assert len(ref) == 14 * (6 if double_quant else 4)  # 2 layers x 7 Linear: codes, 2 or 4 statistics, the JSON
    for key, theirs in ref.items():
        out = ours[key]
        if STATE_PREFIX in key:  # the fields first, so that a failure names the field
            assert json.loads(bytes(out)) == json.loads(bytes(theirs)), key
        assert (out.dtype, out.shape) == (theirs.dtype, theirs.shape), key
        assert out.tobytes() == theirs.tobytes(), key
    with open(tmp_path / "m" / "config.json") as f:
        assert json.load(f)["quantization_config"] == entry["quantization_config"]


def test_peft_merges_several_adapters_one_at_a_time():
    """The golden data's premise: PEFT gives the same bytes whether the adapters are merged together or one
    at a time with a save and load in between (bitsandbytes stores float32 in the quant state, so the next
    merge dequantises to float32 either way); and the adapters do change the weights."""
    several = [c for c, e in MANIFEST["cases"].items() if len(e["adapters"]) > 1]
    assert several and all(MANIFEST["cases"][c]["one_at_a_time_same_bytes"] for c in several)
    for case in several:
        one = case.split("+")[0]
        a, b = load_file(os.path.join(GOLDEN, f"{case}.safetensors")), load_file(os.path.join(GOLDEN, f"{one}.safetensors"))
        key = "model.layers.0.self_attn.q_proj.weight"
        assert not np.array_equal(a[key], b[key]), case
