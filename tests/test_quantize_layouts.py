"""``minilora quantize`` / ``dequantize`` / NF4-base ``merge`` on the layouts transformers 5 + bitsandbytes
decide by model type: GPT-2's Conv1D weights (quantised transposed), the modules left in float
(``llm_int8_skip_modules``), embeddings, MoE experts / routers and T5's ``wo`` (never quantised); and the
bad inputs of that path (one line, exit code 2). The checkpoints are synthetic, written with NumPy; the
same cases were checked against transformers 5.23 + bitsandbytes 0.50.2 on CPU while developing (see
docs/formats.md, "Which layers are quantised")."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from minilora import lora, nf4
from minilora.cli.main import cli
from minilora.nf4_checkpoint import quantization_config, skip_list, skipped_by, state_tensors
from minilora.safetensors_io import load_file
from minilora.safetensors_write import save_file

DATA = os.path.join(os.path.dirname(__file__), "data", "bnb")
LLAMA = os.path.join(DATA, "tiny-llama-bf16")
BERT = os.path.join(os.path.dirname(__file__), "data", "models", "tiny-bert")
D, V = 32, 64  # hidden size, vocabulary of the synthetic GPT-2


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def error(args, *message):
    code, _, err = run(*args)
    assert code == 2, err
    assert all(m in err for m in message) and err.strip().count("\n") == 0, err


def bits(a):
    return a.view(f"u{a.dtype.itemsize}")


def write_model(folder, config, tensors):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    return folder


def gpt2(folder):
    """A 1-block GPT-2 as transformers saves it: Conv1D weights (in, out), tied lm_head absent."""
    rng = np.random.default_rng(0)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    h = "transformer.h.0."
    tensors = {"transformer.wte.weight": w(V, D), "transformer.wpe.weight": w(16, D),
               h + "ln_1.weight": np.ones(D, np.float32), h + "ln_1.bias": np.zeros(D, np.float32),
               h + "attn.c_attn.weight": w(D, 3 * D), h + "attn.c_attn.bias": w(3 * D),
               h + "attn.c_proj.weight": w(D, D), h + "attn.c_proj.bias": w(D),
               h + "mlp.c_fc.weight": w(D, 4 * D), h + "mlp.c_fc.bias": w(4 * D),
               h + "mlp.c_proj.weight": w(4 * D, D), h + "mlp.c_proj.bias": w(D),
               "transformer.ln_f.weight": np.ones(D, np.float32), "transformer.ln_f.bias": np.zeros(D, np.float32)}
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": D, "n_layer": 1,
              "n_head": 4, "vocab_size": V, "n_positions": 16, "tie_word_embeddings": True}
    return write_model(folder, config, tensors)


CONV1D = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
          "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]


def state_json(tensors, key):
    return json.loads(bytes(tensors[f"{key}.quant_state.bitsandbytes__nf4"]).decode())


def test_conv1d_weights_are_quantised_transposed_and_dequantised_back(tmp_path):
    """transformers' Bnb4bitQuantize quantises a Conv1D weight (K, N) as W.T (N, K); quant_state shape
    [out, in]. Dequantising gives Conv1D's (K, N) back, bit-exact, and a no-DQ round trip is byte-exact."""
    base = load_file(gpt2(tmp_path / "gpt2") / "model.safetensors")
    code, out, err = run("quantize", tmp_path / "gpt2", "-o", tmp_path / "q", "--no-double-quant", "--json")
    assert code == 0, err
    assert sorted(r["name"] for r in json.loads(out)["tensors"] if r.get("transposed")) == sorted(CONV1D)
    q = load_file(tmp_path / "q" / "model.safetensors")
    for key in CONV1D:
        W = base[key]                                                  # (K, N)
        ref = nf4.quantize(np.ascontiguousarray(W.T), 64, False)       # (N, K), as transformers does
        assert state_json(q, key)["shape"] == [W.shape[1], W.shape[0]]
        assert q[key].tobytes() == ref.packed.tobytes(), key           # the square c_proj too
        assert bits(q[f"{key}.absmax"]).tobytes() == bits(ref.absmax).tobytes(), key
    assert run("dequantize", tmp_path / "q", "-o", tmp_path / "dq")[0] == 0
    back = load_file(tmp_path / "dq" / "model.safetensors")
    for key in CONV1D:
        ref = nf4.dequantize(nf4.quantize(np.ascontiguousarray(base[key].T), 64, False))   # (N, K)
        assert back[key].shape == base[key].shape and bits(back[key]).tobytes() == bits(ref.T.copy()).tobytes()
    assert run("quantize", tmp_path / "dq", "-o", tmp_path / "q2", "--no-double-quant")[0] == 0
    again = load_file(tmp_path / "q2" / "model.safetensors")
    assert set(again) == set(q) and all(again[k].tobytes() == q[k].tobytes() for k in q)


