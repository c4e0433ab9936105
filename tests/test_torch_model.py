"""The torch Llama model: logits vs transformers (known answers), loading, LoRA targets, PEFT export, generation.

Known answers (tests/data/llama_logits/, made by tests/data/make_llama_logits.py with transformers; this file
never imports transformers except in the PEFT test, which skips without peft):
* float64 ("structure"): our model and transformers run the same formula on the same float64 weights. Both
  keep transformers' float32 steps (RoPE tables, RMSNorm statistics), so two correct implementations may
  differ by a float32 rounding there (u = 2^-24 relative), amplified by the network; any structural
  difference (RoPE layout or scaling, GQA grouping, norm weight, eps, tying) is ≥ 1e-3 here. Tolerance:
  16·u·max|logit| ≈ 1e-6·max|logit|.
* the checkpoint's dtype (float32, bfloat16): our logits must be no further from the float64 reference
  than twice transformers' own rounding error in that dtype.
"""
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from minilora import nf4 as ref_nf4  # noqa: E402
from minilora.checkpoint import Checkpoint, load_adapter  # noqa: E402
from minilora.errors import InputError  # noqa: E402
from minilora.nf4_checkpoint import quantization_config, state_tensors  # noqa: E402
from minilora.safetensors_io import load_file  # noqa: E402
from minilora.safetensors_write import save_file  # noqa: E402
from minilora.synthetic import llama_config, write_llama_checkpoint  # noqa: E402
from minilora.torch_backend import (  # noqa: E402
    NF4Linear, QLoraLinear, apply_lora, export_adapter, generate, load_adapter_into, load_llama,
    lora_layers, quantize_model,
)
from minilora.torch_backend import lora as tlora  # noqa: E402
from minilora.torch_backend.model import KVCache, RMSNorm  # noqa: E402

U32 = 2.0**-24
FOLDERS = {"llama-fp32": torch.float32, "llama-bf16": torch.bfloat16}


@pytest.fixture(scope="module")
def known(data_dir):
    return data_dir / "llama_logits", load_file(data_dir / "llama_logits" / "expected.safetensors")


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).to(torch.float64).numpy()


# ---------------------------------------------------------------- known answers from transformers
@pytest.mark.parametrize("name", FOLDERS)
def test_logits_match_transformers(known, name):
    folder, exp = known
    ids = exp["ids"]  # (2, 12)
    ref64 = exp[f"{name}.logits64"]  # (2, 12, 128) transformers, float64 weights
    out64 = logits_of(load_llama(folder / name, dtype=torch.float64), ids)
    assert np.abs(out64 - ref64).max() <= 16 * U32 * np.abs(ref64).max()
    model = load_llama(folder / name)
    assert model.model.embed_tokens.weight.dtype == FOLDERS[name]
    out = logits_of(model, ids)
    tf_err = np.abs(exp[f"{name}.logits"] - ref64).max()  # transformers' own rounding error
    assert np.abs(out - ref64).max() <= 2 * tf_err
    assert np.abs(out - exp[f"{name}.logits"]).max() <= 2 * tf_err


def test_known_answer_folders_cover_both_config_layouts(known):
    folder, _ = known
    fp32 = json.loads((folder / "llama-fp32" / "config.json").read_text())
    bf16 = json.loads((folder / "llama-bf16" / "config.json").read_text())
    assert "rope_parameters" in fp32 and "rope_theta" not in fp32 and fp32["transformers_version"].startswith("5.")
    assert bf16["rope_scaling"]["rope_type"] == "llama3" and bf16["tie_word_embeddings"] and "torch_dtype" in bf16
    assert (folder / "llama-bf16" / "model.safetensors.index.json").exists()
    versions = json.loads((folder / "versions.json").read_text())
    assert versions["transformers"] and versions["attn_implementation"] == "sdpa"


def test_float16_and_sharded_float32_folders_load_exactly(tmp_path):
    for dtype, shard in (("float16", None), ("float32", 20000)):
        cfg = llama_config(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, vocab=64, dtype=dtype)
        folder = write_llama_checkpoint(tmp_path / dtype, cfg, seed=3, max_shard_bytes=shard)
        model = load_llama(folder)
        with Checkpoint(folder) as ckpt:
            for key in ckpt.keys():
                np.testing.assert_array_equal(model.get_parameter(key).numpy(), ckpt.get(key))
        assert np.isfinite(logits_of(model, [[1, 2, 3]])).all()


