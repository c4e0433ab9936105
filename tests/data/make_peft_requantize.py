"""Generate PEFT's ``merge_and_unload()`` of LoRA adapters into a 4-bit base, for tests/test_requantize_peft.py.

Needs torch, transformers, peft and bitsandbytes (CPU is enough); the tests need none of them.
Run from the repository root:  python tests/data/make_peft_requantize.py
Writes tests/data/peft_requantize/:
  bnb-nf4-dq/, bnb-nf4/       a seeded tiny bf16 Llama (minilora.synthetic; hidden 64, intermediate 128: every
                              in_features a multiple of the blocksize, see below) quantised by transformers +
                              bitsandbytes on the CPU, with and without double quantisation
  lora-a/, lora-b/, dora-a/   PEFT-saved adapters (r 4 on all 7 Linear of both layers; B set non-zero)
  <base>-<adapters>.safetensors
                              the tensors of PEFT's merged model that belong to a 4-bit weight (packed codes,
                              absmax, maps, quant-state JSON): PeftModel.from_pretrained(4-bit model, first),
                              load_adapter(the others), set_adapter(all), merge_and_unload(), state_dict().
                              PEFT 0.21.2's Linear4bit.merge dequantises, adds one adapter's ΔW, quantises again,
                              adapter by adapter; bitsandbytes records the dtype of what it quantised.
  manifest.json               versions, CPU flags, cases, PEFT's quantization_config, and per case with several adapters
                              whether merging one, saving, loading and merging the next gives the same bytes

bitsandbytes 0.50.2's AVX-512 CPU dequantize_4bit takes the absmax of element (r, c) from block
r·floor(K/blocksize) + floor(c/blocksize), which is wrong where K is not a multiple of the blocksize (docs/nf4.md
§6); every merge below first checks that its dequantisation equals bitsandbytes' pure-torch one.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import bitsandbytes
import bitsandbytes.functional as F
import peft
import transformers
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BitsAndBytesConfig

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from minilora.synthetic import llama_config, write_llama_checkpoint  # noqa: E402

DATA = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(DATA, "peft_requantize")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOAT = os.path.join(OUT, "float")  # removed at the end: only the 4-bit bases are kept
CASES = [("bnb-nf4-dq", ["lora-a"]), ("bnb-nf4-dq", ["lora-a", "lora-b"]), ("bnb-nf4", ["lora-a"]),
         ("bnb-nf4", ["lora-a", "lora-b"]), ("bnb-nf4-dq", ["dora-a"])]


def make_adapter(name, seed, dora):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(FLOAT)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0, use_dora=dora)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if "lora_B" in key:
                p.normal_(0.0, 0.02)  # PEFT starts B at zero: a merge would change nothing
            if "lora_magnitude_vector" in key:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    pm.peft_config["default"].base_model_name_or_path = "tests/data/peft_requantize/bnb-nf4"  # not this machine's path
    pm.save_pretrained(os.path.join(OUT, name))
    os.remove(os.path.join(OUT, name, "README.md"))  # PEFT's model card template


def merged_4bit(base, adapters):
    """``{key: tensor}`` of PEFT's merged model, and the model."""
    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    for module in model.modules():  # the merge dequantises with dequantize_4bit: refuse a CPU that gets it wrong
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            w, qs = module.weight, module.weight.quant_state
            absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset if qs.nested else qs.absmax
            flat = _dequantize_4bit_compute(w.data.view(-1), absmax, _get_4bit_code(qs.quant_type, w.device),
                                            qs.blocksize, qs.shape, qs.dtype)
            assert torch.equal(F.dequantize_4bit(w.data, qs), flat), "bitsandbytes' CPU dequantize_4bit is off"
    pm = PeftModel.from_pretrained(model, os.path.join(OUT, adapters[0]))
    for name in adapters[1:]:
        pm.load_adapter(os.path.join(OUT, name), adapter_name=name)
    if len(adapters) > 1:
        pm.base_model.set_adapter(["default"] + adapters[1:])
    merged = pm.merge_and_unload()
    return {k: v.contiguous() for k, v in merged.state_dict().items()}, merged


def quant_parts(state):
    weights = {k.split(".weight.quant_state.")[0] + ".weight" for k in state if ".quant_state." in k}
    return {k: v for k, v in state.items() if k in weights or k.split(".weight.")[0] + ".weight" in weights}


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    write_llama_checkpoint(FLOAT, llama_config(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                                               vocab=128, dtype="bfloat16"), seed=11)
    for name, dq in (("bnb-nf4-dq", True), ("bnb-nf4", False)):
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(FLOAT, quantization_config=qc, device_map="cpu")
        model.save_pretrained(os.path.join(OUT, name), safe_serialization=True)
    make_adapter("lora-a", 1, False)
    make_adapter("lora-b", 2, False)
    make_adapter("dora-a", 3, True)
    manifest = {"versions": {"peft": peft.__version__, "transformers": transformers.__version__,
                             "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__},
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "cases": {}}
    torch.set_num_threads(1)
    for base_name, adapters in CASES:
        base = os.path.join(OUT, base_name)
        state, merged = merged_4bit(base, adapters)
        case = f"{base_name}-{'+'.join(adapters)}"
        save_file(quant_parts(state), os.path.join(OUT, f"{case}.safetensors"), metadata={"format": "pt"})
        entry = {"base": base_name, "adapters": adapters,
                 "quantization_config": merged.config.quantization_config.to_dict()}
        if len(adapters) > 1:  # one adapter at a time, saved and loaded in between
            with tempfile.TemporaryDirectory() as tmp:
                step = base
                for i, name in enumerate(adapters):
                    state_i, _ = merged_4bit(step, [name])
                    step = os.path.join(tmp, str(i))
                    os.makedirs(step)
                    shutil.copy(os.path.join(base, "config.json"), step)
                    save_file(state_i, os.path.join(step, "model.safetensors"), metadata={"format": "pt"})
            entry["one_at_a_time_same_bytes"] = all(torch.equal(state[k].view(torch.uint8).reshape(-1),
                                                                state_i[k].view(torch.uint8).reshape(-1))
                                                    for k in state)
        manifest["cases"][case] = entry
    shutil.rmtree(FLOAT)
    with open(os.path.join(OUT, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


if __name__ == "__main__":
    main()
