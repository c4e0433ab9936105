"""Make tests/data/peft/: layer-level known answers recorded from real PEFT LoRA layers.

Run from the repository root with torch, transformers and peft installed (development only):

    python tests/data/make_peft_vectors.py

For every case a tiny torch module is wrapped with ``peft.get_peft_model``, its LoRA weights are set to
seeded random values (B non-zero, so merges change the weight), and PEFT's own answers are recorded:
the scaling, ``get_delta_weight``, the forward output and the gradients (float32 bases only), the
merge of ``merge_and_unload()``, of ``merge(safe_merge=True)`` and the weight after ``merge(); unmerge()``
for float32, bfloat16 and float16 bases. One ``<case>-<dtype>.safetensors`` per case and dtype, and one
``manifest.json`` with the configs, PEFT's per-module r / alpha / scaling, and the library versions.
Tensor names: ``<module>.<what>`` (W, bias, A, B, m, m_init, delta, x, y, g, grad_x, grad_A, grad_B,
grad_m, merged, merged_safe, unmerged, merge_norm); see tests/data/README.md.
"""
import copy
import json
import platform
import sys
from pathlib import Path

import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

OUT = Path(__file__).resolve().parent / "peft"
M_TOKENS = 5
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name -> (modules [(dotted name, kind, in, out)], LoraConfig kwargs)
CASES = {
    "lora": ([("layers.0.self_attn.q_proj", "linear", 40, 24)],
             dict(r=8, lora_alpha=16, target_modules=["q_proj"])),
    "rslora": ([("layers.0.self_attn.q_proj", "linear", 40, 24)],
               dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"])),
    "dora": ([("layers.0.mlp.down_proj", "linear", 33, 17)],
             dict(r=4, lora_alpha=8, use_dora=True, target_modules=["down_proj"])),
    "dora_fan_in_fan_out": ([("h.0.attn.c_attn", "conv1d", 40, 24)],
                            dict(r=4, lora_alpha=12, use_dora=True, fan_in_fan_out=True,
                                 target_modules=["c_attn"])),
    "patterns": ([("blocks.0.attn.q_proj", "linear", 40, 24),
                  ("blocks.0.attn.v_proj", "linear", 40, 24),
                  ("blocks.0.attn.xv_proj", "linear", 40, 24),  # "v_proj" must NOT match (dot boundary)
                  ("blocks.1.mlp.up_proj", "linear", 40, 56)],
                 dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "xv_proj", "up_proj"],
                      # first matching key wins: v_proj gets 4, not 6
                      rank_pattern={"attn.v_proj": 4, "v_proj": 6, "blocks.1.mlp.up_proj": 2},
                      alpha_pattern={"v_proj": 3, "up_proj": 7})),
    "conv1d": ([("h.0.mlp.c_fc", "conv1d", 40, 56)],
               dict(r=8, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_fc"])),
    "embedding": ([("model.embed_tokens", "embedding", 50, 16)],
                  dict(r=4, lora_alpha=8, target_modules=["embed_tokens"])),
}


def build(modules, seed):
    """A torch module with the given dotted submodules, seeded float32 weights."""
    torch.manual_seed(seed)
    root = nn.Module()
    for name, kind, k, n in modules:
        parent = root
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        if kind == "linear":
            layer = nn.Linear(k, n)
        elif kind == "conv1d":
            layer = Conv1D(n, k)  # weight (K, N), GPT-2 layout
            nn.init.normal_(layer.weight, std=0.2)
            nn.init.normal_(layer.bias, std=0.02)
        else:
            layer = nn.Embedding(k, n)  # weight (V, d)
        parent.add_module(name.split(".")[-1], layer)
    return root


def set_adapter(layer, kind, seed):
    """Seeded non-zero A and B (B random, so the adapter is not the identity)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "embedding":
        A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]  # (R, V), (d, R)
    else:
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (R, K), (N, R)
    with torch.no_grad():
        A.copy_((torch.rand(A.shape, generator=g) * 2 - 1) / A.shape[1] ** 0.5)
        B.copy_(torch.randn(B.shape, generator=g) * 0.5)
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        dora = layer.lora_magnitude_vector["default"]
        # recompute PEFT's own init of m for the A, B just set, then perturb it so that m / n != 1
        dora.update_layer(base_layer=layer.get_base_layer(), lora_A=A.detach(), lora_B=B.detach(),
                          scaling=layer.scaling["default"])
        m_init = dora.weight.detach().clone()
        with torch.no_grad():
            dora.weight.mul_(0.5 + torch.rand(dora.weight.shape, generator=g))
        return m_init
    return None


def lora_params(layer, kind):
    if kind == "embedding":
        return layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def record_case(name, modules, cfg, dtype_name, seed):
    dtype = DTYPES[dtype_name]
    base = build(modules, seed).to(dtype)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, init_lora_weights=False, **cfg))
    model.eval()
    tensors, meta = {}, {}
    for i, (mod, kind, k, n) in enumerate(modules):
        layer = model.base_model.model.get_submodule(mod)
        m_init = set_adapter(layer, kind, seed * 100 + i)  # same A, B for every dtype
        base_layer = layer.get_base_layer()
        A, B = lora_params(layer, kind)
        t = {"W": base_layer.weight, "A": A, "B": B, "delta": layer.get_delta_weight("default")}
        if getattr(base_layer, "bias", None) is not None:
            t["bias"] = base_layer.bias
        if m_init is not None:
            t["m_init"], t["m"] = m_init, layer.lora_magnitude_vector["default"].weight
        meta[mod] = {"kind": kind, "in": k, "out": n, "r": layer.r["default"],
                     "alpha": layer.lora_alpha["default"], "scaling": layer.scaling["default"]}
        if dtype_name == "float32":
            t.update(forward_and_grads(layer, kind, k, seed * 100 + i))
        for key, val in t.items():
            tensors[f"{mod}.{key}"] = val.detach().clone().contiguous()
    # merges, each on a fresh copy of the model
    merged = copy.deepcopy(model).merge_and_unload()
    safe = copy.deepcopy(model)
    for mod, *_ in modules:
        safe.base_model.model.get_submodule(mod).merge(safe_merge=True)
    round_trip = copy.deepcopy(model)
    for mod, *_ in modules:
        layer = round_trip.base_model.model.get_submodule(mod)
        layer.merge()
        norm = layer._caches.get("default-weight_norm")  # DoRA: the norm of merge time
        if norm is not None:
            tensors[f"{mod}.merge_norm"] = norm.detach().clone().reshape(-1)
        layer.unmerge()
    for mod, *_ in modules:
        tensors[f"{mod}.merged"] = merged.get_submodule(mod).weight.detach().clone()
        tensors[f"{mod}.merged_safe"] = safe.base_model.model.get_submodule(mod).get_base_layer().weight.detach().clone()
        tensors[f"{mod}.unmerged"] = round_trip.base_model.model.get_submodule(mod).get_base_layer().weight.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / f"{name}-{dtype_name}.safetensors")
    return meta


def forward_and_grads(layer, kind, k, seed):
    """PEFT's forward and backward of one layer for loss = (y * g).sum()."""
    g_ = torch.Generator().manual_seed(seed + 7)
    if kind == "embedding":
        x = torch.randint(0, k, (M_TOKENS + 2,), generator=g_)  # (M,) token ids, repeats likely
        x[-1] = x[0]
    else:
        x = torch.randn((M_TOKENS, k), generator=g_).requires_grad_(True)  # (M, K)
    params = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    y = layer(x)  # (M, N)
    g = torch.randn(y.shape, generator=g_)  # (M, N)
    (y * g).sum().backward()
    A, B = lora_params(layer, kind)
    out = {"x": x, "y": y, "g": g, "grad_A": A.grad, "grad_B": B.grad}
    if kind != "embedding":
        out["grad_x"] = x.grad
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        out["grad_m"] = layer.lora_magnitude_vector["default"].weight.grad
    return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # one deterministic accumulation order
    manifest = {
        "generated_by": "tests/data/make_peft_vectors.py",
        "versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "safetensors": safetensors.__version__,
                     "numpy": np.__version__, "python": sys.version.split()[0],
                     "machine": platform.machine(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "m_tokens": M_TOKENS, "dtypes": list(DTYPES), "cases": {},
    }
    for seed, (name, (modules, cfg)) in enumerate(CASES.items(), start=1):
        for dtype_name in DTYPES:
            meta = record_case(name, modules, cfg, dtype_name, seed)
        manifest["cases"][name] = {"config": {"lora_dropout": 0.0, "init_lora_weights": False, **cfg},
                                   "seed": seed, "modules": meta}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {len(CASES) * len(DTYPES)} files to {OUT}")


if __name__ == "__main__":
    main()
