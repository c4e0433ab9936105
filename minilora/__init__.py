"""minilora: a minimal, readable, trustworthy LoRA / QLoRA toolkit.

The NumPy modules are the specification: ``minilora.lora`` (LoRA math), ``minilora.dora`` (DoRA),
``minilora.nf4`` (NF4 + double quantisation), ``minilora.checkpoint`` (safetensors, PEFT adapters).
``import minilora`` needs NumPy only; torch is imported by ``minilora.torch_backend`` alone.

Shape legend: ``M`` tokens, ``K`` in_features, ``N`` out_features, ``R`` rank;
``x (M, K)``, ``W (N, K)``, ``A (R, K)``, ``B (N, R)``, ``y (M, N)``.
"""
__version__ = "0.1.0"

from minilora.errors import InputError

__all__ = ["InputError", "__version__"]
