"""Generate the NF4 / FP4 / double-quantisation known-answer vectors from bitsandbytes on CPU.

    python tests/data/make_nf4_vectors.py            # writes tests/data/nf4/{vectors.npz, meta.json}
    python tests/data/make_nf4_vectors.py --measure  # prints the CPU-vs-CUDA-bounds and torchao counts for docs/nf4.md

Needs torch + bitsandbytes (+ torchao for --measure); the tests that read the output need neither.
Every stored float is kept as its bit pattern (uint32 / uint16) so NaN payloads and -0.0 survive.
Each case stores the input ``x``, bitsandbytes' ``packed`` bytes and ``absmax``, its dequantised output
in float32, float16 and bfloat16, and with double quantisation the nested ``dq_codes``,
``dq_nested_absmax``, ``dq_offset`` (bitsandbytes' torch.mean) and ``dq_absmax`` (its dequantised stats).
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
from minilora.tables import ALLOWED_BLOCKSIZES, NF4_MID, NF4_MID_CUDA, DYNAMIC_MAP  # noqa: E402
from minilora import nf4 as ref  # noqa: E402  (FP4 bounds to aim inputs at, and exact normalising in --measure)

OUT = pathlib.Path(__file__).resolve().parent / "nf4"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BITS = {"float32": torch.int32, "float16": torch.int16, "bfloat16": torch.int16}


def bits(t):
    """A torch float tensor -> numpy unsigned bit patterns (uint32 / uint16)."""
    name = str(t.dtype).replace("torch.", "")
    raw = t.contiguous().view(BITS[name]).numpy()
    return raw.view(np.uint32 if name == "float32" else np.uint16)


class Recorder:
    def __init__(self):
        self.arrays, self.cases = {}, []

    def add(self, name, t, quant_type="nf4", blocksize=64, double_quant=False, note=""):
        """Quantise the torch tensor ``t`` (its own dtype and shape) with bnb and record everything."""
        dtype = str(t.dtype).replace("torch.", "")
        packed, state = F.quantize_4bit(t, blocksize=blocksize, quant_type=quant_type,
                                        compress_statistics=double_quant)
        a = self.arrays
        a[f"{name}__x"] = bits(t).reshape(t.shape)
        a[f"{name}__packed"] = packed.numpy()
        meta = dict(name=name, dtype=dtype, shape=list(t.shape), quant_type=quant_type, blocksize=blocksize,
                    double_quant=double_quant, note=note, packed_shape=list(packed.shape),
                    cpp_dequant=(t.shape[-1] % 2 == 0))  # bnb's C++ dequantiser runs only for an even last dim
        if double_quant:
            a[f"{name}__dq_codes"] = state.absmax.numpy()
            a[f"{name}__dq_nested_absmax"] = bits(state.state2.absmax)
            a[f"{name}__dq_offset"] = bits(state.offset.reshape(1))
            eff = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
            a[f"{name}__dq_absmax"] = bits(eff)
            _, plain = F.quantize_4bit(t, blocksize=blocksize, quant_type=quant_type)
            a[f"{name}__absmax"] = bits(plain.absmax)
            meta["nested_shapes"] = [list(state.absmax.shape), list(state.state2.absmax.shape)]
        else:
            a[f"{name}__absmax"] = bits(state.absmax)
        meta["absmax_shape"] = list(a[f"{name}__absmax"].shape)
        out_shapes = {}
        for out_name, out_dtype in TORCH_DTYPES.items():
            state.dtype = out_dtype
            out = F.dequantize_4bit(packed, state)
            out_shapes[out_name] = list(out.shape)
            a[f"{name}__out_{out_name}"] = bits(out).reshape(-1)
        meta["bnb_out_shapes"] = out_shapes
        self.cases.append(meta)


def f32(values):
    return torch.tensor(np.asarray(values, dtype=np.float32))


def bound_values(mids):
    """Each decision bound and its float32 neighbours, in a block whose absmax is exactly 1.0."""
    vals = []
    for m in np.asarray(mids, dtype=np.float32):
        vals += [np.nextafter(m, np.float32(-2)), m, np.nextafter(m, np.float32(2))]
    return np.array([1.0, -1.0] + vals, dtype=np.float32)


def make(rec):
    rng = np.random.default_rng(20250101)
    fp4_mid = ref._FP4_MID
    for qt in ("nf4", "fp4"):
        # random normal, every input dtype, odd / tail lengths, default blocksize
        for n in (1, 2, 3, 63, 64, 65, 127, 4097):
            for dt in TORCH_DTYPES:
                x = f32(rng.standard_normal(n)).to(TORCH_DTYPES[dt])
                rec.add(f"{qt}_randn_{dt}_n{n}", x, qt)
        # every blocksize with a partial last block (float32) and a 2-D bf16 weight
        for bs in ALLOWED_BLOCKSIZES:
            rec.add(f"{qt}_bs{bs}_tail", f32(rng.standard_normal(bs + 37) * 0.02), qt, bs)
        rec.add(f"{qt}_2d_even_bf16", f32(rng.standard_normal((6, 70))).to(torch.bfloat16), qt, 64,
                note="blocks span rows; even last dim -> bnb's C++ dequantiser")
        rec.add(f"{qt}_2d_odd_f16", f32(rng.standard_normal((5, 33))).to(torch.float16), qt, 32,
                note="odd last dim -> bnb's torch fallback dequantiser")
        # values on each decision bound and +-1 ulp, absmax exactly 1.0; full block and partial block
        b = bound_values(NF4_MID if qt == "nf4" else fp4_mid)
        full = np.zeros(64, np.float32)
        full[: b.size] = b
        rec.add(f"{qt}_bounds", f32(np.concatenate([full, b])), qt, 64,
                note="block 0 full (reciprocal multiply), block 1 partial (true division)")
        # special blocks, blocksize 32: all-zero full, NaN, +inf, -inf, subnormal-only, absmax == TINY, -0.0
        blocks = [np.zeros(32), rng.standard_normal(32), rng.standard_normal(32), rng.standard_normal(32),
                  np.array([1e-40, -3e-41, 1.4e-45, -1e-45] * 8), np.array([1e-38, -5e-39, 2e-39, 0.0] * 8),
                  np.array([-0.0] * 31 + [0.5]), rng.standard_normal(32) * 1e30]
        blocks[1][5] = np.nan
        blocks[2][7] = np.inf
        blocks[3][0] = -np.inf
        special = np.concatenate(blocks).astype(np.float32)
        rec.add(f"{qt}_special", f32(special), qt, 32,
                note="blocks: zero, NaN, +inf, -inf, subnormal-only, absmax==TINY, -0.0, 1e30 scale")
        rec.add(f"{qt}_zero_tail", f32(np.concatenate([rng.standard_normal(32), np.zeros(5)])), qt, 32,
                note="all-zero partial block: stored absmax is 1e-38")
        tail_nan = np.concatenate([rng.standard_normal(32), [0.25, np.nan, -0.5]]).astype(np.float32)
        rec.add(f"{qt}_nan_tail", f32(tail_nan), qt, 32)
        even = np.concatenate([rng.standard_normal(64), [0.5, np.nan]]).astype(np.float32).reshape(1, 66)
        rec.add(f"{qt}_nan_tail_even", f32(even), qt, 64,
                note="torch's max gives NaN 0xffffffff; bnb's C++ bf16 cast wraps it to 0x0000")
        tail_inf = np.concatenate([rng.standard_normal(32), [0.25, -np.inf, -0.5]]).astype(np.float32)
        rec.add(f"{qt}_inf_tail", f32(tail_inf), qt, 32)
        tail_sub = np.array([1e-40, -2e-41, 7e-45], np.float32)
        rec.add(f"{qt}_subnormal_tail", f32(np.concatenate([rng.standard_normal(32), tail_sub])), qt, 32)
        # double quantisation: > 256 blocks, short last nested block, partial last NF4 block
        n_dq = 64 * (256 + 37) + 11  # 294 NF4 blocks -> nested blocks of 256 and 38
        rec.add(f"{qt}_dq_bf16", f32(rng.standard_normal(n_dq) * 0.03).to(torch.bfloat16), qt, 64, True)
        rec.add(f"{qt}_dq_bs32_f32", f32(rng.standard_normal(32 * 300) * 0.05), qt, 32, True)
        rec.add(f"{qt}_dq_special", f32(special), qt, 32, True, note="NaN absmax -> NaN offset")
        # absmax all equal -> every c is 0 -> nested absmax 0, codes 0
        rec.add(f"{qt}_dq_constant", f32(np.ones(64 * 300)), qt, 64, True)


def make_nested(rec):
    """The nested quantiser alone (bnb's quantize_blockwise, blocksize 256) on values aimed at its LUT edges.

    double_quantize(c, offset=0) computes c - 0 == c, so it is the same function on the same values.
    """
    rng = np.random.default_rng(7)
    mids = np.float32(0.5) * (DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:])
    i = np.arange(65536, dtype=np.float32)
    points = np.float32(-1) + (np.float32(2) * i) / np.float32(65535)
    near = [np.float32(1.0), np.float32(-1.0), np.float32(0.0), np.float32(-0.0)]
    for m in mids:  # the LUT point nearest each midpoint, and the midpoint itself, +-1 ulp
        k = np.searchsorted(points, m)
        for p in (points[max(k - 1, 0)], points[min(k, 65535)], m):
            near += [np.nextafter(p, np.float32(-2)), p, np.nextafter(p, np.float32(2))]
    for p in points[32760:32776]:  # |t| < 3e-5: where the LUT is not nearest-code
        near += [np.nextafter(p, np.float32(-2)), p, np.nextafter(p, np.float32(2))]
    near = np.clip(np.array(near, np.float32), -1, 1)
    near = np.concatenate([near, np.zeros((-near.size) % 255, np.float32)]).reshape(-1, 255)  # (nb, 255)
    # a leading 1.0 makes every nested absmax exactly 1, so the normalised t equals the stored c
    blocks = np.concatenate([np.ones((near.shape[0], 1), np.float32), near], axis=1).reshape(-1)  # (nb*256,)
    tail = rng.uniform(-1, 1, 256 + 45).astype(np.float32)  # a random full block and a short last one
    tail[256 + 3] = np.nan  # a NaN in the short last block
    blocks = np.concatenate([blocks, tail])
    extra = np.array([np.nan] * 4 + [np.inf, 0.5, -0.25, 0.0], np.float32)  # all-NaN block / inf block
    for name, vals in (("nested_edges", blocks), ("nested_inf", extra[4:]), ("nested_allnan", extra[:4])):
        q, st = F.quantize_blockwise(torch.from_numpy(vals.copy()), blocksize=256)
        rec.arrays[f"{name}__c"] = vals.view(np.uint32)
        rec.arrays[f"{name}__codes"] = q.numpy()
        rec.arrays[f"{name}__nested_absmax"] = bits(st.absmax)
        rec.cases.append(dict(name=name, kind="nested", n=int(vals.size)))


def measure():
    """Counts for docs/nf4.md: CUDA bounds vs CPU bounds, and torchao's to_nf4 vs bitsandbytes."""
    from torchao.quantization import to_nf4  # torchao 0.18 location
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    v, _ = ref._normalise(w.numpy().reshape(-1), 64)
    cpu = np.searchsorted(NF4_MID, v, side="left")
    cuda = np.searchsorted(NF4_MID_CUDA, v, side="left")
    print(f"NF4 codes differing, CPU vs CUDA bounds, randn(4096, 4096) seed 0: {(cpu != cuda).sum()} "
          f"of {v.size}")
    for dt in ("float32", "bfloat16"):
        t = w.to(TORCH_DTYPES[dt])
        packed, _ = F.quantize_4bit(t, blocksize=64, quant_type="nf4")
        bnb_codes = ref.unpack_nibbles(packed.numpy(), t.numel())
        ao = to_nf4(t, 64, 256)
        ao_codes = ref.unpack_nibbles(ao.quantized_data.numpy(), t.numel())
        d = int((bnb_codes != ao_codes).sum())
        print(f"torchao to_nf4 vs bitsandbytes codes, {dt} input: {d} of {t.numel()} ({100 * d / t.numel():.3f} %)")
    # nested codes: the CPU LUT vs the exact nearest code (an estimate of bnb's CUDA rule, a binary search with
    # float32 midpoints; make_nf4_cuda_vectors.py measures the real one on a GPU: also 479 on this input)
    _, absmax = ref._normalise(w.numpy().reshape(-1), 64)
    codes, nested, off = ref.double_quantize(absmax)
    c = (absmax - off).reshape(-1, 256)
    t = np.clip(c * (np.float32(1) / nested[:, None]), -1, 1).reshape(-1)
    mid64 = (DYNAMIC_MAP[:-1].astype(np.float64) + DYNAMIC_MAP[1:]) / 2  # exact midpoints
    nearest = np.searchsorted(mid64, t.astype(np.float64), side="left")  # a tie goes to the lower code
    print(f"nested codes, CPU LUT vs exact nearest: {(nearest != codes).sum()} of {codes.size} "
          f"({100 * (nearest != codes).mean():.3f} %)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="print the counts for docs/nf4.md instead")
    args = parser.parse_args()
    if args.measure:
        return measure()
    torch.set_num_threads(1)
    rec = Recorder()
    make(rec)
    make_nested(rec)
    OUT.mkdir(exist_ok=True)
    np.savez_compressed(OUT / "vectors.npz", **rec.arrays)
    meta = dict(
        generator="tests/data/make_nf4_vectors.py",
        bitsandbytes=bitsandbytes.__version__, torch=torch.__version__, numpy=np.__version__,
        machine=platform.machine(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        date=datetime.date.today().isoformat(), cases=rec.cases,
    )
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{len(rec.cases)} cases, {(OUT / 'vectors.npz').stat().st_size} bytes")


if __name__ == "__main__":
    main()
