"""``minilora quantize`` / ``dequantize`` against checkpoints written by transformers + bitsandbytes
(tests/data/bnb, made by tests/data/make_bnb_checkpoints.py): same packed codes, same absmax and
nested statistics, bit-exact dequantisation; and the bad inputs of the on-disk format. tests/data/bnb_cuda
holds the same model quantised by bitsandbytes' CUDA kernels on an H100, with their dequantisation
(tests/data/make_bnb_cuda_checkpoints.py)."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from minilora import native, nf4
from minilora.checkpoint import Checkpoint
from minilora.cli.main import cli
from minilora.double_quant import double_quantize
from minilora.nf4_checkpoint import read_state
from minilora.safetensors_io import load_file
from minilora.safetensors_write import save_file

DATA = os.path.join(os.path.dirname(__file__), "data", "bnb")
DATA_CUDA = os.path.join(os.path.dirname(__file__), "data", "bnb_cuda")
BASE = os.path.join(DATA, "tiny-llama-bf16")


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def bits(a):
    return a.view(f"u{a.dtype.itemsize}")


@pytest.mark.parametrize("name, dq", [("bnb-nf4", False), ("bnb-nf4-dq", True)])
def test_quantize_matches_bitsandbytes(tmp_path, name, dq):
    flag = "--double-quant" if dq else "--no-double-quant"
    code, out, err = run("quantize", BASE, "-o", tmp_path / "q", flag, "--json")
    assert code == 0, err
    ours, theirs = load_file(tmp_path / "q" / "model.safetensors"), load_file(os.path.join(DATA, name, "model.safetensors"))
    assert set(ours) == set(theirs)
    quantized = [k for k in theirs if k.endswith(".quant_state.bitsandbytes__nf4")]
    assert len(quantized) == 14
    for key in theirs:
        if key.endswith((".quant_state.bitsandbytes__nf4", ".nested_absmax", ".absmax")) and dq:
            continue                                   # compared below, offset by offset
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert bits(ours[key]).tobytes() == bits(theirs[key]).tobytes(), key
    if dq:
        with Checkpoint(os.path.join(DATA, name)) as ckpt:
            for state_key in quantized:
                weight = state_key.rsplit(".quant_state", 1)[0]
                bnb_state = read_state(ckpt, weight)
                # bitsandbytes' offset is torch.mean (thread-dependent last bits); ours is the correctly
                # rounded mean. With bnb's offset, every nested byte and nested absmax is bnb's.
                raw_absmax = nf4.quantize_nf4(load_file(os.path.join(BASE, "model.safetensors"))[weight])[1]
                codes, nested, offset = double_quantize(raw_absmax, offset=bnb_state.offset)
                assert codes.tobytes() == bnb_state.nested_codes.tobytes(), weight
                assert bits(nested).tobytes() == bits(bnb_state.nested_absmax).tobytes(), weight
                our_offset = json.loads(bytes(ours[state_key]).decode())["nested_offset"]
                assert abs(our_offset - float(bnb_state.offset)) <= 2 * np.spacing(np.float32(our_offset))
                # and the CLI's own tensors are exactly the nested quantisation with the offset it wrote
                codes, nested, _ = double_quantize(raw_absmax, offset=np.float32(our_offset))
                assert ours[f"{weight}.absmax"].tobytes() == codes.tobytes(), weight
                assert bits(ours[f"{weight}.nested_absmax"]).tobytes() == bits(nested).tobytes(), weight
                assert our_offset == float(double_quantize(raw_absmax)[2])   # the exact mean, by default
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_use_double_quant"] is dq and config["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.parametrize("data, name", [(DATA, "bnb-nf4"), (DATA, "bnb-nf4-dq"), (DATA_CUDA, "bnb-cuda-nf4-dq")])
def test_dequantize_is_bit_exact_with_bitsandbytes(tmp_path, data, name):
    """bitsandbytes' own dequantize_4bit: on the CPU, and on the GPU for a checkpoint its CUDA kernels wrote."""
    code, _, err = run("dequantize", os.path.join(data, name), "-o", tmp_path / "dq")
    assert code == 0, err
    ours = load_file(tmp_path / "dq" / "model.safetensors")
    expected = load_file(os.path.join(data, f"{name}-dequantized.safetensors"))
    for key, ref in expected.items():
        assert ours[key].dtype == ref.dtype and ours[key].shape == ref.shape
        assert bits(ours[key]).tobytes() == bits(ref).tobytes(), key
    base = load_file(os.path.join(BASE, "model.safetensors"))
    assert set(ours) == set(base)
    assert "quantization_config" not in json.loads((tmp_path / "dq" / "config.json").read_text())