def test_an_nf4_conv1d_base_as_transformers_writes_it(tmp_path):
    """A GPT-2 NF4 folder in transformers' layout (Conv1D weights quantised as (N, K)): dequantize and a merge
    into it write Conv1D's (K, N), which a plain GPT2Model loads."""
    base = load_file(gpt2(tmp_path / "gpt2") / "model.safetensors")
    tensors, config = {}, json.loads((tmp_path / "gpt2" / "config.json").read_text())
    for key, value in base.items():
        parts = state_tensors(key, nf4.quantize(np.ascontiguousarray(value.T), 64, True)) if key in CONV1D else []
        tensors.update(parts or [(key, value)])
    write_model(tmp_path / "q", dict(config, quantization_config=quantization_config(True, "float32")), tensors)
    assert run("dequantize", tmp_path / "q", "-o", tmp_path / "dq")[0] == 0
    back = load_file(tmp_path / "dq" / "model.safetensors")
    for key in CONV1D:
        ref = nf4.dequantize(nf4.quantize(np.ascontiguousarray(base[key].T), 64, True))   # (N, K)
        assert bits(back[key]).tobytes() == bits(np.ascontiguousarray(ref.T)).tobytes(), key

    rng = np.random.default_rng(1)
    key = "transformer.h.0.attn.c_attn"
    A, B = rng.standard_normal((4, D)).astype(np.float32), rng.standard_normal((3 * D, 4)).astype(np.float32)
    os.makedirs(tmp_path / "ad")
    with open(tmp_path / "ad" / "adapter_config.json", "w") as f:
        json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "fan_in_fan_out": True,
                   "target_modules": ["c_attn"]}, f)
    save_file({f"base_model.model.{key}.lora_A.weight": A, f"base_model.model.{key}.lora_B.weight": B},
              tmp_path / "ad" / "adapter_model.safetensors")
    code, _, err = run("merge", tmp_path / "q", tmp_path / "ad", "-o", tmp_path / "m")
    assert code == 0, err
    merged = load_file(tmp_path / "m" / "model.safetensors")
    ref = lora.merge_weight(back[f"{key}.weight"], A, B, 2.0, fan_in_fan_out=True)     # (K, N)
    assert merged[f"{key}.weight"].shape == (D, 3 * D)
    assert bits(merged[f"{key}.weight"]).tobytes() == bits(ref).tobytes()
    assert all(merged[k].shape == base[k].shape for k in base)


def test_transformers_skip_rule():
    """Known answers from transformers' should_convert_module comments."""
    assert skipped_by("layer.1", "layer.1.attn") and not skipped_by("layer.1", "layer.11.attn")
    assert skipped_by("layer.*", "layer.11.attn") and not skipped_by("mlp.gate", "mlp.gate_proj")
    assert skipped_by("fc1", "model.decoder.layers.23.fc1")
    # a name that would also skip a quantised module is anchored; the plain one still matches by suffix
    out = skip_list(["model.layers.0.mlp.fc1", "pooler.dense"], ["vision_model.layers.0.mlp.fc1"])
    assert out == [r"model\.layers\.0\.mlp\.fc1$", "pooler.dense"]
    assert skipped_by(out[0], "model.layers.0.mlp.fc1") and not skipped_by(out[0], "vision_model.layers.0.mlp.fc1")
    assert skipped_by(out[1], "bert.pooler.dense")


