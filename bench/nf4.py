"""NF4 kernels, measured side by side in one run and printed as ratios (not a test; run by hand).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/nf4.py [--quick] [--threads 2] [--reps 7]

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE may be set on this machine kind for old OpenBLAS builds; they slow a
current NumPy, so unset them for this command only. The BLAS kernel that ran is printed via threadpoolctl.)

What it compares, per shape W (N, K) in {4096 x 4096, 11008 x 4096}, blocksize 64, float32 activations:
  GEMV (M = 1)   minilora exact mode vs the machine's streaming read of the same bytes (minilora_stream_read on
                 the same thread pool), warm (weights in L3) and cold (rotating copies larger than L3);
                 vs bitsandbytes' CPU matmul_4bit and torchao's linear_nf4 when installed.
  GEMM (M = 8, 64, 512)  vs NumPy float32 matmul on pre-dequantised weights (the BLAS roofline),
                 vs bitsandbytes / torchao, vs NumPy reference dequantise-then-matmul.
  quantise / dequantise  vs bitsandbytes' CPU quantize_4bit / dequantize_4bit.
Every contender runs once per round, round-robin, so load from elsewhere hits all of them alike; the table
shows the best round (and the median). Times vary +-20-30 % run to run on a shared 2-vCPU machine.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minilora import native, nf4  # noqa: E402
from minilora._native import ffi, lib  # noqa: E402

L3_BYTES = 32 << 20


def optional(name):
    try:
        return __import__(name)
    except ImportError:
        print(f"  ({name} not installed: its columns are skipped)")
        return None


SPINNERS = ("numpy", "minilora dequant + numpy", "bitsandbytes", "torchao")


def race(contenders, reps):
    """{name: fn} -> {name: (best, median)} seconds; round-robin so every contender sees the same load.

    OpenBLAS (numpy) and OpenMP (torch) worker threads keep spinning for ~0.1 s after a call; on 2 vCPUs
    that steals a core from whatever runs next (spec/kernels.md "Traps"). So after a contender that uses
    them the race pauses 0.15 s, untimed, and no contender is measured next to another one's spinners.
    """
    return _race(contenders, reps, time.perf_counter)


def _race(contenders, reps, clock):
    for fn in contenders.values():
        fn()  # warm up: page faults, lazy thread start
        time.sleep(0.15)
    times = {name: [] for name in contenders}
    for _ in range(reps):
        for name, fn in contenders.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
            if name.startswith(SPINNERS):
                time.sleep(0.15)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def race_cpu(contenders, reps):
    """As race, but thread CPU time of the calling thread: for 1-thread runs, robust to load from elsewhere."""
    return {name: best for name, (best, _) in _race(contenders, reps, time.thread_time).items()}


def burst(fn, n):
    """n back-to-back calls, as a decode loop makes them: a sleeping pool worker is woken once per burst.

    On this VM a thread that slept for milliseconds takes about as long to wake as a whole 4096 x 4096
    GEMV, so single isolated calls measure the wake-up, not the kernel (both minilora's pool and OpenBLAS).
    """
    def run():
        for _ in range(n):
            fn()
    return run


def single_thread_cpu(args):
    """Kernel efficiency on one core, in CPU seconds (another process sharing the core does not count)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("\n(threadpoolctl not installed: the single-thread CPU-time section is skipped)")
        return
    rng = np.random.default_rng(1)
    N = K = 4096
    W = rng.standard_normal((N, K)).astype(np.float32)  # (N, K)
    packed, absmax = native.quantize_nf4(W)
    w_deq = native.dequantize_nf4(packed, absmax, (N, K))  # (N, K)
    nbytes = packed.nbytes + absmax.nbytes
    print(f"\n=== one thread, CPU time of the calling thread (robust to other load), W ({N}, {K}) ===")
    with threadpool_limits(1):
        for M in ([1, 64] if args.quick else [1, 8, 64, 512]):
            x = rng.standard_normal((M, K)).astype(np.float32)  # (M, K)
            res = race_cpu({"minilora": lambda: native.matmul_nf4(x, packed, absmax, N, K, num_threads=1),
                            "numpy f32 matmul (pre-dequantised)": lambda: x @ w_deq.T},
                           20 if M == 1 else 3 if M < 512 else 2)
            ours, blas = res["minilora"], res["numpy f32 matmul (pre-dequantised)"]
            rate = f"{nbytes / ours / 1e9:5.1f} GB/s of NF4" if M == 1 else f"{2 * M * N * K / ours / 1e9:5.1f} GFLOP/s"
            print(f"  M = {M:3d}: minilora {fmt(ours)} ({rate}), numpy {fmt(blas)} "
                  f"({2 * M * N * K / blas / 1e9:5.1f} GFLOP/s): minilora at {blas / ours:.0%} of numpy's speed")
        res = race_cpu({"quantize": lambda: native.quantize_nf4(W, num_threads=1),
                        "dequantize": lambda: native.dequantize_nf4(packed, absmax, (N, K), num_threads=1)}, 3)
        print(f"  quantize {fmt(res['quantize'])} ({N * K / res['quantize'] / 1e9:.2f} G values/s), "
              f"dequantize {fmt(res['dequantize'])} ({N * K / res['dequantize'] / 1e9:.2f} G values/s)")


def fmt(seconds):
    return f"{seconds * 1e3:9.3f} ms"


def machine_header(threads):
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"date: {subprocess.run(['date'], capture_output=True, text=True).stdout.strip()}")
    print(f"cpu: {model}, {os.cpu_count()} logical CPUs, avx2={native.has_avx2()}, avx512={native.has_avx512()} "
          f"(the exact GEMV's kernel: {'AVX-512F' if native.has_avx512() else 'AVX2' if native.has_avx2() else 'scalar'}); python {platform.python_version()}, "
          f"numpy {np.__version__}; threads for every library: {threads}")
    print(f"load average at start: {os.getloadavg()}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "MINILORA_FORCE_REF", "MINILORA_NUM_THREADS"):
        if var in os.environ:
            print(f"  note: {var}={os.environ[var]} is set")
    try:
        import threadpoolctl
        for info in threadpoolctl.threadpool_info():
            print(f"  blas: {info.get('internal_api')} {info.get('version')} kernel={info.get('architecture')} "
                  f"threads={info.get('num_threads')}")
    except ImportError:
        print("  (threadpoolctl not installed: BLAS kernel not reported)")


def stream_seconds(buffers, threads):
    out = ffi.new("uint64_t *")
    ptrs = [ffi.from_buffer("uint8_t[]", b) for b in buffers]
    state = {"i": 0}

    def run():
        i = state["i"] = (state["i"] + 1) % len(ptrs)
        lib.minilora_stream_read(ptrs[i], buffers[i].size, threads, out)
    return run


def bench_shape(N, K, Ms, args, bnb, torch, torchao_nf4):
    rng = np.random.default_rng(0)
    print(f"\n=== W ({N}, {K}) NF4, blocksize 64 ===")
    W = rng.standard_normal((N, K)).astype(np.float32)  # (N, K)
    packed, absmax = native.quantize_nf4(W)
    nbytes = packed.nbytes + absmax.nbytes  # what a GEMV must read
    copies = max(2, -(-3 * L3_BYTES // nbytes))  # rotating copies: > 3 x L3 in all, so reads come from DRAM
    cold = [(packed.copy(), absmax.copy()) for _ in range(copies)]
    stream_bufs_warm = [np.ones(nbytes // 32 * 32, np.uint8)]
    stream_bufs_cold = [np.ones(nbytes // 32 * 32, np.uint8) for _ in range(copies)]
    w_deq = native.dequantize_nf4(packed, absmax, (N, K))  # (N, K) float32, the BLAS roofline's input
    T = args.threads
    if bnb is not None:
        Wt = torch.from_numpy(W)
        bnb_packed, bnb_state = bnb.functional.quantize_4bit(Wt, blocksize=64, quant_type="nf4")
        assert (bnb_packed.numpy().reshape(-1) == packed.reshape(-1)).all(), "bitsandbytes packs other bytes"
    if torchao_nf4 is not None:
        tao_w = torchao_nf4.to_nf4(torch.from_numpy(W), block_size=64, scaler_block_size=256)

    for M in Ms:
        x = rng.standard_normal((M, K)).astype(np.float32)  # (M, K)
        reps = args.reps if M < 512 else max(2, args.reps // 2)
        c = {"minilora": lambda: native.matmul_nf4(x, packed, absmax, N, K, num_threads=T)}
        if M == 1:
            it = {"i": 0}

            def gemv_cold():
                it["i"] = (it["i"] + 1) % copies
                native.matmul_nf4(x, *cold[it["i"]], N, K, num_threads=T)
            c["minilora cold"] = gemv_cold
            # a decode loop's GEMV: the weights checked once (native.PackedNF4), only x per call
            prepared = [native.PackedNF4(p, a, N, K, num_threads=T) for p, a in cold]
            warm = native.PackedNF4(packed, absmax, N, K, num_threads=T)
            c["minilora prepared"] = lambda: warm.matmul(x)

            def gemv_prepared_cold():
                it["i"] = (it["i"] + 1) % copies
                prepared[it["i"]].matmul(x)
            c["minilora prepared cold"] = gemv_prepared_cold
            if native.has_avx512():  # the AVX2 GEMV too, as CPUs without AVX-512 run it
                prepared_avx2 = [native.PackedNF4(p, a, N, K, variant="avx2", num_threads=T) for p, a in cold]

                def gemv_avx2_cold():
                    it["i"] = (it["i"] + 1) % copies
                    prepared_avx2[it["i"]].matmul(x)
                c["minilora prepared cold, AVX2 kernel"] = gemv_avx2_cold

            def gemv_int16_cold():
                it["i"] = (it["i"] + 1) % copies
                prepared[it["i"]].matmul(x, mode="int16")
            c["minilora int16 (approximate) cold"] = gemv_int16_cold
            c["stream read warm"] = stream_seconds(stream_bufs_warm, T)
            c["stream read cold"] = stream_seconds(stream_bufs_cold, T)
        c["numpy f32 matmul (pre-dequantised)"] = lambda: x @ w_deq.T
        c["minilora dequant + numpy matmul"] = lambda: x @ native.dequantize_nf4(packed, absmax, (N, K), num_threads=T).T
        if not args.quick and M in (1, 64):
            c["numpy reference dequant + matmul"] = lambda: x @ nf4.dequantize_nf4(packed, absmax, (N, K)).T
        if bnb is not None:
            xt = torch.from_numpy(x)
            c["bitsandbytes matmul_4bit"] = lambda: bnb.matmul_4bit(xt, bnb_packed.t(), quant_state=bnb_state)
        if torchao_nf4 is not None and not args.quick and M in (1, 64):
            xt32 = torch.from_numpy(x)
            c["torchao linear_nf4 (f32)"] = lambda: torchao_nf4.linear_nf4(xt32, tao_w)
        slow = {k for k in c if k.startswith(("numpy reference", "torchao", "bitsandbytes"))}
        calls = 20 if M == 1 else 1  # GEMV: time bursts of 20 calls, report per call
        res = race({k: burst(v, calls) for k, v in c.items() if k not in slow}, reps)
        res = {k: (best / calls, med / calls) for k, (best, med) in res.items()}
        res.update(race({k: v for k, v in c.items() if k in slow}, 2))
        print(f"\n-- M = {M}  ({2 * M * N * K / 1e9:.2f} GFLOP, {nbytes / 1e6:.1f} MB of NF4 weights)"
              + ("; per call, from bursts of 20 back-to-back calls" if M == 1 else ""))
        ours = res["minilora"][0]
        for name, (best, med) in res.items():
            extra = "" if name.startswith("stream") else f"{2 * M * N * K / best / 1e9:7.1f} GFLOP/s"
            if M == 1:
                extra += f"  {nbytes / best / 1e9:6.1f} GB/s"
            print(f"  {name:38s} best {fmt(best)}  median {fmt(med)}  {extra}  {best / ours:7.2f}x minilora time")
        if M == 1:
            print(f"  => exact-mode GEMV from DRAM (cold) at "
                  f"{res['stream read cold'][0] / res['minilora prepared cold'][0]:.0%} of the streaming read of the "
                  f"same bytes with prepared weights (target >= 40 %), "
                  f"{res['stream read cold'][0] / res['minilora cold'][0]:.0%} through matmul_nf4 (checks the "
                  f"weights on every call); warm (L3-resident) at {res['stream read warm'][0] / ours:.0%} of an L3 read")
            if "minilora prepared cold, AVX2 kernel" in res:
                print(f"  => the AVX2 exact GEMV (what a CPU without AVX-512 runs) cold at "
                      f"{res['stream read cold'][0] / res['minilora prepared cold, AVX2 kernel'][0]:.0%} of the "
                      f"streaming read; the AVX-512F one is "
                      f"{res['minilora prepared cold, AVX2 kernel'][0] / res['minilora prepared cold'][0]:.2f}x faster")
            approx = warm.matmul(x, mode="int16")[0].astype(np.float64)  # (N,)
            exact = x[0].astype(np.float64) @ w_deq.astype(np.float64).T  # (N,)
            scale = np.abs(x[0]).astype(np.float64) @ np.abs(w_deq).astype(np.float64).T  # (N,)
            print(f"  => int16 mode (approximate, opt-in) cold at "
                  f"{res['stream read cold'][0] / res['minilora int16 (approximate) cold'][0]:.0%} of the streaming "
                  f"read, {res['minilora prepared cold'][0] / res['minilora int16 (approximate) cold'][0]:.2f}x the "
                  f"exact mode; error max {np.max(np.abs(approx - exact) / scale):.1e}, RMS "
                  f"{np.sqrt(np.mean((np.abs(approx - exact) / scale) ** 2)):.1e} of |x|·|w| (exact mode: "
                  f"{np.max(np.abs(warm.matmul(x)[0] - exact) / scale):.1e})")
        else:
            print(f"  => GEMM at {res['numpy f32 matmul (pre-dequantised)'][0] / ours:.0%} of NumPy float32 matmul "
                  f"on pre-dequantised weights (target >= 80 % at M >= 64)")
        if "bitsandbytes matmul_4bit" in res:
            target = " (target >= 30x for the GEMV)" if M == 1 else ""
            print(f"  => {res['bitsandbytes matmul_4bit'][0] / ours:.1f}x faster than bitsandbytes CPU{target}")

    c = {"minilora quantize": lambda: native.quantize_nf4(W, num_threads=T),
         "minilora dequantize": lambda: native.dequantize_nf4(packed, absmax, (N, K), num_threads=T)}
    if bnb is not None:
        c["bitsandbytes quantize_4bit"] = lambda: bnb.functional.quantize_4bit(Wt, blocksize=64, quant_type="nf4")
        c["bitsandbytes dequantize_4bit"] = lambda: bnb.functional.dequantize_4bit(bnb_packed, bnb_state)
    res = race(c, 3 if args.quick else 5)
    print(f"\n-- quantise / dequantise {N * K / 1e6:.1f} M float32 values")
    for name, (best, med) in res.items():
        print(f"  {name:38s} best {fmt(best)}  median {fmt(med)}  {N * K / best / 1e9:6.2f} G values/s")
    if bnb is not None:
        print(f"  => quantise {res['bitsandbytes quantize_4bit'][0] / res['minilora quantize'][0]:.1f}x, dequantise "
              f"{res['bitsandbytes dequantize_4bit'][0] / res['minilora dequantize'][0]:.1f}x faster than bitsandbytes CPU "
              f"(target >= 10x for quantise)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4096 x 4096 only, M in {1, 64}, no NumPy reference / torchao")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    machine_header(args.threads)
    torch = optional("torch")
    bnb = optional("bitsandbytes") if torch is not None else None
    torchao_nf4 = None
    if torch is not None:
        torch.set_num_threads(args.threads)
        try:
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor as torchao_nf4
        except ImportError:
            print("  (torchao NF4 not importable: its column is skipped)")
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    Ms = [1, 64] if args.quick else [1, 8, 64, 512]
    start = time.perf_counter()
    single_thread_cpu(args)
    for N, K in shapes:
        bench_shape(N, K, Ms, args, bnb, torch, torchao_nf4)
    print(f"\nload average at end: {os.getloadavg()}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
