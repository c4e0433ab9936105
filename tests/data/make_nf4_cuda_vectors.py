"""Record bitsandbytes' CUDA 4-bit quantiser and dequantiser on the inputs of tests/data/nf4/ (needs a GPU).

    python tests/data/make_nf4_cuda_vectors.py            # writes tests/data/nf4_cuda/{vectors.npz, meta.json}
    python tests/data/make_nf4_cuda_vectors.py --out DIR  # the same, into DIR

The CPU vectors (make_nf4_vectors.py) fix the contract; these record where a GPU differs from it, so that
docs/nf4.md can give measured counts and tests/test_nf4_cuda_vectors.py can check the explanations without a
GPU. The inputs are read from tests/data/nf4/vectors.npz, so every case here has a CPU twin of the same name.
Per 4-bit case (bit patterns, as in the CPU vectors):

    packed, absmax              bitsandbytes' CUDA quantize_4bit (absmax from the call without double quant)
    dq_codes, dq_nested_absmax, dq_offset, dq_absmax   with double quantisation, as in the CPU vectors
    out_<dtype>                 CUDA dequantize_4bit of the CUDA state, float32 / float16 / bfloat16
    cpuq_out_<dtype>            CUDA dequantize_4bit of the *CPU* state (bitsandbytes' CPU quantize_4bit,
                                run here and checked against the committed CPU vectors first)

Nested cases: ``codes`` and ``nested_absmax`` of CUDA quantize_blockwise(c, blocksize=256).
meta.json also holds the counts on randn(4096, 4096) (seed 0, blocksize 64, double quantisation) that
docs/nf4.md quotes, computed against minilora's NumPy reference.
Needs torch with CUDA, bitsandbytes and numpy; the tests that read the output need neither torch nor a GPU.
"""
import argparse
import datetime
import json
import pathlib
import platform
import sys

import numpy as np
import torch

import bitsandbytes
import bitsandbytes.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from minilora import nf4 as ref  # noqa: E402
from minilora.tables import NF4_MID, NF4_MID_CUDA  # noqa: E402

CPU_DIR = pathlib.Path(__file__).resolve().parent / "nf4"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REF_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}
DEVICE = "cuda"  # --device cpu: a dry run of this script against the CPU vectors
INT = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


def bits(t):
    """A torch float tensor (any device) -> numpy unsigned bit patterns (uint32 / uint16)."""
    name = str(t.dtype).replace("torch.", "")
    raw = t.detach().contiguous().cpu().view(INT[name]).numpy()
    return raw.view(np.uint32 if name == "float32" else np.uint16)


def from_bits(arr, dtype, shape):
    """Bit patterns -> a CPU torch tensor of ``dtype`` and ``shape``."""
    signed = np.ascontiguousarray(arr).view(np.int32 if dtype == "float32" else np.int16)
    return torch.from_numpy(signed.copy()).view(DTYPES[dtype]).reshape(shape)


def dequant_all(packed, state):
    out = {}
    for name, dt in DTYPES.items():
        state.dtype = dt
        out[name] = bits(F.dequantize_4bit(packed, state)).reshape(-1)
    return out