def skipped_modules(folder):
    return json.loads((folder / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]


def bert_with_heads(folder):
    """tests/data's tiny BERT plus the pooler BertModel has by default and BertForMaskedLM's head (Linear
    layers outside the blocks; the head's decoder is tied to the word embeddings: no tensor of its own)."""
    shutil.copytree(BERT, folder)
    tensors = load_file(folder / "model.safetensors")
    eye, zeros = np.eye(32, dtype=np.float32), np.zeros(32, np.float32)
    tensors.update({"pooler.dense.weight": eye, "pooler.dense.bias": zeros,
                    "cls.predictions.transform.dense.weight": eye, "cls.predictions.transform.dense.bias": zeros,
                    "cls.predictions.bias": np.zeros(128, np.float32)})
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("base, args", [
    ("bert", []),
    (LLAMA, ["--exclude", "model.layers.*.mlp.*"]),
    (LLAMA, ["--include", "model.layers.*", "--include", "lm_head", "--exclude", "model.layers.*.mlp.*"]),
])
def test_modules_left_in_float_are_skipped_exactly(tmp_path, base, args):
    """With llm_int8_skip_modules set, transformers converts a Linear / Conv1D module to Linear4bit unless
    an entry matches it (and adds no default skips): so every module whose 2-D weight stays float must be
    matched, and no quantised one. A tied lm_head has no tensor: listed whenever lm_head is not quantised."""
    base = bert_with_heads(tmp_path / "bert") if base == "bert" else base
    code, out, err = run("quantize", base, "-o", tmp_path / "q", *args, "--json")
    assert code == 0, err
    rows = json.loads(out)["tensors"]
    skip = skipped_modules(tmp_path / "q")
    assert json.loads(out)["totals"]["skipped_modules"] == skip
    modules = {r["name"][: -len(".weight")]: r["quantized"] for r in rows
               if r["name"].endswith(".weight") and len(r["shape"]) == 2}
    modules.setdefault("lm_head", False)
    if args == []:                           # BERT: left in float by minilora's default, converted by transformers'
        assert {"pooler.dense", "cls.predictions.transform.dense", "cls.predictions.decoder"} <= set(skip)
        modules["cls.predictions.decoder"] = False
    for module, quantized in modules.items():
        assert any(skipped_by(e, module) for e in skip) is not quantized, module


def test_embeddings_moe_experts_routers_and_t5_wo_stay_float(tmp_path):
    rng = np.random.default_rng(2)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    t5 = write_model(tmp_path / "t5", {"model_type": "t5"}, {
        "shared.weight": w(V, D),
        "encoder.block.0.layer.0.SelfAttention.q.weight": w(D, D),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": w(32, 4),  # nn.Embedding
        "encoder.block.0.layer.1.DenseReluDense.wi.weight": w(2 * D, D),
        "encoder.block.0.layer.1.DenseReluDense.wo.weight": w(D, 2 * D)})       # _keep_in_fp32_modules
    p = "model.layers.0."
    moe = write_model(tmp_path / "moe", {"model_type": "mixtral"}, {
        p + "self_attn.q_proj.weight": w(D, D), p + "block_sparse_moe.gate.weight": w(4, D),
        **{f"{p}block_sparse_moe.experts.{e}.{n}.weight": w(D, D) for e in range(2) for n in ("w1", "w2", "w3")}})
    for folder, expected in ((t5, ["encoder.block.0.layer.0.SelfAttention.q.weight",
                                   "encoder.block.0.layer.1.DenseReluDense.wi.weight"]),
                             (moe, [p + "self_attn.q_proj.weight"])):
        code, out, err = run("quantize", folder, "-o", tmp_path / "q", "--json", "--force")
        assert code == 0, err
        assert sorted(r["name"] for r in json.loads(out)["tensors"] if r["quantized"]) == expected
    skip = skipped_modules(tmp_path / "q")                      # the MoE model's: the router, not each expert
    assert skip == ["lm_head", p + "block_sparse_moe.gate"]
    error(["quantize", moe, "-o", tmp_path / "x", "--include", "*.experts.*"], "one MoE expert", "3-D tensors")
    error(["quantize", moe, "-o", tmp_path / "x", "--include", "*.gate"], "the router of a MoE layer")
    error(["quantize", t5, "-o", tmp_path / "x", "--include", "*"], "an embedding (nn.Embedding")
    error(["quantize", t5, "-o", tmp_path / "x", "--include", "*.wo"], "keeps in float for t5")
    assert not os.path.exists(tmp_path / "x")


def test_weights_quantize_cannot_take(tmp_path):
    w = np.ones((8, 8), np.float32)
    f64 = write_model(tmp_path / "f64", {"model_type": "llama"},
                      {"model.layers.0.mlp.up_proj.weight": w.astype(np.float64)})
    error(["quantize", f64, "-o", tmp_path / "x"], "model.layers.0.mlp.up_proj.weight", "is float64")
    empty = write_model(tmp_path / "empty", {"model_type": "llama"}, {
        "model.layers.0.mlp.up_proj.weight": np.zeros((0, 8), np.float32), "model.layers.0.mlp.down_proj.weight": w})
    code, out, err = run("quantize", empty, "-o", tmp_path / "q", "--json")
    assert code == 0, err
    rows = {r["name"]: r["quantized"] for r in json.loads(out)["tensors"]}
    assert rows == {"model.layers.0.mlp.up_proj.weight": False, "model.layers.0.mlp.down_proj.weight": True}
    assert "model.layers.0.mlp.up_proj" in skipped_modules(tmp_path / "q")
    assert not os.path.exists(tmp_path / "x")


def test_nan_weights_give_valid_json_and_an_honest_summary(tmp_path):
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    bad = w.copy()
    bad[2, 3] = np.nan
    folder = write_model(tmp_path / "nan", {"model_type": "llama"}, {
        "model.layers.0.mlp.down_proj.weight": w, "model.layers.0.mlp.up_proj.weight": bad})
    code, out, err = run("quantize", folder, "-o", tmp_path / "q", "--json")
    assert code == 0, err

    def no_nan(name):
        raise AssertionError(f"bare {name} in --json output")

    report = json.loads(out, parse_constant=no_nan)
    row = {r["name"]: r for r in report["tensors"]}["model.layers.0.mlp.up_proj.weight"]
    assert row["max_abs_error"] is None and row["rms_error"] is None and row["non_finite"] == 1
    assert report["totals"]["non_finite_tensors"] == 1 and report["totals"]["max_abs_error"] > 0
    code, out, err = run("quantize", folder, "-o", tmp_path / "q2")
    assert code == 0 and "1 quantised tensor(s) hold NaN/inf weights" in err


def nf4_copy(tmp_path, name="bnb-nf4-dq"):
    folder = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), folder)
    return folder, load_file(folder / "model.safetensors")


