"""transformers + bitsandbytes on a GPU: the 4-bit checkpoints users actually load, both ways (needs a GPU).

    python tests/data/make_bnb_cuda_checkpoints.py             # writes tests/data/bnb_cuda/
    python tests/data/make_bnb_cuda_checkpoints.py --out DIR   # the same, into DIR

1. ``bnb-cuda-nf4-dq/``: tests/data/bnb/tiny-llama-bf16 loaded by transformers with
   ``BitsAndBytesConfig(load_in_4bit, nf4, double quant)`` on the GPU (so bitsandbytes' CUDA quantiser
   wrote it) and saved; ``bnb-cuda-nf4-dq-dequantized.safetensors`` holds bitsandbytes' CUDA
   ``dequantize_4bit`` of every quantised weight. tests/test_quantize_cli.py checks that ``minilora
   dequantize`` of the folder gives those bits.
2. ``loading.json``: the other direction. A folder written by ``minilora quantize`` (CPU) is loaded by
   transformers on the GPU as ``Linear4bit`` layers; its logits are compared with those of ``minilora
   dequantize``'s bf16 model on the same GPU: for a prompt (bitsandbytes dequantises, then a bf16 matmul)
   and for one decoded token (bitsandbytes' own 4-bit GEMV kernel), on the tiny model and on a larger
   synthetic Llama (hidden 1024, 4 layers).
Needs torch with CUDA, transformers, bitsandbytes and minilora installed (its CLI runs in a subprocess).
"""
import argparse
import datetime
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import bitsandbytes
import bitsandbytes.functional as F

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
from minilora.synthetic import llama_config, write_llama_checkpoint  # noqa: E402

TINY = HERE / "bnb" / "tiny-llama-bf16"


def gpu_quantised(out):
    """Step 1: the tiny model quantised by bitsandbytes on the GPU, saved, plus bnb's dequantisation."""
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(TINY, quantization_config=qc, device_map="cuda")
    model.save_pretrained(out / "bnb-cuda-nf4-dq", safe_serialization=True)
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            w = module.weight
            expected[f"{name}.weight"] = F.dequantize_4bit(w.data, w.quant_state).contiguous().cpu()
    save_file(expected, out / "bnb-cuda-nf4-dq-dequantized.safetensors")
    return len(expected)


def minilora(*args):
    subprocess.run([sys.executable, "-m", "minilora", *map(str, args)], check=True, capture_output=True)


def logits_pair(folder, work, double_quant):
    """Step 2 for one model: max |Δlogits| between transformers' 4-bit load of `minilora quantize`'s output
    and the bf16 model of `minilora dequantize`, for a 2 x 24 prompt and for one decoded token."""
    q, dq = work / "q", work / "dq"
    shutil.rmtree(q, ignore_errors=True)
    shutil.rmtree(dq, ignore_errors=True)
    minilora("quantize", folder, "-o", q, *([] if double_quant else ["--no-double-quant"]))
    minilora("dequantize", q, "-o", dq, "--dtype", "bfloat16")
    m4 = AutoModelForCausalLM.from_pretrained(q, device_map="cuda", dtype=torch.bfloat16)
    mb = AutoModelForCausalLM.from_pretrained(dq, device_map="cuda", dtype=torch.bfloat16)
    n4 = sum(isinstance(m, bitsandbytes.nn.Linear4bit) for m in m4.modules())
    vocab = m4.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (2, 24), generator=g).cuda()
    one = prompt[:1, :1]
    with torch.no_grad():
        lp4, lpb = m4(prompt).logits.float(), mb(prompt).logits.float()
        l14, l1b = m4(one).logits.float(), mb(one).logits.float()
    scale = float(lpb.abs().max())
    return dict(linear4bit_layers=n4, prompt_max_abs_diff=float((lp4 - lpb).abs().max()),
                prompt_bit_identical=bool(torch.equal(lp4, lpb)), token_max_abs_diff=float((l14 - l1b).abs().max()),
                token_bit_identical=bool(torch.equal(l14, l1b)), logits_max_abs=scale,
                same_argmax_prompt=bool(torch.equal(lp4.argmax(-1), lpb.argmax(-1))))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "bnb_cuda")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("make_bnb_cuda_checkpoints.py: needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    n = gpu_quantised(args.out)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = pathlib.Path(tmp)
        big = write_llama_checkpoint(work / "big", llama_config(hidden=1024, intermediate=2816, layers=4, heads=16,
                                                                kv_heads=4, vocab=4096, dtype="bfloat16"), seed=3)
        for label, folder in (("tiny (hidden 64)", TINY), ("synthetic (hidden 1024, 4 layers)", pathlib.Path(big))):
            for dq in (True, False):
                results[f"{label}, {'double quant' if dq else 'no double quant'}"] = logits_pair(folder, work, dq)
    import transformers
    meta = dict(generator="tests/data/make_bnb_cuda_checkpoints.py", bitsandbytes=bitsandbytes.__version__,
                torch=torch.__version__, transformers=transformers.__version__, gpu=torch.cuda.get_device_name(),
                date=datetime.date.today().isoformat(), quantised_weights=n, loading=results)
    (args.out / "versions.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