def test_quantize_report_and_round_trip(tmp_path):
    code, out, _ = run("quantize", BASE, "-o", tmp_path / "q", "--blocksize", "128", "--json")
    report = json.loads(out)
    assert code == 0 and report["totals"]["quantized"] == 14
    rows = [r for r in report["tensors"] if r["quantized"]]
    assert all(r["bytes_after"] < r["bytes_before"] / 4 + 1400 and 0 < r["rms_error"] <= r["max_abs_error"] for r in rows)
    assert run("dequantize", tmp_path / "q", "-o", tmp_path / "dq", "--dtype", "float32")[0] == 0
    base, back = load_file(os.path.join(BASE, "model.safetensors")), load_file(tmp_path / "dq" / "model.safetensors")
    packed, absmax = nf4.quantize_nf4(base["model.layers.1.mlp.down_proj.weight"], 128)
    codes, nested, offset = double_quantize(absmax)
    from minilora.double_quant import dequantize_absmax
    ref = nf4.dequantize_nf4(packed, dequantize_absmax(codes, nested, offset), (64, 96), np.float32, 128)
    assert bits(back["model.layers.1.mlp.down_proj.weight"]).tobytes() == bits(ref).tobytes()
    assert back["model.norm.weight"].dtype == np.float32


def test_include_exclude(tmp_path):
    code, out, _ = run("quantize", BASE, "-o", tmp_path / "q", "--include", "*.mlp.*", "--exclude", "*.layers.0.*", "--json")
    assert code == 0
    assert sorted(r["name"] for r in json.loads(out)["tensors"] if r["quantized"]) == [
        f"model.layers.1.mlp.{p}.weight" for p in ("down_proj", "gate_proj", "up_proj")]


def _error(args, message):
    code, _, err = run(*args)
    assert code == 2, err
    assert message in err and err.strip().count("\n") == 0


