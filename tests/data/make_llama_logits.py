"""Generate tests/data/llama_logits/: two tiny seeded Llama folders and transformers' logits on them.

Run from the repository root with transformers installed (the tests themselves never import it):

    python tests/data/make_llama_logits.py

Folders (random weights, std 0.1, RMSNorm weights 1 + 0.1·N(0, 1) so that a missing norm weight shows):
  llama-fp32/  float32, untied, single file, ``config.json`` written by transformers 5.x ``save_pretrained``
               (``rope_parameters``, ``dtype``), default RoPE.
  llama-bf16/  bfloat16, tied embeddings, sharded (3 shards + index), a ``config.json`` in the transformers
               4.x layout (``rope_theta``, ``rope_scaling``, ``torch_dtype``), Llama-3.1 ("llama3") RoPE scaling.
Both: hidden 32, intermediate 64, 2 layers, 4 heads, 2 KV heads (grouped-query attention), vocab 128.

``expected.safetensors`` holds ``ids`` (2, 12) int64 and per folder ``<name>.logits64`` (transformers with
the weights upcast to float64: the reference values) and ``<name>.logits`` (transformers in the folder's
own dtype, stored as float32, exact for bf16). ``versions.json`` records the versions and settings used.
"""
import json
import os
import platform
import sys

import numpy as np
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from minilora.safetensors_write import save_file  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_logits")
SEED = 1234
ATTN = "sdpa"
SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def seeded_state(model, rng):
    """Random weights for every tensor of ``model`` (numpy RNG, so independent of torch's)."""
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(tuple(p.shape))
        else:
            value = 0.1 * rng.standard_normal(tuple(p.shape))
        state[name] = torch.from_numpy(value.astype(np.float32))
    return state


def config_4x(cfg_dict):
    """The config.json fields transformers 4.x (4.46) writes for LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 1, "eos_token_id": 2, "head_dim": cfg_dict["head_dim"], "hidden_act": "silu",
        "hidden_size": cfg_dict["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": cfg_dict["intermediate_size"],
        "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": cfg_dict["num_attention_heads"],
        "num_hidden_layers": cfg_dict["num_hidden_layers"], "num_key_value_heads": cfg_dict["num_key_value_heads"],
        "pretraining_tp": 1, "rms_norm_eps": cfg_dict["rms_norm_eps"], "rope_scaling": dict(LLAMA3_ROPE),
        "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.0", "use_cache": True, "vocab_size": cfg_dict["vocab_size"],
    }


def logits(folder, dtype, ids):
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=ATTN).eval()
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.to(torch.float32 if dtype != torch.float64 else dtype).numpy()


def main():
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    os.makedirs(OUT, exist_ok=True)
    ids = rng.integers(0, SIZES["vocab_size"], size=(2, 12)).astype(np.int64)  # (B, T)
    tensors = {"ids": ids}

    # llama-fp32: transformers 5.x writes config.json
    cfg = LlamaConfig(**SIZES, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(seeded_state(model, rng))
    model.save_pretrained(os.path.join(OUT, "llama-fp32"), safe_serialization=True)

    # llama-bf16: tied, sharded, transformers 4.x config.json with llama3 RoPE scaling
    cfg = LlamaConfig(**SIZES, max_position_embeddings=131072, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE},
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    state = seeded_state(model, rng)
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state)
    folder = os.path.join(OUT, "llama-bf16")
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size="12KB")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_4x(SIZES), f, indent=2, sort_keys=True)
        f.write("\n")
    for extra in ("generation_config.json",):
        path = os.path.join(folder, extra)
        if os.path.exists(path):
            os.remove(path)

    for name, dtype in (("llama-fp32", torch.float32), ("llama-bf16", torch.bfloat16)):
        folder = os.path.join(OUT, name)
        tensors[f"{name}.logits64"] = logits(folder, torch.float64, ids)  # (B, T, V)
        tensors[f"{name}.logits"] = logits(folder, dtype, ids)  # (B, T, V) float32 image
    save_file(tensors, os.path.join(OUT, "expected.safetensors"))
    versions = {"transformers": transformers.__version__, "torch": torch.__version__, "numpy": np.__version__,
                "python": platform.python_version(), "machine": platform.machine(), "seed": SEED,
                "attn_implementation": ATTN, "torch_threads": torch.get_num_threads(),
                "generator": "tests/data/make_llama_logits.py"}
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