KEY = "model.layers.0.self_attn.q_proj.weight"


def test_a_quantised_weight_without_its_packed_tensor_is_refused(tmp_path):
    folder, tensors = nf4_copy(tmp_path)
    del tensors[KEY]
    save_file(tensors, folder / "model.safetensors")
    error(["dequantize", folder, "-o", tmp_path / "x"], KEY, f"packed weight tensor {KEY} is missing")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("change, message", [
    (lambda f: [1, 2], "quant state is JSON but not an object: list"),
    (lambda f: dict(f, nested_dtype="float16"), "nested_dtype 'float16' is not 'float32'"),
    (lambda f: dict(f, shape=[True, 4096]), "shape [True, 4096] is not a list of sizes"),
    (lambda f: dict(f, nested_offset=True), "nested_offset True is not a number"),
    (lambda f: dict(f, blocksize=64.0), "blocksize 64.0 is not one of"),
    (lambda f: dict(f, nested_blocksize=256.0), "nested_blocksize 256.0"),
])
def test_quant_state_fields_are_validated_strictly(tmp_path, change, message):
    folder, tensors = nf4_copy(tmp_path)
    state = f"{KEY}.quant_state.bitsandbytes__nf4"
    fields = change(json.loads(bytes(tensors[state]).decode()))
    tensors[state] = np.frombuffer(json.dumps(fields).encode(), dtype=np.uint8).copy()
    save_file(tensors, folder / "model.safetensors")
    error(["dequantize", folder, "-o", tmp_path / "x"], KEY, message)


def test_requantize_with_dtype_is_refused(tmp_path):
    from minilora.synthetic import write_lora_adapter

    config = json.loads(open(os.path.join(LLAMA, "config.json")).read())
    write_lora_adapter(tmp_path / "ad", config, targets=("q_proj",))
    error(["merge", os.path.join(DATA, "bnb-nf4-dq"), tmp_path / "ad", "-o", tmp_path / "x", "--requantize",
           "--dtype", "fp16"], "--dtype float16 does not apply with --requantize")
    assert not os.path.exists(tmp_path / "x")