def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes", [
    dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    dict(model_type="mistral", architectures=["MistralForCausalLM"]),
    dict(architectures=["LlamaForSequenceClassification"]),
])
def test_unsupported_architectures_are_refused_naming_the_supported_one(known, tmp_path, changes):
    folder = _edit_config(known[0] / "llama-fp32", tmp_path / "m", **changes)
    with pytest.raises(InputError, match=r"not supported; supported: llama \(LlamaForCausalLM\)"):
        load_llama(folder)


def test_unknown_rope_type_and_bad_tensors_are_refused(known, tmp_path):
    folder = _edit_config(known[0] / "llama-fp32", tmp_path / "yarn", rope_parameters={"rope_type": "yarn"})
    with pytest.raises(InputError, match="rope type 'yarn'"):
        load_llama(folder)
    folder = _edit_config(known[0] / "llama-fp32", tmp_path / "wide", intermediate_size=65)
    with pytest.raises(InputError, match="does not fit the config"):
        load_llama(folder)
    cfg = llama_config(hidden=32, intermediate=64, layers=1, heads=4, kv_heads=2, vocab=64, dtype="float32")
    folder = write_llama_checkpoint(tmp_path / "missing", cfg)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(InputError, match="missing"):
        load_llama(folder)


# ---------------------------------------------------------------- LoRA on the model
def test_apply_lora_targets_and_trainable_parameters(known):
    model = load_llama(known[0] / "llama-fp32")
    ids = known[1]["ids"]
    before = logits_of(model, ids)
    params = apply_lora(model, r=4, alpha=8, seed=0)
    layers = lora_layers(model)
    assert len(layers) == 2 * 7 and "model.layers.1.mlp.down_proj" in layers
    assert all(p.requires_grad for p in params) and sum(p.numel() for p in params) == sum(
        4 * (m.in_features + m.out_features) for m in layers.values())
    assert sum(p.requires_grad for p in model.parameters()) == len(params) == 28
    np.testing.assert_array_equal(logits_of(model, ids), before)  # B = 0: the adapter starts as the identity

    attn = load_llama(known[0] / "llama-fp32")
    apply_lora(attn, targets="attn,down")
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_layers(attn)}) == ["down_proj", "k_proj", "o_proj",
                                                                         "q_proj", "v_proj"]
    with pytest.raises(ValueError, match="available: q_proj, k_proj"):
        apply_lora(load_llama(known[0] / "llama-fp32"), targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(attn)


def _trained(model, seed=0):
    """Give every adapter non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.2, generator=g)
            if layer.lora_magnitude is not None:
                layer.lora_magnitude.mul_(1 + 0.1 * torch.randn(layer.lora_magnitude.shape, generator=g))
    return model


@pytest.mark.parametrize("variant", [dict(), dict(use_rslora=True, targets="attn"), dict(use_dora=True)])
def test_export_writes_peft_keys_and_reloads_exactly(known, tmp_path, variant):
    folder, exp = known
    model = _trained(load_llama(folder / "llama-fp32"))
    targets = variant.pop("targets", None)
    apply_lora(model, targets=targets, r=4, alpha=8, seed=1, **variant)
    model = _trained(model)
    export_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == ("LORA", "CAUSAL_LM",
                                                                                              4, 8, "none")
    assert cfg["fan_in_fan_out"] is False and cfg["use_rslora"] == variant.get("use_rslora", False)
    assert cfg["use_dora"] == variant.get("use_dora", False) and cfg["base_model_name_or_path"] == "tiny-llama"
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert all(v.dtype == np.float32 for v in keys.values())
    assert ("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector" in keys) == bool(
        variant.get("use_dora"))
    assert load_adapter(tmp_path / "adapter").modules.keys() == lora_layers(model).keys()
    again = load_llama(folder / "llama-fp32")
    load_adapter_into(again, tmp_path / "adapter")
    np.testing.assert_array_equal(logits_of(again, exp["ids"]), logits_of(model, exp["ids"]))


@pytest.mark.parametrize("variant", [dict(), dict(use_rslora=True), dict(use_dora=True)])
def test_peft_loads_the_exported_adapter_with_the_same_logits(known, tmp_path, variant):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from peft import PeftModel
    folder, exp = known
    ours = load_llama(folder / "llama-fp32", dtype=torch.float64)
    apply_lora(ours, r=4, alpha=8, seed=2, **variant)
    ours = _trained(ours)
    export_adapter(ours, tmp_path / "adapter")
    ours.double()  # PEFT runs a float64 base's adapter in float64; the exported values are float32 either way
    with torch.no_grad():
        for layer in lora_layers(ours).values():
            for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
                if p is not None:
                    p.copy_(p.float().double())
    base = transformers.LlamaForCausalLM.from_pretrained(folder / "llama-fp32", dtype=torch.float64,
                                                         attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        ref = peft_model(torch.as_tensor(exp["ids"])).logits.numpy()
    out = logits_of(ours, exp["ids"])
    assert np.abs(out - ref).max() <= 16 * U32 * np.abs(ref).max()  # the module docstring's float64 tolerance
    assert np.abs(out - exp["llama-fp32.logits64"]).max() > 1e-3  # the adapter does change the logits


# ---------------------------------------------------------------- RMSNorm's hand-written backward
def gamma(k):
    return k * U32 / (1 - k * U32)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), D=st.integers(1, 96), log_scale=st.integers(-8, 8), seed=st.integers(0, 2**31 - 1),
       train_weight=st.booleans())
def test_rmsnorm_function_forward_is_the_plain_one_and_gradients_are_within_the_bound(rows, D, log_scale, seed,
                                                                                       train_weight):
    """Forward: bit for bit the plain statements. Backward against float64 autograd of the same formula. Bound
    (u = 2⁻²⁴, γ_k = k·u/(1 − k·u)): r = 1/√(mean(x²) + eps) in float32 carries a relative error ε_r ≤ γ_{D+4}
    (D squares and a D-sum: γ_D on the mean, halved by the square root; the division, + eps, sqrt and 1/·: 4u);
    ∂L/∂x_j = r·g_j w_j − x_j·(r³/D)·Σ g w x, where the products g w, the final multiply-add and the division add
    ≤ 3u to the first term, and the float32 dot adds γ_{D+1}, r³ 3ε_r + 2u and the scalings 3u to the second:
    |err_j| ≤ 4·γ_{D+8}·(r·|g_j w_j| + |x_j|·(r³/D)·Σ|g w x|). ∂L/∂w_j = Σ_rows g_j x_j r: γ_{rows+2} + ε_r relative
    to Σ_rows |g_j x_j r|."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, D)) * 2.0**log_scale).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    g = rng.standard_normal((rows, D)).astype(np.float32)
    eps = 1e-6
    norm = RMSNorm(D, eps)
    norm.weight.data = torch.from_numpy(w)
    norm.weight.requires_grad_(train_weight)
    xt = torch.from_numpy(x).requires_grad_(True)
    y = norm(xt)
    assert y.grad_fn is not None and "RMSNormFunction" in type(y.grad_fn).__name__
    plain = norm.weight * (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps))
    assert torch.equal(y, plain)
    grads = torch.autograd.grad(y, [xt, norm.weight] if train_weight else [xt], torch.from_numpy(g))

    x64, w64, g64 = (torch.from_numpy(a).double() for a in (x, w, g))
    x64.requires_grad_(True)
    w64.requires_grad_(True)
    r64 = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    dx64, dw64 = torch.autograd.grad(w64 * (x64 * r64), [x64, w64], g64)
    r64 = r64.detach()
    gw = (g64 * w64).abs().detach()
    xd = x64.detach()
    bound_x = 4 * gamma(D + 8) * (r64 * gw + xd.abs() * r64**3 / D * (gw * xd.abs()).sum(-1, keepdim=True))
    assert bool(((grads[0].double() - dx64).abs() <= bound_x).all())
    if train_weight:
        bound_w = (gamma(rows + 2) + gamma(D + 4)) * (g64.abs() * xd.abs() * r64).sum(0)
        assert bool(((grads[1].double() - dw64).abs() <= bound_w).all())


