"""Put LoRA / QLoRA on a model's Linear layers by target names, and move adapters in and out as PEFT folders.

Target names are the Linear layers of the decoder blocks, by their checkpoint names (``q_proj`` ...
``down_proj``) or shorthands (``q``, ``attn``, ``mlp``, ``all``). A layer named ``model.layers.0.self_attn.q_proj``
in the model is the PEFT module ``base_model.model.model.layers.0.self_attn.q_proj``; the file keys are
built by ``minilora.checkpoint`` (the only module that knows key strings). Per-module rank / alpha follow
PEFT's ``rank_pattern`` / ``alpha_pattern`` rule (``minilora.lora.module_rank_alpha``).

Not here: Embedding LoRA, ``lora_bias``, ``modules_to_save``, regex ``target_modules`` (imported adapters
are placed by the module names their tensors carry), the training loop.
"""
import collections

import numpy as np
import torch
from torch import nn

from minilora.checkpoint import LoraModule, load_adapter, save_adapter
from minilora.errors import InputError
from minilora.lora import module_rank_alpha
from minilora.tables import DEFAULT_BLOCKSIZE
from minilora.torch_backend.lora import LoraLinear
from minilora.torch_backend.qlora import NF4Linear, QLoraLinear

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SHORTHANDS = {
    "q": ("q_proj",), "k": ("k_proj",), "v": ("v_proj",), "o": ("o_proj",),
    "gate": ("gate_proj",), "up": ("up_proj",), "down": ("down_proj",),
    "attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj"),
    "all": BLOCK_LINEARS,
}


def resolve_targets(targets=None):
    """Target names (a list, or a comma-separated string; None = all) -> sorted tuple of layer names."""
    if targets is None:
        return BLOCK_LINEARS
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = set()
    for t in targets:
        if t in BLOCK_LINEARS:
            out.add(t)
        elif t in TARGET_SHORTHANDS:
            out.update(TARGET_SHORTHANDS[t])
        else:
            raise ValueError(f"unknown LoRA target {t!r}; available: {', '.join(BLOCK_LINEARS)} "
                             f"or shorthands {', '.join(TARGET_SHORTHANDS)}")
    if not out:
        raise ValueError("no LoRA targets given")
    return tuple(n for n in BLOCK_LINEARS if n in out)


def _block_linears(model, names):
    """``{module name: module}`` of the plain / NF4 Linear layers of the blocks whose last name is in ``names``."""
    return {n: m for n, m in model.named_modules()
            if ".layers." in f".{n}" and n.rsplit(".", 1)[-1] in names and isinstance(m, (nn.Linear, NF4Linear))}


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def lora_layers(model):
    """``{module name: LoraLinear}`` of every adapted layer, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _wrap(model, modules, r, alpha, dropout, use_rslora, use_dora, init, seed, rank_pattern, alpha_pattern):
    model.requires_grad_(False)
    generator = None
    for name, base in modules.items():
        if generator is None and seed is not None:
            device = next(iter(base.buffers() if isinstance(base, NF4Linear) else base.parameters())).device
            generator = torch.Generator(device).manual_seed(seed)
        r_m, alpha_m = module_rank_alpha(name, r, alpha, rank_pattern, alpha_pattern)
        cls = QLoraLinear if isinstance(base, NF4Linear) else LoraLinear
        _replace(model, name, cls(base, r=r_m, alpha=alpha_m, dropout=dropout, use_rslora=use_rslora,
                                  use_dora=use_dora, init=init, generator=generator))
    return [p for p in model.parameters() if p.requires_grad]


def apply_lora(model, targets=None, r=8, alpha=16, dropout=0.0, use_rslora=False, use_dora=False,
               init="kaiming", seed=None, rank_pattern=None, alpha_pattern=None):
    """Freeze ``model`` and wrap its target Linear layers in ``LoraLinear`` (``NF4Linear`` ones in
    ``QLoraLinear``); returns the trainable parameters (the adapters', nothing else)."""
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; apply_lora once per model")
    modules = _block_linears(model, resolve_targets(targets))
    if not modules:
        raise ValueError(f"no Linear layer of the model matches the targets {targets!r}")
    return _wrap(model, modules, r, alpha, dropout, use_rslora, use_dora, init, seed, rank_pattern, alpha_pattern)


def quantize_model(model, targets=None, blocksize=DEFAULT_BLOCKSIZE, double_quant=True, compute_dtype=None):
    """Replace the target ``nn.Linear`` layers of the blocks with frozen ``NF4Linear`` (QLoRA's base);
    lm_head, embeddings and norms keep their dtype. Returns ``model``."""
    for name, linear in _block_linears(model, resolve_targets(targets)).items():
        if isinstance(linear, nn.Linear):
            _replace(model, name, NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype))
    return model


