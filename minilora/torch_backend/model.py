"""A small, readable Llama-family decoder that loads Hugging Face folders and matches
``transformers.LlamaForCausalLM`` (5.x) on them.

``h = embed(ids)``; per block ``h += attn(rmsnorm(h))``, ``h += mlp(rmsnorm(h))``; ``logits = lm_head(rmsnorm(h))``.
RMSNorm (Zhang & Sennrich 2019) computed in float32 as transformers does; RoPE (Su et al. 2021, §3.4) in the
rotate-half layout of Hugging Face checkpoints, "default" or "llama3" frequencies; grouped-query attention
(Ainslie et al. 2023) with ``scaled_dot_product_attention``; SwiGLU MLP (Shazeer 2020); tied or untied
embeddings. Module names mirror the checkpoint keys (``model.layers.0.self_attn.q_proj``), so a parameter's
name is its tensor's key and a LoRA module's name is its PEFT module path.

Reads ``config.json`` as written by transformers 4.x (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and
5.x (``rope_parameters``, ``dtype``), and single or sharded safetensors in float32 / float16 / bfloat16 via
``minilora.checkpoint``; NF4 weights in bitsandbytes' layout load as ``NF4Linear``.
Not here: other architectures (Mistral's sliding window, Qwen2's q/k/v bias, ...), padding masks,
attention dropout, ``torch.compile``.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minilora.checkpoint import Checkpoint
from minilora.errors import InputError
from minilora.nf4_checkpoint import is_aux_key, quantized_weights, read_state
from minilora.torch_backend.lora import fused_functions_allowed, grouped_forward
from minilora.torch_backend.loss import linear_cross_entropy
from minilora.torch_backend.nf4 import QuantState, numpy_to_torch
from minilora.torch_backend.qlora import NF4Linear

SUPPORTED = {"llama": "LlamaForCausalLM"}  # model_type -> architecture
ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_parameters: Optional[dict] = None  # llama3: factor, low/high_freq_factor, original_max_position_embeddings
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: Optional[str] = None

    @classmethod
    def from_dict(cls, d, path=None):
        """Parse and check a ``config.json`` dict; unsupported models raise ``InputError`` naming what is supported."""
        if not isinstance(d, dict):
            raise InputError("no config.json (or not a JSON object) in the model folder", path)
        model_type, archs = d.get("model_type"), d.get("architectures") or []
        supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED.items())
        if model_type not in SUPPORTED or any(a != SUPPORTED[model_type] for a in archs):
            raise InputError(f"model_type {model_type!r} with architectures {archs} is not supported; "
                             f"supported: {supported}", path)
        if d.get("hidden_act", "silu") != "silu":
            raise InputError(f"hidden_act {d['hidden_act']!r} is not supported; Llama uses 'silu'", path)
        rope = dict(d.get("rope_scaling") or {})  # transformers 4.x
        rope.update(d.get("rope_parameters") or {})  # transformers 5.x
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise InputError(f"rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}", path)
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise InputError("partial_rotary_factor != 1 is not supported", path)
        heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))), rope_type=rope_type,
            rope_parameters=rope if rope_type != "default" else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
            dtype=d.get("dtype") or d.get("torch_dtype"))


def rope_inv_freq(cfg):
    """RoPE inverse frequencies (head_dim/2,) float32, transcribing transformers' ``_compute_default_rope_parameters``
    and ``_compute_llama3_parameters`` (Llama 3.1 frequency scaling)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (dim/2,)
    if cfg.rope_type == "default":
        return inv_freq
    p = cfg.rope_parameters
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)  # (..., hd/2) each
    return torch.cat((-x2, x1), dim=-1)  # (..., hd)


