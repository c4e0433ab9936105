"""The torch backend: the same LoRA / QLoRA math as the NumPy reference, as torch modules a trainer can use.

Every function here transcribes a named reference function (``minilora.lora``, ``minilora.dora``,
``minilora.nf4``, ``minilora.double_quant``) line by line and says so in its docstring; the tests compare
each one with its reference, never with another backend. Modules: ``nf4`` (NF4 + double quantisation,
bit-exact), ``lora`` (functional LoRA + ``LoraLinear``), ``dora`` (DoRA), ``qlora`` (``NF4Linear``,
``QLoraLinear``), ``model`` (a small Llama-family decoder loading Hugging Face folders), ``adapters``
(apply LoRA by target names, PEFT export / import), ``generate`` (KV-cache decoding).

This package is the only place in ``minilora`` that imports torch. Not here: the training loop (its own
module, ``minilora.torch_backend.train``), the CLI, and ``torch.compile`` (callers may compile; the
reference path stays eager).
"""
try:
    import torch  # noqa: F401
except ImportError as e:
    if e.name != "torch":  # torch is there but broken: show the real error
        raise
    raise ImportError(
        "minilora.torch_backend needs PyTorch, which is not installed: pip install torch==2.13.0"
    ) from e

from minilora.torch_backend.adapters import (  # noqa: E402,F401
    TARGET_SHORTHANDS, apply_lora, export_adapter, load_adapter_into, lora_layers, quantize_model,
)
from minilora.torch_backend.generate import generate  # noqa: E402,F401
from minilora.torch_backend.lora import LoraLinear  # noqa: E402,F401
from minilora.torch_backend.model import Llama, LlamaConfig, load_llama  # noqa: E402,F401
from minilora.torch_backend.qlora import NF4Linear, QLoraLinear  # noqa: E402,F401

__all__ = ["LoraLinear", "QLoraLinear", "NF4Linear", "Llama", "LlamaConfig", "load_llama", "apply_lora",
           "quantize_model", "lora_layers", "export_adapter", "load_adapter_into", "TARGET_SHORTHANDS", "generate"]