def test_packed_codes_stored_as_bfloat16_are_read_as_their_bytes(tmp_path):
    """transformers' bnb_4bit_quant_storage=bfloat16 stores the same packed bytes as a (bytes/2, 1) bfloat16
    tensor: dequantised bit-exactly like the uint8 original; a re-quantising merge keeps that storage."""
    from minilora.synthetic import write_lora_adapter

    folder, tensors = nf4_copy(tmp_path)
    packed = [k for k in tensors if f"{k}.quant_state.bitsandbytes__nf4" in tensors]
    for key in packed:
        tensors[key] = tensors[key].reshape(-1).view(ml_dtypes.bfloat16).reshape(-1, 1)
    save_file(tensors, folder / "model.safetensors")
    code, _, err = run("dequantize", folder, "-o", tmp_path / "dq")
    assert code == 0, err
    ours = load_file(tmp_path / "dq" / "model.safetensors")
    expected = load_file(os.path.join(DATA, "bnb-nf4-dq-dequantized.safetensors"))
    assert len(packed) == 14 and all(bits(ours[k]).tobytes() == bits(v).tobytes() for k, v in expected.items())

    config = json.loads(open(os.path.join(LLAMA, "config.json")).read())
    write_lora_adapter(tmp_path / "ad", config, targets=("q_proj",))
    code, _, err = run("merge", folder, tmp_path / "ad", "-o", tmp_path / "m", "--requantize")
    assert code == 0, err
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert merged[KEY].dtype == ml_dtypes.bfloat16 and merged[KEY].shape == tensors[KEY].shape
    assert merged[KEY].tobytes() != tensors[KEY].tobytes()                           # re-quantised


def test_diff_compares_a_4bit_conv1d_weight_in_the_float_model_layout(tmp_path):
    """`minilora diff` of a quantised GPT-2 against its float original: the 4-bit (N, K) Conv1D weights are
    compared as (K, N), within half an NF4 step of absmax, not reported as "shapes differ"."""
    gpt2(tmp_path / "gpt2")
    assert run("quantize", tmp_path / "gpt2", "-o", tmp_path / "q")[0] == 0
    code, out, err = run("diff", tmp_path / "q", tmp_path / "gpt2", "--atol", "0.05", "--json")
    rows = {r["name"]: r for r in json.loads(out)["tensors"]}
    for key in CONV1D:
        assert "problem" not in rows[key] and rows[key]["within"], rows[key]
        assert rows[key]["shape"][0] == rows[key]["shape"][1] == list(load_file(tmp_path / "gpt2" / "model.safetensors")[key].shape)


def test_scalar_tensors_keep_their_shape_and_compute_dtype_is_transformers_default(tmp_path):
    """A 0-d tensor (CLIP's logit_scale) stays 0-d through quantize, dequantize and an NF4 merge; the
    quantization_config asks for float32 compute unless told otherwise (BitsAndBytesConfig's default)."""
    p = "model.layers.0."
    folder = write_model(tmp_path / "m", {"model_type": "llama", "torch_dtype": "bfloat16"}, {
        "logit_scale": np.array(2.5, np.float32),
        p + "mlp.up_proj.weight": np.ones((64, 64), ml_dtypes.bfloat16)})
    assert run("quantize", folder, "-o", tmp_path / "q")[0] == 0
    assert load_file(tmp_path / "q" / "model.safetensors")["logit_scale"].shape == ()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][
        "bnb_4bit_compute_dtype"] == "float32"
    assert run("dequantize", tmp_path / "q", "-o", tmp_path / "dq")[0] == 0
    assert load_file(tmp_path / "dq" / "model.safetensors")["logit_scale"].shape == ()
    assert run("quantize", folder, "-o", tmp_path / "q2", "--compute-dtype", "bfloat16")[0] == 0
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["quantization_config"][
        "bnb_4bit_compute_dtype"] == "bfloat16"


