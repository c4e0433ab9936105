"""Benchmark: NF4 dequantisation on a CUDA GPU, side by side in one run.

Contenders, on the Llama-2-7B weight shapes (4096 x 4096 and 11008 x 4096, blocksize 64, with and without
double quantisation), into bfloat16:

A. minilora's Triton kernel (``minilora.torch_backend.nf4_triton``, what ``NF4Linear`` uses on CUDA);
B. minilora's torch transcription (``minilora.torch_backend.nf4.dequantize``, the reference it is tested against);
C. bitsandbytes' ``dequantize_4bit`` on the same weight quantised by bitsandbytes (when installed);
D. the roofline: a device-to-device copy of the bytes the kernel must move (packed + statistics read, bf16
   written), measured in the same run.

Also the dequantise + matmul of one QLoRA forward at 2048 tokens (batch 4 x 512) against the plain bf16 matmul,
which is what a QLoRA step pays per base layer on top of LoRA. Times are CUDA-event medians of ``--iters``
timings of ``--batch`` back-to-back calls (default 20; ``--batch 1`` includes the host's launch time in every
call), and, for the two dequantisers, the GPU kernel time per call from ``torch.profiler``: for a 20 µs kernel
the host's Python and launch time can exceed the kernel even back to back, and only the kernel time says what
the GPU spends. Needs a GPU.

    python bench/nf4_cuda.py            # prints a markdown table; bench/out/nf4_cuda_results.md
"""
import argparse
import datetime
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SHAPES = [(4096, 4096), (11008, 4096)]


def timed(fn, iters, batch):
    """Median milliseconds of one ``fn()``, by CUDA events around ``batch`` back-to-back calls (so that the
    GPU queue stays full and the host's launch time is hidden, as in a training step), over ``iters``
    such timings after 3 warm-up calls. ``batch=1`` times single calls, launch latency included."""
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / batch)
    return statistics.median(times)


def kernel_ms(fn, calls=20):
    """Milliseconds of GPU kernel time per ``fn()`` (torch.profiler, CUDA activity only): what the call costs
    the device, without the host's launch time, which back-to-back timings still see when it is the longer."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total_us = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                   for e in prof.key_averages())
    return total_us / calls / 1000


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--batch", type=int, default=20, help="back-to-back calls per timing (1: single calls, "
                   "host launch time included)")
    p.add_argument("--tokens", type=int, default=2048, help="rows of the QLoRA forward (batch x seq)")
    p.add_argument("--workdir", default=os.path.join(HERE, "out"))
    args = p.parse_args(argv)
    import torch
    from minilora.torch_backend import nf4, nf4_triton
    if not torch.cuda.is_available():
        raise SystemExit("bench/nf4_cuda.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        bnbf = None
    dev = torch.device("cuda")
    torch.manual_seed(0)
    lines = [f"# NF4 dequantisation on CUDA — {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; "
             f"bitsandbytes {getattr(sys.modules.get('bitsandbytes'), '__version__', 'not installed')}. "
             f"Median of {args.iters} CUDA-event timings of {args.batch} back-to-back calls each; output bfloat16; "
             f"blocksize 64.", "",
             "Kernel µs: GPU time per call from torch.profiler (no host time). The Triton kernel is launched with "
             "prepared arguments (`nf4_triton.state_args`), as `NF4Linear` does.", "",
             "| shape | double quant | Triton ms | torch ms | bnb ms | copy roofline ms | Triton / roofline | "
             "torch / Triton | bnb / Triton | Triton kernel µs | bnb kernel µs | bits equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mm_lines = ["", f"Dequantise + matmul at {args.tokens} tokens (x (M, K) bf16 @ Wᵀ):", "",
                "| shape | bf16 matmul ms | Triton dequant + matmul ms | overhead | torch dequant + matmul ms |",
                "|---|---|---|---|---|"]
    for N, K in SHAPES:
        W = (torch.randn(N, K, device=dev) * 0.02).to(torch.bfloat16)
        x = torch.randn(args.tokens, K, device=dev, dtype=torch.bfloat16)
        for dq in (False, True):
            state = nf4.quantize(W, 64, dq)
            moved = state.packed.numel() + N * K * 2 + (state.nested_codes.numel() if dq else state.absmax.numel() * 4)
            src = torch.empty(moved // 2, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)
            targs = nf4_triton.state_args(state)  # once, as a layer's buffers

            def tri():
                return nf4_triton.nf4_dequantize(*targs, torch.bfloat16)
            t_tri = timed(tri, args.iters, args.batch)
            k_tri = kernel_ms(tri)
            t_ref = timed(lambda: nf4.dequantize(state, torch.bfloat16), args.iters, args.batch)
            t_copy = timed(lambda: dst.copy_(src), args.iters, args.batch)  # reads + writes `moved` bytes in all
            same = bool(torch.equal(nf4_triton.dequantize(state, torch.bfloat16).view(torch.int16),
                                    nf4.dequantize(state, torch.bfloat16).view(torch.int16)))
            t_bnb = k_bnb = float("nan")
            if bnbf is not None:
                q, qs = bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=dq)
                t_bnb = timed(lambda: bnbf.dequantize_4bit(q, qs), args.iters, args.batch)
                k_bnb = kernel_ms(lambda: bnbf.dequantize_4bit(q, qs))
            lines.append(f"| {N} × {K} | {'yes' if dq else 'no'} | {t_tri:.4f} | {t_ref:.4f} | {t_bnb:.4f} | "
                         f"{t_copy:.4f} | {t_copy / t_tri:.0%} | {t_ref / t_tri:.1f}× | {t_bnb / t_tri:.2f}× | "
                         f"{k_tri * 1000:.1f} | {k_bnb * 1000:.1f} | {same} |")
            if dq:
                t_mm = timed(lambda: x @ W.T, args.iters, args.batch)
                t_q = timed(lambda: x @ tri().view(N, K).T, args.iters, args.batch)
                t_qr = timed(lambda: x @ nf4.dequantize(state, torch.bfloat16).T, args.iters, args.batch)
                mm_lines.append(f"| {N} × {K} | {t_mm:.4f} | {t_q:.4f} | {t_q / t_mm - 1:+.0%} | {t_qr:.4f} |")
    text = "\n".join(lines + mm_lines)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "nf4_cuda_results.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