def test_rmsnorm_keeps_the_plain_path_for_other_dtypes():
    norm = RMSNorm(8, 1e-6, dtype=torch.bfloat16)
    y = norm(torch.ones(2, 8, dtype=torch.bfloat16, requires_grad=True))
    assert "RMSNormFunction" not in type(y.grad_fn).__name__


# ---------------------------------------------------------------- the training fast paths on the whole model
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_training_step_equals_the_plain_autograd_step(known, monkeypatch, checkpointing):
    """The loss through ``labels=`` (fused projection + cross-entropy) with the LoRA layers and RMSNorms on their
    hand-written Functions (q/k/v and gate/up grouped) against logits + ``F.cross_entropy`` with every layer on
    plain autograd:
    the same loss and the same adapter gradients, up to float32 reassociation through the 2-layer model (a
    tolerance of 1e-5 relative to the largest value, not a derived bound), with gradient checkpointing too."""
    ids = torch.as_tensor(known[1]["ids"])
    weights = torch.ones(ids[:, 1:].shape, dtype=torch.bool)
    weights[0, :3] = False  # some targets masked out
    runs = []
    for fast in (True, False):
        model = load_llama(known[0] / "llama-fp32")
        params = apply_lora(model, r=4, alpha=8, seed=0)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.02, generator=torch.Generator().manual_seed(1))
        model.train()
        model.gradient_checkpointing = checkpointing
        if fast:
            loss = model(ids[:, :-1], labels=ids[:, 1:], label_weights=weights)
        else:
            monkeypatch.setattr(tlora.LoraLinear, "_fused_ok", lambda self, x: False)
            monkeypatch.setattr(RMSNorm, "_fused_ok", lambda self, x: False)
            ce = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(),
                                                   reduction="none")
            loss = (ce * weights.flatten()).sum()
        loss.backward()  # (checkpointing recomputes the forward here: still on the plain path)
        monkeypatch.undo()
        runs.append((float(loss.detach()), [p.grad.clone() for p in params]))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = runs
    assert abs(fast_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    scale = max(float(g.abs().max()) for g in plain_grads)
    assert scale > 0
    for a, b in zip(fast_grads, plain_grads):
        assert float((a - b).abs().max()) <= 1e-5 * scale


# ---------------------------------------------------------------- QLoRA on the model
def test_qlora_model_dequantises_like_the_reference_and_trains_only_adapters(known):
    model = load_llama(known[0] / "llama-fp32")
    W = model.model.layers[0].mlp.up_proj.weight.detach().numpy().copy()
    quantize_model(model, blocksize=64, double_quant=True)
    params = apply_lora(model, r=4, alpha=8, seed=0)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, QLoraLinear) and isinstance(layer.base, NF4Linear)
    ref_W = ref_nf4.dequantize(ref_nf4.quantize(W, 64, double_quant=True))
    np.testing.assert_array_equal(layer.base_weight().numpy().view(np.uint32), ref_W.view(np.uint32))
    model.train()
    model.gradient_checkpointing = True
    ids = torch.as_tensor(known[1]["ids"])
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bitsandbytes_layout_checkpoint_loads_as_nf4(known, tmp_path):
    src = known[0] / "llama-fp32"
    tensors = {}
    with Checkpoint(src) as ckpt:
        for key in ckpt.keys():
            if ".layers." in key and key.endswith("proj.weight"):
                tensors.update(state_tensors(key, ref_nf4.quantize(ckpt.get(key), 64, double_quant=True)))
            else:
                tensors[key] = ckpt.get(key)
        cfg = dict(ckpt.config, quantization_config=quantization_config(True, "float32"))
    (tmp_path / "q").mkdir()
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    loaded = load_llama(tmp_path / "q")
    assert isinstance(loaded.model.layers[1].self_attn.k_proj, NF4Linear)
    quantized_here = quantize_model(load_llama(src), blocksize=64, double_quant=True)
    ids = known[1]["ids"]
    np.testing.assert_array_equal(logits_of(loaded, ids), logits_of(quantized_here, ids))


