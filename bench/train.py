"""Benchmark: ``minilora train`` against PEFT + transformers, side by side in one run.

Both contenders train the same LoRA (r=8, alpha=16, dropout 0, all seven linear layers of every block)
on the same synthetic Llama checkpoint, with the same packed token rows in the same order, AdamW
(lr 1e-4, constant, weight decay 0), gradient clipping at 1.0, no gradient checkpointing:

A. minilora: ``minilora.torch_backend.train.train()`` unchanged (the ``minilora train`` trainer);
B. PEFT: ``LlamaForCausalLM.from_pretrained`` + ``get_peft_model(LoraConfig(...))`` and a plain torch loop
   with the trainer's loss (token cross-entropy in float32, summed over the batch / token count). Its
   ``lora_A`` matrices are re-drawn with minilora's seeded initialiser, so the two runs are the same
   computation and their loss curves must agree step by step (a check that both really train the same thing).

Each contender runs in its own fresh subprocess with ``--threads`` torch threads. A step is timed from
the end of one ``optimizer.step()`` to the end of the next (minilora's AdamW is swapped for a subclass
that only records the time; nothing else of the trainer changes); the first ``--warmup`` steps are left
out. Peak memory: the child's ``VmHWM`` (peak RSS) at the end of the last step on CPU, and
``torch.cuda.max_memory_allocated`` over the training steps on CUDA. (``ru_maxrss`` is recorded too, but
Linux carries it across ``exec``, so it can show the parent's high-water mark.) Contenders alternate
(A, B, A, B, ...) ``--repeat`` times and the best run of each is kept, because other work on the machine
slows whichever job it lands on.

On CUDA (when ``torch.cuda.is_available()``) the same comparison runs on ``--shape`` (default ``7b``:
Llama-2-7B, cut to ``--layers``) with batch 4 x 512 in bfloat16 (autocast), plus QLoRA: ``--qlora`` of
minilora against PEFT + bitsandbytes 4-bit (NF4, double quantisation, bfloat16 compute).

    python bench/train.py                 # CPU part (and CUDA when there is a GPU); bench/out/train_results.md
    python bench/train.py --quick --json  # a short look; results as JSON on stdout
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from common import cpu_name, log, vm_kb  # noqa: E402  (bench/ is on sys.path when run as a script)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHAPES = {  # llama_config(...) arguments
    "cpu": dict(hidden=384, intermediate=1024, layers=4, heads=6, kv_heads=6, vocab=8000),
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
}
RANK, ALPHA, LR, SEED, CLIP = 8, 16, 1e-4, 0, 1.0
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA, QLORA = {"qlora": False}, {"qlora": True}  # the contenders' settings
TARGETS = {"speed": 1.2, "mem": 1.0, "qlora_mem": 1.0, "qlora_time": 1.15}
REFERENCE = "PEFT + bitsandbytes on an H100, Llama-2-7B, 4x512, r=8 all linear: QLoRA +26 % time, -34 % memory " \
            "vs PEFT LoRA; the seed's own figure: +39 % / -33 %"


# ---------------------------------------------------------------- inside a child

class StepClock:
    """End-of-step timestamps and the peak memory at the end of the last step."""

    def __init__(self, device, steps):
        self.device, self.steps, self.ticks, self.cpu, self.peak = device, steps, [], [], None

    def start(self):
        """The model is built: training starts; CUDA peak memory counts from here."""
        import torch
        self.load_peak = peak_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def tick(self):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ticks.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if len(self.ticks) == self.steps:
            self.peak = peak_memory(self.device)


def peak_memory(device):
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return vm_kb("VmHWM") * 1024



def train_options(cfg):
    from minilora.torch_backend.train_state import TrainOptions
    return TrainOptions(rank=RANK, alpha=ALPHA, targets="all", dropout=0.0, qlora=cfg["qlora"], double_quant=True,
                        lr=LR, scheduler="constant", warmup=0, weight_decay=0.0, max_steps=cfg["steps"],
                        batch_size=cfg["batch"], max_length=cfg["seq"], max_grad_norm=CLIP, seed=SEED,
                        device=cfg["device"], compile=cfg.get("compile"))


def job_minilora(cfg, clock):
    import torch
    from minilora.torch_backend.train import train

    class TimedAdamW(torch.optim.AdamW):
        """torch's AdamW, plus a timestamp after every step (train() builds it after the model)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            clock.start()

        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            clock.tick()
            return out

    torch.optim.AdamW = TimedAdamW  # train() looks it up at call time
    train(cfg["model"], cfg["data"], cfg["out"], train_options(cfg), quiet=True)
    with open(os.path.join(cfg["out"], "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def job_peft(cfg, clock):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    from minilora.torch_backend.lora import init_lora
    from minilora.torch_backend.train import prepare_data

    opts = train_options(cfg)
    device = torch.device(cfg["device"])
    (ids, mask), _, _ = prepare_data(cfg["model"], cfg["data"], opts)  # the trainer's own packed rows
    on_cuda = device.type == "cuda"
    if cfg["qlora"]:
        from transformers import BitsAndBytesConfig
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = LlamaForCausalLM.from_pretrained(cfg["model"], dtype=torch.bfloat16, quantization_config=bnb,
                                                 device_map={"": (device.index or 0) if on_cuda else "cpu"})
    else:
        dtype = torch.bfloat16 if on_cuda else torch.float32
        model = LlamaForCausalLM.from_pretrained(cfg["model"], dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES,
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    # lora_A drawn exactly as minilora's apply_lora(seed=SEED) draws it: one generator, model order.
    generator = None
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                w = module.lora_A["default"].weight  # (R, K)
                generator = generator or torch.Generator(w.device).manual_seed(SEED)
                A, _ = init_lora(w.shape[1], 1, w.shape[0], "kaiming", generator, w.device)  # (R, K)
                w.copy_(A.to(w.dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    model.train()
    clock.start()
    B, losses = cfg["batch"], []
    per_epoch = max(1, len(ids) // B)
    for step in range(cfg["steps"]):  # the trainer's data order (minilora.torch_backend.train.train)
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(SEED + epoch)).numpy()
        rows = perm[(pos * B) % len(ids):][:B]
        if len(rows) < B:
            rows = np.resize(perm, B)
        x, m = torch.from_numpy(ids[rows]).to(device), torch.from_numpy(mask[rows]).to(device)  # (B, L+1), (B, L)
        n_tokens = max(1, int(mask[rows].sum()))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            logits = model(input_ids=x[:, :-1], use_cache=False).logits  # (B, L, V)
        ce = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none")  # (B*L,)
        loss_sum = (ce * m.flatten()).sum()
        (loss_sum / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        clock.tick()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum.detach()) / n_tokens)
    return losses


def run_child(kind, cfg_json):
    """Inside the child: import, run one job, print one JSON line."""
    cfg = json.loads(cfg_json)
    t0 = time.perf_counter()
    import torch
    if kind == "peft":
        import peft, transformers  # noqa: F401,E401  (import cost is reported, not timed)
    else:
        import minilora.torch_backend.train  # noqa: F401
    torch.set_num_threads(cfg["threads"])
    import_s, rss_imports = time.perf_counter() - t0, vm_kb("VmRSS") * 1024
    clock = StepClock(torch.device(cfg["device"]), cfg["steps"])
    job = {"minilora": job_minilora, "peft": job_peft}[kind]
    if cfg.get("profile"):
        from torch.profiler import ProfilerActivity, profile
        on_cuda = cfg["device"].startswith("cuda")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
        key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
        with profile(activities=activities, record_shapes=True) as prof:
            losses = job(cfg, clock)
        with open(cfg["profile"], "w") as f:
            f.write(prof.key_averages().table(sort_by=key, row_limit=40))
            f.write("\n\n")
            f.write(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40))
    else:
        losses = job(cfg, clock)
    steps = [b - a for a, b in zip(clock.ticks, clock.ticks[1:])]  # step k+1 .. from tick k to tick k+1
    timed = steps[cfg["warmup"] - 1:] if cfg["warmup"] > 0 else steps
    seconds = sum(timed)
    cpu = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])][cfg["warmup"] - 1:]  # process CPU s (all threads)
    print(json.dumps({"losses": losses, "step_s": steps, "timed_steps": len(timed),
                      "tokens_per_s": len(timed) * cfg["batch"] * cfg["seq"] / seconds,
                      "step_mean_s": seconds / len(timed), "step_median_s": statistics.median(timed),
                      "step_min_s": min(timed), "step_cpu_s": min(cpu), "peak_bytes": clock.peak, "load_peak_bytes": clock.load_peak,
                      "import_s": import_s, "rss_imports_bytes": rss_imports,
                      "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


# ---------------------------------------------------------------- the parent

def words_text(n_words, seed):
    """Seeded pseudo-English: words of the bundled demo text drawn with Zipf-like frequencies, so the
    data has statistics a model can learn, in blank-line separated paragraphs."""
    import numpy as np
    with open(os.path.join(ROOT, "minilora", "data", "demo.txt"), encoding="utf-8") as f:
        vocab = sorted(set(f.read().split()))
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(vocab) + 1)
    order = rng.permutation(len(vocab))
    words = [vocab[i] for i in order[rng.choice(len(vocab), n_words, p=p / p.sum())]]
    paragraphs = [" ".join(words[i:i + 120]) for i in range(0, n_words, 120)]
    return "\n\n".join(paragraphs) + "\n"


def prepare(workdir, name, shape, dtype, tokens_needed, regenerate):
    """Checkpoint + tokenizer + data for one shape, reused when present (``.done`` marks it complete)."""
    sys.path.insert(0, ROOT)
    from minilora.demo import write_tokenizer
    from minilora.synthetic import llama_config, write_llama_checkpoint
    folder = os.path.join(workdir, f"train-{name}-{dtype}")
    model, data = os.path.join(folder, "model"), os.path.join(folder, "data.txt")
    done = os.path.join(folder, ".done")
    stamp = json.dumps({"shape": shape, "dtype": dtype, "tokens": tokens_needed}, sort_keys=True)
    if regenerate or not os.path.exists(done) or open(done).read() != stamp:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(model)
        log(f"[{name}] writing a synthetic {dtype} Llama checkpoint {shape} + tokenizer + data to {folder}")
        with open(data, "w", encoding="utf-8") as f:
            f.write(words_text(int(tokens_needed * 1.2) + 1000, SEED))  # ~1 token per word (BPE on these words)
        vocab = write_tokenizer(model, data, vocab=min(shape["vocab"], 4000))
        if vocab > shape["vocab"]:
            raise SystemExit(f"tokenizer vocab {vocab} exceeds the model's {shape['vocab']}")
        write_llama_checkpoint(model, llama_config(**shape, dtype=dtype), seed=SEED, max_shard_bytes=5 * 10**9)
        with open(done, "w") as f:
            f.write(stamp)
    return folder, model, data


def spawn(kind, cfg):
    shutil.rmtree(cfg["out"], ignore_errors=True)
    t = str(cfg["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t,
               TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", kind, json.dumps(cfg)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} job failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), load_before=load,
                wall_s=time.perf_counter() - t0)


def compare(label, contenders, base_cfg, repeat, folder):
    """Run each (name, kind, settings) contender ``repeat`` times, alternating; keep each one's best run."""
    runs = {name: [] for name, _, _ in contenders}
    for rnd in range(repeat):
        for name, kind, extra in contenders:
            cfg = dict(base_cfg, **extra, out=os.path.join(folder, f"out-{name}"))
            r = spawn(kind, cfg)
            runs[name].append(r)
            log(f"[{label}] round {rnd + 1} {name:14s} {r['tokens_per_s']:8.0f} tok/s  step {r['step_mean_s']:.3f} s "
                f"(median {r['step_median_s']:.3f})  peak {r['peak_bytes'] / 2**20:7.0f} MiB  "
                f"loss {r['losses'][0]:.5f} -> {r['losses'][-1]:.5f}  load {r['load_before']:.1f}")
    best = {}
    for name, rs in runs.items():
        b = dict(max(rs, key=lambda r: r["tokens_per_s"]))
        b["all_tokens_per_s"] = [r["tokens_per_s"] for r in rs]
        b["loads"] = [r["load_before"] for r in rs]
        b["runs"] = [{k: r[k] for k in ("tokens_per_s", "step_mean_s", "step_median_s", "step_min_s", "step_cpu_s",
                                        "peak_bytes", "load_before")} for r in rs]
        b["peak_bytes"] = max(r["peak_bytes"] for r in rs)  # memory is deterministic-ish; report the worst
        best[name] = b
    return best


def loss_agreement(a, b):
    return {"first": (a["losses"][0], b["losses"][0]), "last": (a["losses"][-1], b["losses"][-1]),
            "max_abs_diff": max(abs(x - y) for x, y in zip(a["losses"], b["losses"])),
            "first_abs_diff": abs(a["losses"][0] - b["losses"][0])}


def verdict(value, target, higher_is_better):
    ok = value >= target if higher_is_better else value <= target
    return f"{'≥' if higher_is_better else '≤'} {target:.2f}", "PASS" if ok else "MISS"


def table(res, names):
    lines = ["| contender | tokens/s (best) | all runs tokens/s | step s mean / median / min | peak memory MiB | "
             "peak − RSS after imports MiB | load peak MiB | RSS after imports MiB | import s | CPU s / step (min) | "
             "loss first → last |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = res[name]
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {' / '.join(f'{x:,.0f}' for x in r['all_tokens_per_s'])} | "
                     f"{r['step_mean_s']:.3f} / {r['step_median_s']:.3f} / {r['step_min_s']:.3f} | "
                     f"{r['peak_bytes'] / 2**20:,.0f} | {(r['peak_bytes'] - r['rss_imports_bytes']) / 2**20:,.0f} | "
                     f"{r['load_peak_bytes'] / 2**20:,.0f} | {r['rss_imports_bytes'] / 2**20:,.0f} | {r['import_s']:.1f} | "
                     f"{r['step_cpu_s']:.2f} | "
                     f"{r['losses'][0]:.5f} → {r['losses'][-1]:.5f} |")
    return lines


def ratio_lines(rows):
    out = ["| ratio | value | target | result |", "|---|---|---|---|"]
    for label, value, target, higher in rows:
        if target is None:
            out.append(f"| {label} | {value:.3f} | (info) | |")
        else:
            t, ok = verdict(value, target, higher)
            out.append(f"| {label} | {value:.3f} | {t} | {ok} |")
    return out


def cpu_section(args, workdir):
    shape = dict(SHAPES["cpu"], **({"layers": args.layers} if args.layers else {}))
    tokens = args.steps * args.batch * (args.seq + 1)
    folder, model, data = prepare(workdir, "cpu", shape, "float32", tokens, args.regenerate)
    cfg = {"model": model, "data": data, "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
           "seq": args.seq, "threads": args.threads, "device": "cpu"}
    res = compare("cpu", [("minilora", "minilora", LORA), ("peft", "peft", LORA)], cfg, args.repeat, folder)
    a, b = res["minilora"], res["peft"]
    ratios = {"speed": a["tokens_per_s"] / b["tokens_per_s"], "mem": a["peak_bytes"] / b["peak_bytes"],
              "speed_min_step": min(r["step_min_s"] for r in b["runs"]) / min(r["step_min_s"] for r in a["runs"]),
              "cpu_per_step": a["step_cpu_s"] / b["step_cpu_s"]}
    out = {"shape": shape, "config": cfg, "runs": res, "ratios": ratios, "loss": loss_agreement(a, b)}
    if args.cpu_qlora:  # information, no target: QLoRA on the CPU (minilora's C kernels vs bitsandbytes' CPU path)
        q = compare("cpu-qlora", [("minilora-qlora", "minilora", QLORA), ("peft-bnb-qlora", "peft", QLORA)], cfg,
                    args.repeat, folder)
        out["qlora"] = {"runs": q, "speed": q["minilora-qlora"]["tokens_per_s"] / q["peft-bnb-qlora"]["tokens_per_s"],
                        "mem": q["minilora-qlora"]["peak_bytes"] / q["peft-bnb-qlora"]["peak_bytes"]}
    if args.profile:
        prof = os.path.join(workdir, "train_profile_minilora.txt")
        spawn("minilora", dict(cfg, qlora=False, out=os.path.join(folder, "out-profile"), profile=prof))
        prof_b = os.path.join(workdir, "train_profile_peft.txt")
        spawn("peft", dict(cfg, qlora=False, out=os.path.join(folder, "out-profile-peft"), profile=prof_b))
        out["profiles"] = [prof, prof_b]
    return out


def cuda_section(args, workdir):
    shape = dict(SHAPES[args.shape], **({"layers": args.layers} if args.layers else {}))
    seq, batch = args.cuda_seq, args.cuda_batch
    tokens = args.steps * batch * (seq + 1)
    folder, model, data = prepare(workdir, args.shape + (f"-{shape['layers']}l" if args.layers else ""), shape,
                                  "bfloat16", tokens, args.regenerate)
    cfg = {"model": model, "data": data, "steps": args.steps, "warmup": args.warmup, "batch": batch, "seq": seq,
           "threads": args.threads, "device": "cuda:0"}
    contenders = [("minilora-lora", "minilora", LORA), ("peft-lora", "peft", LORA),
                  ("minilora-qlora", "minilora", QLORA), ("peft-bnb-qlora", "peft", QLORA)]
    if args.eager:  # information: minilora without torch.compile (--no-compile)
        contenders += [("minilora-lora-eager", "minilora", dict(LORA, compile=False)),
                       ("minilora-qlora-eager", "minilora", dict(QLORA, compile=False))]
    res = compare("cuda", contenders, cfg, args.repeat, folder)
    ml, pl, mq, pq = (res[n] for n, _, _ in contenders[:4])
    profiles = []
    if args.profile:  # one torch.profiler'd run of each contender (CPU + CUDA activity), tables sorted by GPU time
        for name, kind, extra in contenders[:4]:
            prof = os.path.join(workdir, f"train_profile_cuda_{name}.txt")
            spawn(kind, dict(cfg, **extra, out=os.path.join(folder, f"out-profile-{name}"), profile=prof))
            profiles.append(prof)
    ratios = {"speed": ml["tokens_per_s"] / pl["tokens_per_s"],
              "qlora_mem": mq["peak_bytes"] / pq["peak_bytes"],
              "qlora_time": mq["step_mean_s"] / ml["step_mean_s"],
              "qlora_time_median": mq["step_median_s"] / ml["step_median_s"],
              "ours_qlora_mem": mq["peak_bytes"] / ml["peak_bytes"],
              "peft_qlora_time": pq["step_mean_s"] / pl["step_mean_s"],
              "peft_qlora_mem": pq["peak_bytes"] / pl["peak_bytes"],
              "qlora_speed": mq["tokens_per_s"] / pq["tokens_per_s"]}
    if args.eager:
        ratios["compile_lora"] = ml["tokens_per_s"] / res["minilora-lora-eager"]["tokens_per_s"]
        ratios["compile_qlora"] = mq["tokens_per_s"] / res["minilora-qlora-eager"]["tokens_per_s"]
    return {"shape": shape, "config": cfg, "runs": res, "ratios": ratios, "profiles": profiles,
            "loss": {"lora": loss_agreement(ml, pl), "qlora": loss_agreement(mq, pq)}}


def markdown(meta, cpu, cuda):
    lines = [f"# minilora train vs PEFT + transformers — {meta['date']}", "",
             f"Machine: {meta['cpu']}, {meta['cores']} logical CPUs, {meta['ram_gib']:.0f} GiB RAM{meta['gpu']}. "
             f"Versions: {meta['versions']}.", "", f"Command: `{meta['command']}`", "", f"Method: {meta['method']}", ""]
    if cpu:
        s, c = cpu["shape"], cpu["config"]
        lines += [f"## CPU, float32: Llama hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
                  f"{s['heads']} heads, vocab {s['vocab']}; batch {c['batch']} × {c['seq']}, LoRA r={RANK} alpha={ALPHA} "
                  f"on all 7 linear layers, {c['steps']} steps ({c['warmup']} warm-up steps not timed), "
                  f"{c['threads']} threads", ""]
        lines += table(cpu["runs"], ["minilora", "peft"])
        q = cpu["ratios"]
        lines += ["", *ratio_lines([("minilora / PEFT tokens/s", q["speed"], TARGETS["speed"], True),
                                    ("minilora / PEFT peak RSS", q["mem"], TARGETS["mem"], False),
                                    ("PEFT / minilora fastest single step (least disturbed by other jobs)",
                                     q["speed_min_step"], None, True),
                                    ("minilora / PEFT process CPU s per step (min)", q["cpu_per_step"], None, False)]), ""]
        lo = cpu["loss"]
        lines.append(f"Same computation: first loss minilora {lo['first'][0]:.6f} vs PEFT {lo['first'][1]:.6f} "
                     f"(|Δ| {lo['first_abs_diff']:.2e}); last {lo['last'][0]:.6f} vs {lo['last'][1]:.6f}; largest "
                     f"|Δ| over all steps {lo['max_abs_diff']:.2e}.")
        lines.append("")
        if "qlora" in cpu:
            lines += ["### QLoRA on the CPU (`--cpu-qlora`, information, no target)", "",
                      "minilora `--qlora --double-quant` (float32 compute, the C dequantiser) against PEFT + "
                      "bitsandbytes 4-bit NF4 with double quantisation (its CPU path, bfloat16 weights and compute): "
                      "not the same arithmetic, so the losses differ a little.", ""]
            lines += table(cpu["qlora"]["runs"], ["minilora-qlora", "peft-bnb-qlora"])
            lines += ["", *ratio_lines([("minilora / PEFT + bnb tokens/s (QLoRA, CPU)", cpu["qlora"]["speed"], None, True),
                                        ("minilora / PEFT + bnb peak RSS (QLoRA, CPU)", cpu["qlora"]["mem"], None,
                                         False)]), ""]
    if cuda is None:
        lines += ["## CUDA (LoRA and QLoRA)", "", "Did not run: `torch.cuda.is_available()` is False on this machine "
                  "(no GPU). On a GPU this section compares minilora LoRA / QLoRA with PEFT LoRA / PEFT + "
                  f"bitsandbytes QLoRA on `--shape 7b` (cut with `--layers`), batch 4 × 512. Reference: {REFERENCE}.", ""]
    else:
        s, c = cuda["shape"], cuda["config"]
        lines += [f"## CUDA, bfloat16 (autocast): Llama hidden {s['hidden']}, intermediate {s['intermediate']}, "
                  f"{s['layers']} layers, vocab {s['vocab']}; batch {c['batch']} × {c['seq']}, r={RANK} all linear", ""]
        lines += table(cuda["runs"], list(cuda["runs"]))
        q = cuda["ratios"]
        lines += ["", *ratio_lines([
            ("minilora / PEFT tokens/s (LoRA)", q["speed"], TARGETS["speed"], True),
            ("minilora QLoRA / PEFT + bnb QLoRA peak memory", q["qlora_mem"], TARGETS["qlora_mem"], False),
            ("minilora QLoRA step / minilora LoRA step", q["qlora_time"], TARGETS["qlora_time"], False),
            ("the same by median step (robust to a few slow steps)", q["qlora_time_median"], None, False),
            ("minilora QLoRA / LoRA peak memory", q["ours_qlora_mem"], None, False),
            ("PEFT + bnb QLoRA step / PEFT LoRA step", q["peft_qlora_time"], None, False),
            ("PEFT + bnb QLoRA / PEFT LoRA peak memory", q["peft_qlora_mem"], None, False),
            ("minilora / PEFT + bnb tokens/s (QLoRA)", q["qlora_speed"], None, True),
            *([("minilora compiled / eager tokens/s (LoRA)", q["compile_lora"], None, True),
               ("minilora compiled / eager tokens/s (QLoRA)", q["compile_qlora"], None, True)]
              if "compile_lora" in q else [])]), ""]
        lines.append(f"QLoRA cost here: minilora {100 * (q['qlora_time'] - 1):+.0f} % time, "
                     f"{100 * (q['ours_qlora_mem'] - 1):+.0f} % memory; PEFT + bitsandbytes "
                     f"{100 * (q['peft_qlora_time'] - 1):+.0f} % time, {100 * (q['peft_qlora_mem'] - 1):+.0f} % memory. "
                     f"Reference: {REFERENCE}.")
        for k, lo in cuda["loss"].items():
            lines.append(f"- {k}: first loss {lo['first'][0]:.5f} vs {lo['first'][1]:.5f}, last {lo['last'][0]:.5f} "
                         f"vs {lo['last'][1]:.5f}, largest |Δ| over all steps {lo['max_abs_diff']:.2e}")
        lines.append("")
    return "\n".join(lines)


def versions():
    from importlib.metadata import version
    out = []
    for p in ("torch", "transformers", "peft", "bitsandbytes", "tokenizers", "numpy"):
        try:
            out.append(f"{p} {version(p)}")
        except Exception:  # not installed: say so rather than fail
            out.append(f"{p} (not installed)")
    return ", ".join(out) + f", Python {platform.python_version()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--batch", type=int, default=4, help="rows per step (CPU)")
    p.add_argument("--seq", type=int, default=256, help="tokens per row (CPU)")
    p.add_argument("--cuda-batch", type=int, default=4, help="rows per step (CUDA)")
    p.add_argument("--cuda-seq", type=int, default=512, help="tokens per row (CUDA)")
    p.add_argument("--shape", choices=["7b", "cpu"], default="7b", help="model shape of the CUDA part")
    p.add_argument("--layers", type=int, default=None, help="cut the model to this many layers")
    p.add_argument("--repeat", type=int, default=2, help="alternating runs per contender; the best is kept")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every job")
    p.add_argument("--quick", action="store_true", help="8 steps (2 warm-up), one round")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU part (e.g. on a GPU machine)")
    p.add_argument("--profile", action="store_true", help="one torch.profiler'd run of each contender (CPU; on CUDA with GPU times)")
    p.add_argument("--eager", action="store_true", help="also minilora without torch.compile on CUDA (information)")
    p.add_argument("--cpu-qlora", action="store_true", help="also QLoRA on the CPU vs PEFT + bitsandbytes (information)")
    p.add_argument("--workdir", default=os.path.join(HERE, "out"), help="scratch folder (checkpoints, outputs)")
    p.add_argument("--regenerate", action="store_true", help="rewrite the synthetic checkpoints")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeat = 8, 2, 1
    if args.steps < args.warmup + 2 or args.warmup < 1:
        p.error("--steps must exceed --warmup by at least 2, and --warmup must be at least 1")
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    import torch  # only to ask for a GPU; the jobs run in children
    has_cuda = torch.cuda.is_available()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(),
            "cores": os.cpu_count(), "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "gpu": f", GPU {torch.cuda.get_device_name(0)}" if has_cuda else ", no GPU",
            "versions": versions(), "command": "python bench/train.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "method": (f"each run in a fresh subprocess; contenders alternate (A, B, A, B, ...) {args.repeat} time(s) "
                       f"and the best tokens/s of each is kept, because other jobs share this machine's cores "
                       f"(1-min load average before the runs: {{loads}}); a step is timed from the end of one "
                       f"optimizer.step() to the end of the next, the first {args.warmup} steps are not timed; "
                       f"tokens/s = batch × seq × timed steps / their time; peak memory = peak RSS (VmHWM) of "
                       f"the child at the end of the last step on CPU (it includes the imports: see the column), "
                       f"torch.cuda.max_memory_allocated over the training steps on CUDA (the load peak is shown "
                       f"apart); PEFT's lora_A re-drawn with minilora's seeded initialiser, so both losses must agree "
                       f"at every step.")}
    cpu = None if args.no_cpu else cpu_section(args, workdir)
    cuda = cuda_section(args, workdir) if has_cuda else None
    sections = [cpu, cuda] + ([cpu["qlora"]] if cpu and "qlora" in cpu else [])
    loads = [x for sec in sections if sec for r in sec["runs"].values() for x in r["loads"]]
    meta["method"] = meta["method"].replace("{loads}", f"{min(loads):.1f}–{max(loads):.1f}" if loads else "-")
    text = markdown(meta, cpu, cuda)
    with open(os.path.join(workdir, "train_results.md"), "w") as f:
        f.write(text + "\n")
    report = {"meta": meta, "cpu": cpu, "cuda": cuda if has_cuda else "did not run: no CUDA device"}
    with open(os.path.join(workdir, "train_results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2) if args.json else text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        run_child(sys.argv[2], sys.argv[3])
    else:
        main()
