"""Generate bitsandbytes-quantised checkpoints for tests/test_quantize_cli.py.

Needs torch, transformers and bitsandbytes (CPU is enough); the tests need none of them.
Run from the repository root:  python tests/data/make_bnb_checkpoints.py
Writes tests/data/bnb/:
  tiny-llama-bf16/        a seeded synthetic Llama checkpoint (minilora.synthetic), bf16
  bnb-nf4-dq/, bnb-nf4/   the same model quantised by transformers + bitsandbytes (NF4, with and
                          without double quantisation) and saved with save_pretrained
  bnb-nf4-dq-dequantized.safetensors, bnb-nf4-dequantized.safetensors
                          bitsandbytes' own dequantize_4bit of every quantised weight
  versions.json           library versions used
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import bitsandbytes
import bitsandbytes.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from minilora.synthetic import llama_config, write_llama_checkpoint  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bnb")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    base = os.path.join(OUT, "tiny-llama-bf16")
    # hidden 64 with intermediate 96: 64*96 = 6144 elements = 96 blocks of 64, and a q_proj of
    # 64x64 = 64 blocks; lm_head stays bf16. Two layers keep it under 300 KB.
    write_llama_checkpoint(base, llama_config(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2,
                                              vocab=128, dtype="bfloat16"), seed=7)
    for name, dq in (("bnb-nf4-dq", True), ("bnb-nf4", False)):
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=qc, device_map="cpu")
        model.save_pretrained(os.path.join(OUT, name), safe_serialization=True)
        expected = {}
        for module_name, module in model.named_modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                w = module.weight
                expected[f"{module_name}.weight"] = F.dequantize_4bit(w.data, w.quant_state).contiguous()
        save_file(expected, os.path.join(OUT, f"{name}-dequantized.safetensors"))
    import transformers
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump({"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__,
                   "transformers": transformers.__version__}, f, indent=2)


if __name__ == "__main__":
    main()