def record_4bit(case, cpu, arrays, checks):
    name, bs, qt, dq = case["name"], case["blocksize"], case["quant_type"], case["double_quant"]
    x = from_bits(cpu[f"{name}__x"], case["dtype"], case["shape"])
    # the CPU quantiser here first: it must reproduce the committed vectors, else this machine differs
    p_cpu, s_cpu = F.quantize_4bit(x, blocksize=bs, quant_type=qt, compress_statistics=dq)
    same = np.array_equal(p_cpu.numpy(), cpu[f"{name}__packed"])
    if dq:
        same &= np.array_equal(s_cpu.absmax.numpy(), cpu[f"{name}__dq_codes"])
    checks.append(dict(name=name, cpu_quantiser_reproduced=bool(same)))
    s_cpu.to(DEVICE)  # in place
    for k, v in dequant_all(p_cpu.to(DEVICE), s_cpu).items():
        arrays[f"{name}__cpuq_out_{k}"] = v

    xc = x.to(DEVICE)
    packed, state = F.quantize_4bit(xc, blocksize=bs, quant_type=qt, compress_statistics=dq)
    arrays[f"{name}__packed"] = packed.cpu().numpy()
    if dq:
        arrays[f"{name}__dq_codes"] = state.absmax.cpu().numpy()
        arrays[f"{name}__dq_nested_absmax"] = bits(state.state2.absmax)
        arrays[f"{name}__dq_offset"] = bits(state.offset.reshape(1))
        arrays[f"{name}__dq_absmax"] = bits(F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
        _, plain = F.quantize_4bit(xc, blocksize=bs, quant_type=qt)
        arrays[f"{name}__absmax"] = bits(plain.absmax)
    else:
        arrays[f"{name}__absmax"] = bits(state.absmax)
    for k, v in dequant_all(packed, state).items():
        arrays[f"{name}__out_{k}"] = v


def record_nested(case, cpu, arrays):
    name = case["name"]
    c = torch.from_numpy(cpu[f"{name}__c"].view(np.float32).copy()).to(DEVICE)
    q, st = F.quantize_blockwise(c, blocksize=256)
    arrays[f"{name}__codes"] = q.cpu().numpy()
    arrays[f"{name}__nested_absmax"] = bits(st.absmax)


def measure():
    """Counts on randn(4096, 4096), seed 0, blocksize 64, for docs/nf4.md."""
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    n = w.numel()
    out = {"input": "torch.manual_seed(0); torch.randn(4096, 4096), blocksize 64", "elements": n}
    packed, state = F.quantize_4bit(w.to(DEVICE), blocksize=64, quant_type="nf4", compress_statistics=True)
    _, plain = F.quantize_4bit(w.to(DEVICE), blocksize=64, quant_type="nf4")
    cuda_codes = ref.unpack_nibbles(packed.cpu().numpy(), n)
    st = ref.quantize(w.numpy(), blocksize=64, double_quant=True)
    ref_codes = ref.unpack_nibbles(st.packed, n)
    v, absmax = ref._normalise(w.numpy().reshape(-1), 64)
    out["absmax_differing"] = int((bits(plain.absmax) != absmax.view(np.uint32)).sum())
    out["nf4_codes_vs_reference"] = int((cuda_codes != ref_codes).sum())
    out["nf4_codes_vs_cuda_bounds"] = int((cuda_codes != np.searchsorted(NF4_MID_CUDA, v)).sum())
    out["nf4_codes_cpu_vs_cuda_bounds"] = int((np.searchsorted(NF4_MID, v) != np.searchsorted(NF4_MID_CUDA, v)).sum())
    cuda_nested = state.absmax.cpu().numpy()
    out["nested_blocks"] = int(cuda_nested.size)
    out["nested_codes_vs_reference"] = int((cuda_nested != st.nested_codes).sum())
    cuda_offset = bits(state.offset.reshape(1)).view(np.float32)[0]
    cuda_nested_absmax = bits(state.state2.absmax).view(np.float32)
    out["offset_equal"] = bool(cuda_offset.view(np.uint32) == np.float32(st.offset).view(np.uint32))
    out["nested_absmax_differing"] = int((cuda_nested_absmax.view(np.uint32) != st.nested_absmax.view(np.uint32)).sum())
    # the CUDA dequantiser against the reference, both on the CUDA state
    cuda_state = ref.QuantState(packed=packed.cpu().numpy().reshape(-1), absmax=None, shape=(4096, 4096),
                                dtype=np.float32, blocksize=64, quant_type="nf4", nested_codes=cuda_nested,
                                nested_absmax=cuda_nested_absmax, offset=cuda_offset)
    eff = bits(F.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    out["dq_absmax_vs_reference"] = int((eff != cuda_state.block_absmax().view(np.uint32)).sum())
    for name, dt in DTYPES.items():
        state.dtype = dt
        got = bits(F.dequantize_4bit(packed, state)).reshape(-1)
        want = np.asarray(ref.dequantize(cuda_state, dtype=REF_DTYPES[name])).reshape(-1)
        out[f"dequant_{name}_vs_reference"] = int((got != want.view(got.dtype)).sum())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent / "nf4_cuda")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run (every count should then be 0)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("make_nf4_cuda_vectors.py: needs a CUDA device")
    torch.set_num_threads(1)
    cpu = dict(np.load(CPU_DIR / "vectors.npz"))
    cases = json.loads((CPU_DIR / "meta.json").read_text())["cases"]
    arrays, checks = {}, []
    for case in cases:
        if case.get("kind") == "nested":
            record_nested(case, cpu, arrays)
        else:
            record_4bit(case, cpu, arrays, checks)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "vectors.npz", **arrays)
    try:
        counts = measure()
    except Exception as e:  # the vectors are still worth keeping
        counts = {"error": f"{type(e).__name__}: {e}"}
    meta = dict(
        generator="tests/data/make_nf4_cuda_vectors.py", inputs="tests/data/nf4/vectors.npz",
        bitsandbytes=bitsandbytes.__version__, torch=torch.__version__, cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, numpy=np.__version__,
        python=platform.python_version(),
        date=datetime.date.today().isoformat(),
        cpu_quantiser_reproduced=f"{sum(c['cpu_quantiser_reproduced'] for c in checks)} of {len(checks)}",
        cpu_quantiser_not_reproduced=[c["name"] for c in checks if not c["cpu_quantiser_reproduced"]],
        randn_4096_counts=counts, cases=[c["name"] for c in cases],
    )
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: v for k, v in meta.items() if k != "cases"}, indent=1))
    print(f"{len(cases)} cases, {(args.out / 'vectors.npz').stat().st_size} bytes")


if __name__ == "__main__":
    main()