class RMSNorm(nn.Module):
    """``w ⊙ x / √(mean(x²) + eps)``, normalised in float32 and cast back before the weight (transformers' order).

    With float32 x and weight the forward runs through ``RMSNormFunction`` (the same values, bit for bit, and a
    hand-written backward); other dtypes take these plain autograd statements."""

    def __init__(self, dim, eps, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps

    def forward(self, x):
        if self._fused_ok(x):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def _fused_ok(self, x):
        return fused_functions_allowed() and x.dtype == torch.float32 and self.weight.dtype == torch.float32


class RMSNormFunction(torch.autograd.Function):
    """``y = w ⊙ x·r`` with ``r = 1/√(mean(x²) + eps)`` per row (x (..., D) float32, w (D,)): the plain module's
    forward statements, so the same values bit for bit. The backward is written out instead of recorded:

        ∂L/∂x = r·(g⊙w) − x · (r³/D) · Σ_D (g⊙w⊙x)        ∂L/∂w = Σ_rows g⊙x·r

    (∂r/∂x_j = −r³·x_j/D). It keeps x and r (one float per row) where autograd keeps x² and the normalised x,
    and makes 4 passes over (..., D) where autograd makes about 10: on the CPU bench shape (1024 × 384) a
    forward + backward takes 1.5 instead of 3.7 ms. Checked against float64 in ``tests/test_torch_model.py``."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, r, weight)
        return weight * (x * r)  # (..., D)

    @staticmethod
    def backward(ctx, g):
        x, r, w = ctx.saved_tensors  # (..., D), (..., 1), (D,)
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * x * r).reshape(-1, x.shape[-1]).sum(0)  # (D,)
        if ctx.needs_input_grad[0]:
            gw = g * w  # (..., D)
            coef = torch.linalg.vecdot(gw, x).unsqueeze(-1).mul_(r.pow(3)).div_(-x.shape[-1])  # (..., 1)
            dx = torch.addcmul(gw.mul_(r), x, coef)  # r·gw + x·coef
        return dx, dw, None


class KVCache:
    """Keys and values of the tokens seen so far, per layer: (B, H_kv, T_past, hd) each."""

    def __init__(self, n_layers):
        self.k, self.v = [None] * n_layers, [None] * n_layers

    def length(self, layer=0):
        """Tokens cached for ``layer`` (every layer holds the same number between forward passes)."""
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    def __len__(self):
        return self.length(0)

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)  # (B, Hkv, T_all, hd)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.hd = layer, cfg.head_dim
        self.h, self.h_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        q, kv, bias = self.h * self.hd, self.h_kv * self.hd, cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, q, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv, bias=bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, cache=None):
        B, T, _ = x.shape
        past = cache.length(self.layer) if cache is not None else 0
        q, k, v = grouped_forward(x, (self.q_proj, self.k_proj, self.v_proj))  # one LoRA group when adapted
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.h_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.h_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, past + T, hd)
        mask = None
        if T > 1 and past > 0:  # a chunk after a prefix: query i sees keys 0 .. past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # (T, past+T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T > 1 and past == 0),
                                           scale=self.hd ** -0.5, enable_gqa=self.h != self.h_kv)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.h * self.hd))  # (B, T, hidden)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        gate, up = grouped_forward(x, (self.gate_proj, self.up_proj))  # (B, T, intermediate) each
        return self.down_proj(F.silu(gate) * up)  # (B, T, hidden)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    """``Llama(cfg)(ids (B, T), cache=None) -> logits (B, T, vocab)`` in the weights' dtype.

    ``gradient_checkpointing = True`` recomputes each block in backward (training only). With tied
    embeddings there is no ``lm_head`` module; the embedding matrix is the output projection.
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # (hd/2,) float32
        self.gradient_checkpointing = False

    def rope(self, positions, dtype):
        """cos, sin (T, hd) for integer ``positions (T,)``, in float32 then cast, as transformers does."""
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)  # (T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, ids, cache=None, labels=None, label_weights=None):
        """Logits (B, T, vocab); or, given ``labels (B, T)`` and ``label_weights (B, T)``, the float32 scalar
        ``Σ weight · cross-entropy(logits, label)`` without materialising the logits (``loss.py``)."""
        past = len(cache) if cache is not None else 0
        h = self.model.embed_tokens(ids)  # (B, T, hidden)
        cos, sin = self.rope(torch.arange(past, past + ids.shape[1], device=ids.device), h.dtype)  # (T, hd)
        for block in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, cos, sin, cache, use_reentrant=False)
            else:
                h = block(h, cos, sin, cache)
        h = self.model.norm(h)  # (B, T, hidden)
        W = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight  # (vocab, hidden)
        if labels is not None:
            return linear_cross_entropy(h.flatten(0, 1), W, labels.flatten(), label_weights.flatten())
        return F.linear(h, W)  # (B, T, vocab)