def _numpy(t):
    return t.detach().to(torch.float32).cpu().numpy()


def export_adapter(model, folder, base_model_name_or_path=None):
    """Write the model's adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that ``PeftModel.from_pretrained(LlamaForCausalLM, folder)`` loads. Tensors are float32."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to export")
    first = next(iter(layers.values()))
    for name, layer in layers.items():
        if (layer.use_rslora, layer.use_dora) != (first.use_rslora, first.use_dora):
            raise ValueError(f"{name}: layers disagree on use_rslora / use_dora; PEFT needs one setting")
    r = collections.Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = collections.Counter(m.alpha for m in layers.values()).most_common(1)[0][0]
    modules = [LoraModule(name, A=_numpy(m.lora_A), B=_numpy(m.lora_B),
                          magnitude=None if m.lora_magnitude is None else _numpy(m.lora_magnitude))
               for name, m in layers.items()]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "lora_dropout": float(getattr(first.dropout, "p", 0.0)), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": first.use_rslora, "use_dora": first.use_dora,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.alpha for n, m in layers.items() if m.alpha != alpha},
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    save_adapter(folder, config, modules)
    return folder


def load_adapter_into(model, folder, dropout=None):
    """Wrap the layers a PEFT adapter folder adapts and copy its tensors in; returns the trainable parameters.

    The layers are found from the module names of the adapter's tensors; Embedding LoRA, ``lora_bias``
    and ``modules_to_save`` are refused with ``InputError``.
    """
    adapter = load_adapter(folder)
    cfg = adapter.config
    if adapter.full_tensors or any(m.kind != "linear" or m.bias is not None for m in adapter.modules.values()):
        raise InputError("Embedding LoRA, lora_bias and modules_to_save are not supported here", adapter.path)
    linears = _block_linears(model, BLOCK_LINEARS)
    unknown = sorted(set(adapter.modules) - set(linears))
    if unknown:
        raise InputError("adapter module is not a Linear layer of this model's blocks", adapter.path, unknown[0])
    if cfg.get("fan_in_fan_out"):
        raise InputError("fan_in_fan_out adapters are for Conv1D models, not Llama", adapter.path)
    params = _wrap(model, {n: linears[n] for n in adapter.modules}, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                   cfg.get("lora_dropout", 0.0) if dropout is None else dropout, bool(cfg.get("use_rslora")),
                   bool(cfg.get("use_dora")), "kaiming", None, cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
    layers = lora_layers(model)
    with torch.no_grad():
        for name, m in adapter.modules.items():
            layer = layers[name]
            for param, value in ((layer.lora_A, m.A), (layer.lora_B, m.B), (layer.lora_magnitude, m.magnitude)):
                if (param is None) != (value is None):
                    raise InputError("use_dora and the lora_magnitude_vector tensors disagree", adapter.path, name)
                if param is None:
                    continue
                if tuple(param.shape) != tuple(np.shape(value)):
                    raise InputError(f"adapter tensor {np.shape(value)} does not fit the layer, which needs "
                                     f"{tuple(param.shape)} (r and rank_pattern from the config)", adapter.path, name)
                param.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))
    return params