def test_bad_inputs(tmp_path):
    _error(["quantize", BASE, "-o", tmp_path / "q", "--blocksize", "48"], "48")
    _error(["quantize", BASE, "-o", tmp_path / "q", "--include", "nothing.*"], "no Linear weights to quantise")
    _error(["quantize", os.path.join(DATA, "bnb-nf4"), "-o", tmp_path / "q"], "already 4-bit quantised")
    _error(["dequantize", BASE, "-o", tmp_path / "q"], "has no bitsandbytes 4-bit weights")
    assert not os.path.exists(tmp_path / "q")
    # A quant state whose JSON disagrees with the tensor sizes.
    bad = tmp_path / "bad"
    shutil.copytree(os.path.join(DATA, "bnb-nf4"), bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    fields = json.loads(bytes(tensors[key]).decode())
    fields["shape"] = [64, 65]
    tensors[key] = np.frombuffer(json.dumps(fields).encode(), dtype=np.uint8).copy()
    save_file(tensors, bad / "model.safetensors")
    _error(["dequantize", bad, "-o", tmp_path / "o"], "needs 2080 packed bytes")
    fields["shape"], fields["blocksize"] = [64, 64], 100
    tensors[key] = np.frombuffer(json.dumps(fields).encode(), dtype=np.uint8).copy()
    save_file(tensors, bad / "model.safetensors")
    _error(["dequantize", bad, "-o", tmp_path / "o"], "blocksize 100 is not one of")
    assert not os.path.exists(tmp_path / "o")


def test_merge_into_an_nf4_base_dequantised_and_requantised(tmp_path):
    from minilora import lora
    from minilora.checkpoint import load_adapter
    from minilora.synthetic import write_lora_adapter

    config = json.loads(open(os.path.join(BASE, "config.json")).read())
    write_lora_adapter(tmp_path / "ad", config, rank=4, alpha=8, targets=("q_proj", "down_proj"), std=0.05)
    adapter = load_adapter(tmp_path / "ad")
    nf4_base = os.path.join(DATA, "bnb-nf4-dq")
    expected = load_file(os.path.join(DATA, "bnb-nf4-dq-dequantized.safetensors"))   # bnb's dequantisation

    code, out, err = run("merge", nf4_base, tmp_path / "ad", "-o", tmp_path / "float", "--json")
    assert code == 0, err
    merged = load_file(tmp_path / "float" / "model.safetensors")
    for key, W in expected.items():
        m = adapter.modules.get(key[: -len(".weight")])
        ref = W if m is None else lora.merge_weight(W, m.A, m.B, 2.0)
        assert bits(merged[key]).tobytes() == bits(ref).tobytes(), key
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())

    code, out, err = run("merge", nf4_base, tmp_path / "ad", "-o", tmp_path / "q", "--requantize", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)["tensors"]}
    ours, theirs = load_file(tmp_path / "q" / "model.safetensors"), load_file(os.path.join(nf4_base, "model.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        weight = key.split(".weight")[0]
        if weight in adapter.modules:
            continue
        assert ours[key].tobytes() == theirs[key].tobytes(), key            # untouched: byte for byte
    key = "model.layers.1.mlp.down_proj.weight"
    m = adapter.modules["model.layers.1.mlp.down_proj"]
    state = nf4.quantize(expected[key].astype(np.float32) + lora.delta_weight(m.A, m.B, 2.0), 64, True)  # PEFT's sum
    assert ours[key].tobytes() == state.packed.tobytes()
    assert 0 < rows[key]["delta_rel_error"] < 1 and 0 < rows[key]["codes_changed"] < 1
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["load_in_4bit"]


def test_merge_into_an_nf4_base_holds_one_quant_state_at_a_time(tmp_path, monkeypatch):
    """Memory O(largest tensor): the quant states read while merging are let go once written (all of the
    model's packed weights stayed in memory until the end before: 94 of 104 MB in an audit)."""
    import gc
    import weakref

    import minilora.merge_nf4 as merge_nf4
    from minilora.synthetic import write_lora_adapter

    config = json.loads(open(os.path.join(BASE, "config.json")).read())
    write_lora_adapter(tmp_path / "ad", config, rank=4, alpha=8, targets=("q_proj",), std=0.05)
    alive, most = [], [0]

    def counted(ckpt, key):
        state = read_state(ckpt, key)
        gc.collect()
        alive[:] = [r for r in alive if r() is not None]
        alive.append(weakref.ref(state.packed))
        most[0] = max(most[0], len(alive))
        return state
    monkeypatch.setattr(merge_nf4, "read_state", counted)
    for extra in ([], ["--requantize"]):
        most[0] = 0
        code, _, err = run("merge", os.path.join(DATA, "bnb-nf4-dq"), tmp_path / "ad", "-o", tmp_path / f"m{len(extra)}",
                           *extra)
        assert code == 0, err
        n_layers = config["num_hidden_layers"]
        assert 7 * n_layers > 3 and most[0] <= n_layers + 1, most  # the planned (adapted) ones + the one in hand


def test_requantize_of_a_bf16_layer_quantises_the_float32_sum_as_peft(tmp_path):
    """PEFT's Linear4bit.merge quantises dequant(W) + ΔW in float32; minilora rounded the sum to the layer's
    bf16 first (about 300 of 74k codes and every absmax differed from PEFT + bitsandbytes in an audit). The
    state then says float32, as bitsandbytes records it (minilora kept bfloat16 until 2026-11-23: a second
    merge into that file dequantised to bf16 and landed elsewhere than PEFT's)."""
    import ml_dtypes

    from minilora import lora
    from minilora.checkpoint import load_adapter
    from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

    config = llama_config(hidden=64, intermediate=128, layers=1, heads=4, kv_heads=2, vocab=64, dtype="bfloat16")
    write_llama_checkpoint(tmp_path / "b", config, seed=0)
    write_lora_adapter(tmp_path / "ad", config, rank=4, alpha=8, targets=("q_proj",), std=0.05, seed=1)
    assert run("quantize", tmp_path / "b", "-o", tmp_path / "q", "-q")[0] == 0
    code, _, err = run("merge", tmp_path / "q", tmp_path / "ad", "-o", tmp_path / "m", "--requantize", "-q")
    assert code == 0, err
    key = "model.layers.0.self_attn.q_proj.weight"
    from minilora.checkpoint import Checkpoint as Ck
    with Ck(str(tmp_path / "q")) as before, Ck(str(tmp_path / "m")) as after:
        st, new = read_state(before, key), read_state(after, key)
    W = nf4.dequantize(st)  # (N, K) bfloat16
    assert W.dtype == ml_dtypes.bfloat16 and new.dtype == np.float32
    m = load_adapter(tmp_path / "ad").modules[key[: -len(".weight")]]
    want = nf4.quantize(W.astype(np.float32) + lora.delta_weight(m.A, m.B, 2.0), 64, True)
    rounded = nf4.quantize(lora.merge_weight(W, m.A, m.B, 2.0), 64, True)
    assert new.packed.tobytes() == want.packed.tobytes() != rounded.packed.tobytes()


def test_requantize_nested_offset_torch_stores_bitsandbytes_mean(tmp_path):
    """--nested-offset torch: a re-quantised layer's offset is torch.mean of its new absmax, as PEFT's
    Linear4bit.merge + bitsandbytes store it (with it an audit found PEFT's merged tensors equal to minilora's
    in every byte but the quant state's dtype field); the default stays the exact mean. The two part in some
    layers here, and the codes never depend on the choice."""
    from minilora import lora
    from minilora.checkpoint import load_adapter
    from minilora.double_quant import exact_mean_float32
    from minilora.quantize import torch_mean_float32
    from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

    config = llama_config(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=64, dtype="bfloat16")
    write_llama_checkpoint(tmp_path / "b", config, seed=3)
    write_lora_adapter(tmp_path / "ad", config, rank=4, alpha=8, std=0.05, seed=4)
    assert run("quantize", tmp_path / "b", "-o", tmp_path / "q", "--double-quant", "-q")[0] == 0
    for mean in ("exact", "torch"):
        code, _, err = run("merge", tmp_path / "q", tmp_path / "ad", "-o", tmp_path / mean, "--requantize",
                           "--nested-offset", mean, "-q")
        assert code == 0, err
    modules = load_adapter(tmp_path / "ad").modules
    parted = 0
    with Checkpoint(str(tmp_path / "q")) as q, Checkpoint(str(tmp_path / "exact")) as e, \
            Checkpoint(str(tmp_path / "torch")) as t:
        for path, m in modules.items():
            key = path + ".weight"
            W = nf4.dequantize(read_state(q, key)).astype(np.float32) + lora.delta_weight(m.A, m.B, 2.0)  # (N, K)
            absmax = nf4.quantize(W, 64).absmax  # what double quantisation then compresses
            new_e, new_t = read_state(e, key), read_state(t, key)
            assert new_e.offset == exact_mean_float32(absmax) and new_t.offset == torch_mean_float32(absmax)
            assert new_e.packed.tobytes() == new_t.packed.tobytes()
            parted += new_e.offset != new_t.offset
    assert 0 < parted < len(modules), parted
    _error(["merge", tmp_path / "q", tmp_path / "ad", "-o", tmp_path / "x", "--nested-offset", "torch"],
           "--nested-offset applies only with --requantize")


def test_requantize_with_two_adapters_quantises_after_each_as_peft(tmp_path):
    """PEFT's Linear4bit.merge dequantises, adds one adapter's ΔW, quantises, then the next adapter: with two
    adapters the codes are Q(deQ(Q(W + Δ1)) + Δ2), not Q(W + Δ1 + Δ2) (minilora did the latter before; an audit
    then found 35 of 91 tensors apart from PEFT's, and after the change only the 14 quant-state dtype fields)."""
    from minilora import lora
    from minilora.checkpoint import load_adapter
    from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

    config = llama_config(hidden=128, intermediate=256, layers=1, heads=4, kv_heads=2, vocab=64, dtype="bfloat16")
    write_llama_checkpoint(tmp_path / "b", config, seed=5)
    write_lora_adapter(tmp_path / "a1", config, rank=4, alpha=8, targets=("q_proj", "v_proj"), std=0.05, seed=6)
    write_lora_adapter(tmp_path / "a2", config, rank=8, alpha=8, targets=("q_proj",), std=0.05, seed=7)
    assert run("quantize", tmp_path / "b", "-o", tmp_path / "q", "--double-quant", "-q")[0] == 0
    code, _, err = run("merge", tmp_path / "q", tmp_path / "a1", tmp_path / "a2", "-o", tmp_path / "m",
                       "--requantize", "-q")
    assert code == 0, err
    m1, m2 = (load_adapter(tmp_path / a).modules for a in ("a1", "a2"))
    with Checkpoint(str(tmp_path / "q")) as q, Checkpoint(str(tmp_path / "m")) as m:
        for path, steps in (("model.layers.0.self_attn.q_proj", [(m1, 2.0), (m2, 1.0)]),
                            ("model.layers.0.self_attn.v_proj", [(m1, 2.0)])):
            st, got = read_state(q, path + ".weight"), read_state(m, path + ".weight")
            W = nf4.dequantize(st).astype(np.float32)  # (N, K)
            once = W + sum(lora.delta_weight(a[path].A, a[path].B, s) for a, s in steps)
            for i, (a, s) in enumerate(steps):
                W = nf4.dequantize(nf4.quantize(W, 64, True), np.float32) if i else W
                W = W + lora.delta_weight(a[path].A, a[path].B, s)
            want = nf4.quantize(W, 64, True)
            assert got.packed.tobytes() == want.packed.tobytes() and got.offset == want.offset
            assert nf4.dequantize(got, np.float32).tobytes() == nf4.dequantize(want, np.float32).tobytes()
            assert (got.packed.tobytes() != nf4.quantize(once, 64, True).packed.tobytes()) == (len(steps) == 2)


def test_requantize_needs_a_4bit_base(tmp_path):
    from minilora.synthetic import write_lora_adapter

    config = json.loads(open(os.path.join(BASE, "config.json")).read())
    write_lora_adapter(tmp_path / "ad", config, targets=("q_proj",))
    _error(["merge", BASE, tmp_path / "ad", "-o", tmp_path / "o", "--requantize"], "--requantize needs a 4-bit")


def test_inspect_reports_the_4bit_layers():
    code, out, _ = run("inspect", os.path.join(DATA, "bnb-nf4-dq"), "--no-tensors")
    assert code == 0 and "4-bit: 14 weights, nf4 blocksize 64 with double quantisation" in out
    code, out, _ = run("inspect", os.path.join(DATA, "bnb-nf4"), "--json")
    info = json.loads(out)
    assert len(info["quantized"]) == 14 and not any(s["double_quant"] for s in info["quantized"].values())


def test_torch_mean_offset_reproduces_transformers_cpu_save_byte_for_byte(tmp_path):
    """--nested-offset torch: the offset is bitsandbytes' own torch.mean, so every tensor (packed codes, nested
    codes, nested absmax, quant-state JSON) equals what transformers + bitsandbytes wrote on the CPU; and on
    weights where torch.mean and the exact mean part (checked: 5 of 8 here), the offset written is torch's."""
    import torch

    code, _, err = run("quantize", BASE, "-o", tmp_path / "q", "--nested-offset", "torch")
    assert code == 0, err
    ours = load_file(tmp_path / "q" / "model.safetensors")
    theirs = load_file(os.path.join(DATA, "bnb-nf4-dq", "model.safetensors"))
    assert set(ours) == set(theirs)
    differ = [k for k in theirs if ours[k].dtype != theirs[k].dtype or bits(ours[k]).tobytes() != bits(theirs[k]).tobytes()]
    assert differ == []

    rng = np.random.default_rng(3)
    weights = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((256, 1024)).astype(np.float32)
               for i in range(8)}
    os.makedirs(tmp_path / "m")
    save_file(weights, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    parted = 0
    for mean in ("torch", "exact"):
        assert run("quantize", tmp_path / "m", "-o", tmp_path / mean, "--nested-offset", mean)[0] == 0
        q = load_file(tmp_path / mean / "model.safetensors")
        for key, w in weights.items():
            absmax = native.quantize_nf4(w)[1]
            want = {"torch": np.float32(torch.from_numpy(absmax).mean().item()),
                    "exact": double_quantize(absmax)[2]}
            offset = json.loads(bytes(q[f"{key}.quant_state.bitsandbytes__nf4"]).decode())["nested_offset"]
            assert np.float32(offset) == want[mean], (mean, key)
            parted += mean == "torch" and want["torch"] != want["exact"]
    assert parted >= 3