def _to_torch(arr, dtype):
    """A checkpoint array (bfloat16 as ml_dtypes) -> torch tensor in ``dtype``."""
    return numpy_to_torch(arr).to(dtype)


def _checkpoint_dtype(ckpt):
    """The torch dtype of the embedding in the checkpoint (read from the header, not the data)."""
    np_dtype = ckpt.info("model.embed_tokens.weight")[0] if "model.embed_tokens.weight" in ckpt else None
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if np_dtype is None or np.dtype(np_dtype).name not in names:
        raise InputError("model.embed_tokens.weight is missing or not float32/float16/bfloat16", ckpt.path)
    return names[np.dtype(np_dtype).name]


def load_llama(path, dtype=None, device=None):
    """Load a Hugging Face Llama folder into ``Llama``, frozen and in eval mode.

    ``dtype`` (default: the checkpoint's) is the dtype of every floating-point weight; NF4 weights
    (bitsandbytes layout) become ``NF4Linear`` with that compute dtype. Raises ``InputError`` for an
    unsupported architecture or a missing / unexpected / mis-shaped tensor.
    """
    with Checkpoint(path) as ckpt:
        cfg = LlamaConfig.from_dict(ckpt.config, ckpt.path)
        dtype = dtype or _checkpoint_dtype(ckpt)
        with torch.device("meta"):
            model = Llama(cfg)
        quantized = quantized_weights(ckpt.keys())
        skip = set(quantized)
        for key in quantized:  # NF4 weights in bitsandbytes' layout
            module = key[: -len(".weight")]
            if not isinstance(model.get_submodule(module) if "layers." in module else None, nn.Linear):
                raise InputError("only the Linear layers of the blocks can be NF4 here", ckpt.path, key)
            bias = None
            if f"{module}.bias" in ckpt:
                bias = _to_torch(ckpt.get(f"{module}.bias"), dtype).to(device)
                skip.add(f"{module}.bias")
            parent, child = module.rsplit(".", 1)
            qstate = QuantState.from_numpy(read_state(ckpt, key), device)
            setattr(model.get_submodule(parent), child, NF4Linear(qstate, bias, compute_dtype=dtype))
        expected = {n: p for n, p in model.named_parameters() if p.is_meta}  # (NF4Linear's are real)
        state = {}
        for key in ckpt.keys():
            if key in skip or is_aux_key(key) or (key == "lm_head.weight" and cfg.tie_word_embeddings):
                continue
            if key not in expected:
                raise InputError("unexpected tensor for a Llama model with this config", ckpt.path, key)
            tensor = _to_torch(ckpt.get(key), dtype).to(device)
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise InputError(f"shape {tuple(tensor.shape)} does not fit the config, which needs "
                                 f"{tuple(expected[key].shape)}", ckpt.path, key)
            state[key] = tensor
        missing = sorted(set(expected) - set(state))
        if missing:
            raise InputError(f"{len(missing)} tensors missing from the checkpoint (first: {missing[0]})", ckpt.path)
        model.load_state_dict(state, strict=False, assign=True)
        model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.requires_grad_(False).eval()