def test_falcon_layers_and_tied_whisper_output_follow_transformers(tmp_path):
    """Falcon's layers subclass nn.Linear, which transformers does not convert: nothing to quantise. Whisper's
    proj_out (tied, absent from the file) must be in llm_int8_skip_modules."""
    falcon = write_model(tmp_path / "falcon", {"model_type": "falcon"}, {
        "transformer.h.0.self_attention.query_key_value.weight": np.ones((3 * D, D), np.float32),
        "transformer.h.0.mlp.dense_h_to_4h.weight": np.ones((4 * D, D), np.float32)})
    error(["quantize", falcon, "-o", tmp_path / "x"], "no Linear weights to quantise")
    error(["quantize", falcon, "-o", tmp_path / "x", "--include", "*"], "subclass of nn.Linear")
    whisper = write_model(tmp_path / "whisper", {"model_type": "whisper"}, {
        "model.decoder.embed_tokens.weight": np.ones((V, D), np.float32),
        "model.decoder.layers.0.self_attn.q_proj.weight": np.ones((D, D), np.float32)})
    assert run("quantize", whisper, "-o", tmp_path / "qw")[0] == 0
    assert "proj_out" in skipped_modules(tmp_path / "qw")


def test_requantize_merges_an_adapter_that_also_touches_float_modules(tmp_path):
    """--requantize: 4-bit weights are re-quantised, a float module the adapter also adapts (a BERT pooler, a
    T5 wo) is merged in its own dtype, as PEFT's merge does."""
    p = "model.layers.0."
    rng = np.random.default_rng(3)
    folder = write_model(tmp_path / "m", {"model_type": "llama"}, {
        p + "mlp.up_proj.weight": rng.standard_normal((64, 64)).astype(np.float32),
        "pooler.dense.weight": rng.standard_normal((64, 64)).astype(np.float32)})
    assert run("quantize", folder, "-o", tmp_path / "q")[0] == 0
    from minilora.checkpoint import LoraModule, save_adapter
    mods = [LoraModule(n, A=rng.standard_normal((4, 64)).astype(np.float32),
                       B=rng.standard_normal((64, 4)).astype(np.float32)) for n in (p + "mlp.up_proj", "pooler.dense")]
    save_adapter(tmp_path / "ad", {"peft_type": "LORA", "r": 4, "lora_alpha": 8}, mods)
    code, _, err = run("merge", tmp_path / "q", tmp_path / "ad", "-o", tmp_path / "rq", "--requantize")
    assert code == 0, err
    out = load_file(tmp_path / "rq" / "model.safetensors")
    want = lora.merge_weight(load_file(folder / "model.safetensors")["pooler.dense.weight"], mods[1].A, mods[1].B, 2.0)
    assert out["pooler.dense.weight"].tobytes() == want.tobytes()
    assert run("dequantize", tmp_path / "q", "-o", tmp_path / "dq")[0] == 0      # the 4-bit weight: re-quantised
    W = load_file(tmp_path / "dq" / "model.safetensors")[p + "mlp.up_proj.weight"]
    again = nf4.quantize(lora.merge_weight(W, mods[0].A, mods[0].B, 2.0), 64, True)
    assert out[p + "mlp.up_proj.weight"].tobytes() == again.packed.tobytes()


def test_gpt_neox_embed_in_is_an_embedding_and_embed_out_loads_as_lm_head(tmp_path):
    """`--include '*'` quantised GPT-NeoX's embed_in (an nn.Embedding); `--include embed_out` left `lm_head`
    in llm_int8_skip_modules, the name transformers 5 loads embed_out under: both folders failed to load."""
    from minilora.safetensors_write import save_file as save

    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "neox")
    save({"gpt_neox.embed_in.weight": rng.standard_normal((256, 64), dtype=np.float32),
          "gpt_neox.layers.0.attention.dense.weight": rng.standard_normal((64, 64), dtype=np.float32),
          "embed_out.weight": rng.standard_normal((256, 64), dtype=np.float32)}, tmp_path / "neox" / "model.safetensors")
    (tmp_path / "neox" / "config.json").write_text(json.dumps({"model_type": "gpt_neox",
                                                                 "architectures": ["GPTNeoXForCausalLM"]}))
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "neox"), "-o", str(tmp_path / "all"), "--include", "*"])
    assert r.exit_code == 2 and "gpt_neox.embed_in, an embedding" in r.stderr, r.stderr
    r = CliRunner().invoke(cli, ["quantize", str(tmp_path / "neox"), "-o", str(tmp_path / "eo"), "--include",
                                 "embed_out", "-q"])
    assert r.exit_code == 0, r.stderr
    skip = json.loads((tmp_path / "eo" / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "lm_head" not in skip and "gpt_neox.embed_in" in skip and "gpt_neox.layers.0.attention.dense" in skip