# ---------------------------------------------------------------- generation
def test_generate_with_cache_equals_recomputing_everything(known):
    model = _trained(load_llama(known[0] / "llama-fp32", dtype=torch.float64))
    ids = torch.as_tensor(known[1]["ids"][:, :5])  # (2, 5)
    out = generate(model, ids, max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
    seq = ids
    for _ in range(6):  # no cache: the whole sequence each step
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = generate(model, ids, 6, temperature=0.8, top_k=5, generator=g1)
    assert torch.equal(a, generate(model, ids, 6, temperature=0.8, top_k=5, generator=g2))
    assert torch.equal(generate(model, ids, 6, temperature=1.0, top_k=1), out)  # top-1 sampling is greedy
    with pytest.raises(ValueError):
        generate(model, ids, -1)


def test_chunked_prefill_with_cache_matches_one_pass(known):
    model = load_llama(known[0] / "llama-bf16", dtype=torch.float64)
    ids = torch.as_tensor(known[1]["ids"])  # (2, 12)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.num_hidden_layers)
        parts = torch.cat([model(ids[:, :5], cache), model(ids[:, 5:9], cache), model(ids[:, 9:], cache)], dim=1)
    assert len(cache) == 12
    assert (parts - full).abs().max() <= 16 * U32 * full.abs().max()


def test_missing_torch_gives_the_install_command():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "import minilora\n"
            "try:\n    import minilora.torch_backend\nexcept ImportError as e:\n    print(e)\n")
    import tempfile
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tempfile.gettempdir())  # the installed package, not the source tree
    assert "pip install torch==2.13.0" in out.stdout, out.stderr
