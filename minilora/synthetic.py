"""Seeded synthetic checkpoints laid out like real Hugging Face Llama models, and PEFT adapters for
them: for the demo, the tests and the benchmarks, with no network and no hub.

The keys, ``config.json`` fields and shard index are those ``transformers`` writes for
``LlamaForCausalLM``; weights are random (normal, std 0.02, norms 1). Files are written tensor by
tensor, so a multi-GB checkpoint needs memory for one tensor only.
"""
import os

import numpy as np

from minilora.checkpoint import INDEX_NAME, LoraModule, save_adapter, write_json
from minilora.dtypes import dtype_from_name
from minilora.safetensors_write import SafetensorsWriter

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=256,
                 dtype="bfloat16", tie_word_embeddings=False):
    """A ``config.json`` dict as transformers writes it for a Llama model of these sizes."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": dtype,
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02,
    }


def llama_tensors(config):
    """``[(name, shape)]`` of a Llama checkpoint in the order transformers lists them."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (q, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, q)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i))]
    out.append(("model.norm.weight", (h,)))
    if not config.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, h)))
    return out


def _value(rng, name, shape, dtype):
    if name.endswith("norm.weight"):
        return np.ones(shape, dtype=dtype)
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(dtype)  # shape


def write_llama_checkpoint(folder, config, seed=0, max_shard_bytes=None):
    """Write ``config.json`` and ``model.safetensors`` (or shards + index when the weights exceed
    ``max_shard_bytes``) into ``folder``. Returns the folder."""
    os.makedirs(folder, exist_ok=True)
    dtype = dtype_from_name(config.get("torch_dtype", "float32"))
    tensors = llama_tensors(config)
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    rng = np.random.default_rng(seed)
    names = ([f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    for file, shard in zip(names, shards):
        with SafetensorsWriter(os.path.join(folder, file), [(n, dtype, s) for n, s in shard],
                               {"format": "pt"}) as w:
            for name, shape in shard:
                w.write(name, _value(rng, name, shape, dtype))
    if len(shards) > 1:
        total = sum(int(np.prod(s)) * dtype.itemsize for _, s in tensors)
        write_json(os.path.join(folder, INDEX_NAME), {
            "metadata": {"total_size": total},
            "weight_map": {n: f for f, shard in zip(names, shards) for n, _ in shard}})
    write_json(os.path.join(folder, "config.json"), config)
    return folder


def lora_modules(config, targets=LINEAR_TARGETS):
    """``[(module name, N, K)]`` of the Linear layers an adapter with these targets adapts."""
    shapes = dict(llama_tensors(config))
    out = []
    for name, shape in llama_tensors(config):
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in targets and len(shape) == 2 and "embed" not in name:
            out.append((module, *shapes[name]))
    return out


def write_lora_adapter(folder, config, rank=8, alpha=16, targets=LINEAR_TARGETS, seed=1,
                       use_rslora=False, use_dora=False, std=0.02):
    """A PEFT adapter folder for a ``llama_config`` model with random, non-zero A and B."""
    rng = np.random.default_rng(seed)
    modules = []
    for name, N, K in lora_modules(config, targets):
        A = rng.standard_normal((rank, K), dtype=np.float32) * np.float32(std)  # (R, K)
        B = rng.standard_normal((N, rank), dtype=np.float32) * np.float32(std)  # (N, R)
        m = LoraModule(name, A=A, B=B)
        if use_dora:
            m.magnitude = (1.0 + 0.1 * rng.standard_normal(N)).astype(np.float32)  # (N,)
        modules.append(m)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
        "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": use_rslora, "use_dora": use_dora,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "init_lora_weights": True, "base_model_name_or_path": None,
    }
    save_adapter(folder, adapter_config, modules)
    return folder
