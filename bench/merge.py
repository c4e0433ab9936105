"""Benchmark: ``minilora merge`` against PEFT ``merge_and_unload`` + ``save_pretrained``, side by side.

For each size (~0.5 GB and ~2 GB bf16 synthetic Llama-layout checkpoints, HF-sharded at 1 GB) an
r=16, alpha=32 adapter on all seven linear targets is merged by

1. ``minilora.merge.merge_checkpoint`` (streaming, tensor by tensor),
2. PEFT: ``AutoModelForCausalLM.from_pretrained(dtype=bf16)`` → ``PeftModel.from_pretrained`` →
   ``merge_and_unload()`` → ``save_pretrained`` (load + merge + save timed; the split is reported),
3. ``shutil.copyfile`` of every shard: the throughput roofline (same bytes in, same bytes out),
   once as is (into the page cache, like PEFT's save) and once followed by ``fsync`` of every copy,
   the roofline for minilora's default, which fsyncs each output file before renaming it into place;
   minilora runs both ways too (default, and ``durable=False`` = ``--no-fsync``), so each throughput
   ratio compares writes with the same durability,

each in its own fresh subprocess, so the peak RSS (the child's ``VmHWM``) is that job's alone. (Not
``ru_maxrss``: Linux carries it across ``exec``, so a child would inherit the parent's high-water mark.)
Contenders run alternately ``--repeat`` times (default 3) and the best wall time is kept; the first
round warms the page cache, and ``os.sync()`` runs between jobs so no job pays for another's
write-back. Wall time excludes interpreter start and imports (reported separately). Afterwards the two
merged outputs are compared element by element (bf16 bit patterns); mismatches are counted, not hidden.

    python bench/merge.py                      # both sizes, table on stdout, bench/out/merge_results.md
    python bench/merge.py --sizes 0.5 --repeat 1 --json
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from common import cpu_name, log, vm_kb  # noqa: E402  (bench/ is on sys.path when run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = {  # name -> llama_config(...) arguments; bf16 bytes: 0.51 GB and 1.96 GB
    "0.5": dict(hidden=1024, intermediate=2816, layers=16, heads=16, kv_heads=8, vocab=32000),
    "2": dict(hidden=2048, intermediate=5632, layers=18, heads=16, kv_heads=8, vocab=32000),
}
MAX_SHARD_BYTES = 10**9
RANK, ALPHA = 16, 32
CONTENDERS = ("copy", "copy_fsync", "minilora", "minilora_nofsync", "peft")
TARGETS = {"wall": 0.50, "rss": 0.25, "mbps": 0.50}  # minilora/PEFT wall ≤, minilora/PEFT RSS ≤, MB/s vs copy ≥


# ---------------------------------------------------------------- jobs (each runs in a fresh child)

def job_copy(base, adapter, out, threads, fsync=False):
    os.makedirs(out)
    for name in shard_files(base):
        shutil.copyfile(os.path.join(base, name), os.path.join(out, name))
        if fsync:
            with open(os.path.join(out, name), "rb+") as f:
                os.fsync(f.fileno())
    return {}


def job_copy_fsync(base, adapter, out, threads):
    return job_copy(base, adapter, out, threads, fsync=True)


def job_minilora(base, adapter, out, threads, durable=True):
    from minilora.merge import merge_checkpoint
    t = time.perf_counter()
    merge_checkpoint(base, [adapter], out, quiet=True, durable=durable)
    return {"merge+save": time.perf_counter() - t}


def job_minilora_nofsync(base, adapter, out, threads):
    return job_minilora(base, adapter, out, threads, durable=False)


def job_peft(base, adapter, out, threads):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    split, t = {}, time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    split["load"], t = time.perf_counter() - t, time.perf_counter()
    model = PeftModel.from_pretrained(model, adapter)
    split["adapter"], t = time.perf_counter() - t, time.perf_counter()
    merged = model.merge_and_unload()
    split["merge"], t = time.perf_counter() - t, time.perf_counter()
    merged.save_pretrained(out, max_shard_size=MAX_SHARD_BYTES)  # transformers 5: safetensors only
    split["save"] = time.perf_counter() - t
    return split


def run_child(kind, base, adapter, out, threads, profile=None):
    """Inside the child: import, run one job, print one JSON line (wall, peak RSS, split)."""
    t0 = time.perf_counter()
    job = globals()[f"job_{kind}"]
    if kind.startswith("minilora"):
        import minilora.merge  # noqa: F401  (import time is reported, not timed)
    elif kind == "peft":
        import peft, torch, transformers  # noqa: F401,E401
    t1 = time.perf_counter()
    rss_imports = vm_kb("VmRSS") / 1024
    cpu_imports = os.times().user + os.times().system
    if profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        split = prof.runcall(job, base, adapter, out, threads)
        with open(profile, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(30)
    else:
        split = job(base, adapter, out, threads)
    t2 = time.perf_counter()
    cpu = os.times()
    print(json.dumps({"wall_s": t2 - t1, "cpu_s": cpu.user + cpu.system - cpu_imports, "import_s": t1 - t0, "rss_imports_mib": rss_imports,
                      "peak_rss_mib": vm_kb("VmHWM") / 1024,
                      "split": {k: round(v, 3) for k, v in split.items()}}))



# ---------------------------------------------------------------- the parent

def shard_files(folder):
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted(set(json.load(f)["weight_map"].values()))
    return ["model.safetensors"]


def prepare(workdir, size, regenerate):
    """Base checkpoint + adapter for one size, reused if present (a ``.done`` marker says complete)."""
    from minilora.synthetic import LINEAR_TARGETS, llama_config, write_llama_checkpoint, write_lora_adapter
    folder = os.path.join(workdir, f"llama-{size}gb")
    base, adapter, done = os.path.join(folder, "base"), os.path.join(folder, "adapter"), os.path.join(folder, ".done")
    if regenerate or not os.path.exists(done):
        shutil.rmtree(folder, ignore_errors=True)
        config = llama_config(**SIZES[size], dtype="bfloat16")
        log(f"[{size} GB] writing synthetic checkpoint and r={RANK} adapter to {folder}")
        write_llama_checkpoint(base, config, seed=0, max_shard_bytes=MAX_SHARD_BYTES)
        write_lora_adapter(adapter, config, rank=RANK, alpha=ALPHA, targets=LINEAR_TARGETS, seed=1)
        open(done, "w").close()
    nbytes = sum(os.path.getsize(os.path.join(base, n)) for n in shard_files(base))
    return folder, base, adapter, nbytes


def prime(folder, nbytes, chunk=64 * 2**20):
    """Write ``nbytes`` of scratch into the page cache and delete it, so the job that follows finds that much
    memory just freed. On this VM memory that stays free for a few seconds is reported to the host (balloon
    free page reporting) and costs a host fault per page when touched again: without this, a job's page-cache
    writes are fast or 3-5x slower depending on what the job before it freed (measured: 2 GB --no-fsync merge
    1.3 s after a job that deleted 2 GB of page cache, 5.1-5.5 s after one that wrote with O_DIRECT)."""
    path = os.path.join(folder, ".prime")
    block = bytes(chunk)
    with open(path, "wb") as f:
        for _ in range(0, nbytes, chunk):
            f.write(block)
    os.remove(path)


def spawn(kind, base, adapter, out, threads, profile=None, prime_bytes=0):
    shutil.rmtree(out, ignore_errors=True)
    if prime_bytes:
        prime(os.path.dirname(out), prime_bytes)
    os.sync()  # start with no dirty pages from the previous job
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, base, adapter, out, str(threads)]
    if profile:
        cmd += ["--profile-to", profile]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} job failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), load_before=load)


def verify(ours, theirs):
    """Count bf16 elements whose bit patterns differ between two checkpoint folders."""
    import torch
    from safetensors import safe_open

    def tensors(folder):
        return {k: os.path.join(folder, f) for f in shard_files(folder)
                for k in safe_open(os.path.join(folder, f), "pt").keys()}

    a, b = tensors(ours), tensors(theirs)
    rep = {"only_minilora": sorted(set(a) - set(b)), "only_peft": sorted(set(b) - set(a)),
           "tensors": 0, "elements": 0, "mismatches": 0, "one_ulp": 0, "tensors_with_mismatches": []}
    for name in sorted(set(a) & set(b)):
        with safe_open(a[name], "pt") as fa, safe_open(b[name], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        rep["tensors"] += 1
        rep["elements"] += x.numel()
        if x.dtype != y.dtype or x.shape != y.shape:
            rep["mismatches"] += x.numel()
            rep["tensors_with_mismatches"].append({"name": name, "count": x.numel(),
                                                   "why": f"{x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"})
            continue
        bits = {2: torch.int16, 4: torch.int32}[x.element_size()]
        bad = x.view(bits) != y.view(bits)
        n = int(bad.sum())
        if n:
            d, ref = (x.float() - y.float()).abs()[bad], y.float().abs()[bad]
            _, e = torch.frexp(ref)  # |ref| = m·2^e, m in [0.5, 1): one ulp is 2^(e - mantissa bits - 1)
            ulp = torch.ldexp(torch.ones_like(ref), e - (8 if x.dtype == torch.bfloat16 else 24))
            rep["mismatches"] += n
            rep["one_ulp"] += int((d <= ulp).sum())
            rep["tensors_with_mismatches"].append({"name": name, "count": n, "max_abs": float(d.max()),
                                                   "max_ulp": float((d / ulp).max())})
    return rep


def ratio_row(label, value, target, higher_is_better):
    ok = value >= target if higher_is_better else value <= target
    return f"| {label} | {value:.3f} | {'≥' if higher_is_better else '≤'} {target:.2f} | {'PASS' if ok else 'MISS'} |"


def markdown(results, meta):
    lines = [f"# minilora merge vs PEFT merge_and_unload — {meta['date']}", "",
             f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['ram_gib']:.0f} GiB RAM. "
             f"Versions: {meta['versions']}.", "",
             f"Method: {meta['method']}", ""]
    for res in results:
        lines += [f"## {res['size']} GB checkpoint ({res['bytes'] / 1e9:.2f} GB bf16, {res['shards']} shard(s)), "
                  f"adapter r={RANK} alpha={ALPHA} on 7 linear targets", "",
                  "| contender | wall s (best) | all runs s | CPU s | import s | peak RSS MiB | MB/s | split s (best run) |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind in CONTENDERS:
            r = res["runs"][kind]
            split = ", ".join(f"{k} {v:.2f}" for k, v in r["split"].items()) or "-"
            lines.append(f"| {kind} | {r['wall_s']:.2f} | {' / '.join(f'{w:.2f}' for w in r['walls'])} | "
                         f"{r['cpu_s']:.2f} | {r['import_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['mb_per_s']:.0f} | {split} |")
        q = res["ratios"]
        lines += ["", "| ratio | value | target | result |", "|---|---|---|---|",
                  ratio_row("minilora / PEFT wall", q["wall"], TARGETS["wall"], False),
                  ratio_row("minilora / PEFT peak RSS", q["rss"], TARGETS["rss"], False),
                  ratio_row("minilora MB/s / (copy + fsync) MB/s (both durable)", q["mbps"], TARGETS["mbps"], True),
                  ratio_row("minilora --no-fsync MB/s / copy MB/s (both page cache)", q["mbps_nofsync"],
                            TARGETS["mbps"], True),
                  f"| minilora --no-fsync / PEFT wall (info: neither fsyncs) | "
                  f"{res['runs']['minilora_nofsync']['wall_s'] / res['runs']['peft']['wall_s']:.3f} | - | - |",
                  f"| minilora / PEFT CPU s (info: less sensitive to machine load) | "
                  f"{res['runs']['minilora']['cpu_s'] / res['runs']['peft']['cpu_s']:.3f} | - | - |", ""]
        v = res["verify"]
        lines.append(f"Bit identity (minilora output vs PEFT output, bf16 bit patterns): {v['tensors']} tensors, "
                     f"{v['elements']:,} elements, **{v['mismatches']:,} mismatching elements** in "
                     f"{len(v['tensors_with_mismatches'])} tensors; keys only in minilora: {len(v['only_minilora'])}, "
                     f"only in PEFT: {len(v['only_peft'])}. {v['one_ulp']:,} of the mismatches are 1 ulp of PEFT's value; "
                     f"larger ones sit where W ≈ −ΔW cancels (a tiny W', so its ulp is tiny).")
        for m in v["tensors_with_mismatches"][:10]:
            lines.append(f"- {m['name']}: {m['count']} elements, " +
                         (m.get("why") or f"max |Δ| {m['max_abs']:.3g}, at most {m['max_ulp']:.3g} ulp of PEFT's value"))
        lines.append("")
    return "\n".join(lines)


def versions():
    from importlib.metadata import version
    return ", ".join(f"{p} {version(p)}" for p in ("numpy", "ml_dtypes", "torch", "transformers", "peft",
                                                     "safetensors")) + f", Python {platform.python_version()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="0.5,2", help="comma-separated, from " + ", ".join(SIZES))
    p.add_argument("--workdir", default=os.path.join(HERE, "out"), help="scratch folder (checkpoints, outputs)")
    p.add_argument("--regenerate", action="store_true", help="rewrite the synthetic checkpoints")
    p.add_argument("--repeat", type=int, default=3, help="alternating rounds per contender; best is kept")
    p.add_argument("--threads", type=int, default=2, help="torch / BLAS threads in every job")
    p.add_argument("--profile", action="store_true", help="one extra cProfile'd minilora run per size")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",")]
    for s in sizes:
        if s not in SIZES:
            p.error(f"--sizes: unknown size {s!r} (known: {', '.join(SIZES)})")
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "versions": versions(), "threads": args.threads,
            "method": (f"each job in a fresh subprocess; {args.repeat} alternating round(s) of copy → copy_fsync → "
                       f"minilora → minilora_nofsync → PEFT, best wall kept (round 1 warms the page cache); "
                       f"before each job the output's size of scratch is written into the page cache and deleted, so "
                       f"every job starts with the same memory just freed (see prime()); "
                       f"os.sync() between jobs; each output is deleted after its job (but minilora's and PEFT's last "
                       f"ones, compared bit for bit), since on this VM writing into memory still full of earlier "
                       f"outputs costs seconds of page reclaim; "
                       f"wall excludes interpreter start + imports; peak RSS = child's VmHWM; "
                       f"MB/s = checkpoint bytes / wall; CPU s = user + system of the job; {args.threads} torch/BLAS threads; "
                       f"1-min load average before the jobs: {{loads}} (other work on the machine skews wall times); copy = "
                       f"shutil.copyfile per shard, copy_fsync = the same + fsync of each copy; minilora fsyncs each "
                       f"shard (default), minilora_nofsync does not (--no-fsync), nor does PEFT.")}
    results = []
    for size in sizes:
        folder, base, adapter, nbytes = prepare(workdir, size, args.regenerate)
        runs = {k: {"walls": []} for k in CONTENDERS}
        for rnd in range(args.repeat):
            for kind in CONTENDERS:
                r = spawn(kind, base, adapter, os.path.join(folder, f"out-{kind}"), args.threads, prime_bytes=nbytes)
                if kind not in ("minilora", "peft") or rnd + 1 < args.repeat:  # those two are compared below
                    shutil.rmtree(os.path.join(folder, f"out-{kind}"))  # every job finds the same free memory
                log(f"[{size} GB] round {rnd + 1} {kind:16s} {r['wall_s']:7.2f} s  CPU {r['cpu_s']:6.2f} s  "
                    f"peak RSS {r['peak_rss_mib']:6.0f} MiB  load {r['load_before']:.1f}  {r['split']}")
                best = runs[kind]
                best["walls"].append(r["wall_s"])
                best.setdefault("loads", []).append(r["load_before"])
                if "wall_s" not in best or r["wall_s"] < best["wall_s"]:
                    best.update(r)
                best["peak_rss_mib"] = max(best.get("peak_rss_mib", 0), r["peak_rss_mib"])
        for r in runs.values():
            r["mb_per_s"] = nbytes / r["wall_s"] / 1e6
        res = {"size": size, "bytes": nbytes, "shards": len(shard_files(base)), "runs": runs,
               "ratios": {"wall": runs["minilora"]["wall_s"] / runs["peft"]["wall_s"],
                          "rss": runs["minilora"]["peak_rss_mib"] / runs["peft"]["peak_rss_mib"],
                          "mbps": runs["minilora"]["mb_per_s"] / runs["copy_fsync"]["mb_per_s"],
                          "mbps_nofsync": runs["minilora_nofsync"]["mb_per_s"] / runs["copy"]["mb_per_s"]}}
        log(f"[{size} GB] comparing outputs bit for bit")
        res["verify"] = verify(os.path.join(folder, "out-minilora"), os.path.join(folder, "out-peft"))
        if args.profile:
            prof = os.path.join(workdir, f"minilora-{size}gb.prof.txt")
            spawn("minilora", base, adapter, os.path.join(folder, "out-profile"), args.threads, profile=prof)
            res["profile"] = prof
        results.append(res)
    loads = [x for res in results for r in res["runs"].values() for x in r["loads"]]
    meta["method"] = meta["method"].replace("{loads}", f"{min(loads):.1f}–{max(loads):.1f}")
    text = markdown(results, meta)
    with open(os.path.join(workdir, "merge_results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(workdir, "merge_results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(json.dumps({"meta": meta, "results": results}, indent=2) if args.json else text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, base, adapter, out, threads = sys.argv[2:7]
        profile = sys.argv[8] if len(sys.argv) > 8 and sys.argv[7] == "--profile-to" else None
        run_child(kind, base, adapter, out, int(threads), profile)
    else:
        main()
