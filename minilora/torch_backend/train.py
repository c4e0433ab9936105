"""The LoRA / QLoRA trainer: one CPU, one GPU, or several processes under torchrun (DDP).

Loss: token-level cross-entropy summed over the target tokens of a *global* batch (``batch_size ×
grad_accum × world_size`` rows) and divided by their count, so 1 process and N processes with the same
global batch compute the same gradient up to summation order. Data order: a permutation of the packed
rows per epoch from ``seed + epoch``; step ``i`` takes rows ``[i·G, (i+1)·G)`` of it, and rank ``r`` the
``r``-th ``batch_size`` slice of each micro-batch. Learning rate: a pure function of the step. Together
with the saved optimizer and RNG state this makes ``--resume`` continue bit for bit on CPU.
Only rank 0 writes. Not here: data formats (``minilora.data``), the model (``model.py``), the CLI.
"""
import contextlib
import ctypes
import hashlib
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from minilora import data
from minilora.errors import InputError
from minilora.plot import line_plot
from minilora.torch_backend.adapters import apply_lora, export_adapter, quantize_model
from minilora.torch_backend.model import load_llama
from minilora.torch_backend.train_state import TrainOptions, load_checkpoint, save_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def lr_at(step, total, opts):
    """The learning rate of optimiser step ``step`` (0-based): linear warmup, then the schedule."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    if opts.scheduler == "constant":
        return opts.lr
    progress = (step - opts.warmup) / max(1, total - opts.warmup)
    if opts.scheduler == "linear":
        return opts.lr * max(0.0, 1.0 - progress)
    return opts.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _dist(requested=None):
    """``(rank, world, device)``, initialising torch.distributed under torchrun: NCCL when the processes
    train on GPUs, gloo on the CPU. The device is ``requested`` (``--device``; a plain ``cuda`` means this
    process's GPU, ``cuda:LOCAL_RANK``), else this process's GPU when there is one, else the CPU."""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    name = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def prepare_data(model_dir, data_path, opts):
    """Packed train and eval rows ``(ids (R, L+1), mask (R, L))`` and a fingerprint of the data."""
    tok, eos, template = data.load_tokenizer(model_dir)
    examples = data.read_examples(data_path)
    order = np.random.default_rng(opts.seed).permutation(len(examples))
    n_eval = int(round(len(examples) * opts.eval_split)) if opts.eval_split > 0 else 0
    if opts.eval_split > 0 and (n_eval == 0 or n_eval == len(examples)):
        raise InputError(f"--eval-split {opts.eval_split} leaves no train or no eval example "
                         f"({len(examples)} examples)", data_path)
    encoded = [data.tokenize_example(examples[i], tok, eos, template) for i in order]
    train = data.pack(encoded[n_eval:], opts.max_length)
    evals = data.pack(encoded[:n_eval], opts.max_length) if n_eval else None
    vocab = load_config(model_dir).get("vocab_size")
    if vocab is not None and int(train[0].max()) >= vocab:
        raise InputError(f"the tokenizer produces token id {int(train[0].max())} but the model's vocab_size "
                         f"is {vocab} (tokenizer and model do not belong together)", model_dir)
    digest = hashlib.sha256(open(data_path, "rb").read()).hexdigest()
    return train, evals, digest


def _loss_sum(model, ids, mask, device, autocast):
    """Sum of the token cross-entropies over the masked targets of ``ids (b, L+1)``, in float32."""
    ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        return model(ids[:, :-1], labels=ids[:, 1:], label_weights=mask)  # fused with the output projection


def evaluate(model, rows, opts, device, autocast):
    ids, mask = rows
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(ids), opts.batch_size):
            total += float(_loss_sum(model, ids[i:i + opts.batch_size], mask[i:i + opts.batch_size], device, autocast))
    model.train()
    return total / max(1, int(mask.sum()))


def build_model(model_dir, opts, device):
    on_cuda = device.type == "cuda"
    dtype = DTYPES[opts.dtype] if opts.dtype else (torch.bfloat16 if on_cuda else torch.float32)
    model = load_llama(model_dir, dtype=dtype, device=device)
    if opts.qlora:
        quantize_model(model, opts.targets, double_quant=opts.double_quant, compute_dtype=dtype)
    try:
        params = apply_lora(model, opts.targets, opts.rank, opts.alpha, opts.dropout, opts.rslora, opts.dora,
                            seed=opts.seed)
    except ValueError as e:
        raise InputError(str(e), model_dir) from None
    model.gradient_checkpointing = opts.grad_checkpointing
    if compile_wanted(opts, device):
        compile_blocks(model)
    return model.train(), list(params), on_cuda and dtype == torch.bfloat16


def compile_wanted(opts, device):
    """``--compile`` / ``--no-compile``, else the default: compiled on CUDA, eager on the CPU (no gain there)."""
    return opts.compile if opts.compile is not None else device.type == "cuda"


def compile_blocks(model):
    """``torch.compile`` every decoder block in place (``nn.Module.compile``: names, parameters and the adapter
    export are unchanged). All blocks share one compiled graph per autograd situation (the first block's
    input needs no gradient, the others' do), so a model of any depth compiles about twice, in its first
    steps. Inductor fuses RMSNorm, RoPE, SwiGLU, the residual adds and the LoRA scaling into a few Triton
    kernels and replaces hundreds of kernel launches per block by a handful; the matrix products stay
    cuBLAS's. NF4 base layers stay inside the graph on CUDA (their dequantiser is a ``triton_op``) and run
    eagerly between compiled pieces on the CPU (the C kernels; ``NF4Linear.forward``)."""
    import torch._dynamo
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
    for block in model.model.layers:
        block.compile()


def keep_freed_memory():
    """Let glibc reuse freed activation memory instead of handing it back to the kernel after every step.

    By default glibc serves large blocks with fresh ``mmap`` pages (the threshold starts at 128 KiB and
    rises towards 32 MiB as such blocks are freed) and trims the heap top whenever more than twice that
    threshold is free, so each training step page-faults much of its activation memory in again, zero-filled
    by the kernel (6.7 k faults per step on bench/train.py's shape, 1 with this). Fixing the mmap threshold at 32 MiB and the trim
    threshold at 1 GiB keeps that memory in the heap between steps (a known CPU-training tweak; tcmalloc and
    jemalloc do the same). Peak RSS is unchanged: it is memory the step held anyway. On a non-glibc system
    this does nothing. Set ``MINILORA_MALLOC_DEFAULTS=1`` to skip it.
    """
    if os.environ.get("MINILORA_MALLOC_DEFAULTS") == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


def train(model_dir, data_path, out_dir, opts=None, resume=False, quiet=False):
    """Train an adapter; write it (PEFT folder), ``train_log.jsonl``, ``loss.png`` and
    ``train_summary.json`` into ``out_dir``; return the summary."""
    opts = opts or TrainOptions()
    rank, world, device = _dist(opts.device)
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(opts.seed)
    (ids, mask), evals, digest = prepare_data(model_dir, data_path, opts)
    model, params, autocast = build_model(model_dir, opts, device)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt_cls = torch.optim.AdamW if opts.optimizer == "adamw" else torch.optim.SGD
    extra = {"weight_decay": opts.weight_decay} if opts.optimizer == "adamw" else {"weight_decay": opts.weight_decay, "momentum": 0.9}
    optimizer = opt_cls(params, lr=opts.lr, **extra)
    G = opts.batch_size * opts.grad_accum * world  # rows per optimiser step
    per_epoch = max(1, len(ids) // G)
    total = opts.max_steps or per_epoch * opts.epochs
    fingerprint = {"model": json.dumps(load_config(model_dir), sort_keys=True), "data": digest, "world": world}
    ckpt_dir = os.path.join(out_dir, "checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    step, log = 0, []
    if resume:
        step, log = load_checkpoint(ckpt_dir, params, optimizer, opts, fingerprint)
    trainable = sum(p.numel() for p in params)
    if rank == 0 and not quiet and compile_wanted(opts, device) and step < total:
        print("compiling the decoder blocks (torch.compile): the first step takes longer; --no-compile skips it",
              file=sys.stderr, flush=True)
    t0, tokens_seen = time.perf_counter(), 0
    while step < total:
        epoch, pos = divmod(step, per_epoch)
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(opts.seed + epoch)).numpy()
        rows = perm[(pos * G) % len(ids):][:G]
        if len(rows) < G:  # fewer rows than one global batch: wrap around
            rows = np.resize(perm, G)
        global_tokens = int(mask[rows].sum())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, opts)
        loss_total = torch.zeros((), device=device)
        for micro in range(opts.grad_accum):
            chunk = rows[micro * opts.batch_size * world:(micro + 1) * opts.batch_size * world]
            mine = chunk[rank * opts.batch_size:(rank + 1) * opts.batch_size]
            sync = world == 1 or micro == opts.grad_accum - 1
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                part = _loss_sum(model, ids[mine], mask[mine], device, autocast)
                (part * world / max(1, global_tokens)).backward()  # DDP averages over ranks
            loss_total += part.detach()
        if world > 1:
            dist.all_reduce(loss_total)
        norm = torch.nn.utils.clip_grad_norm_(params, opts.max_grad_norm) if opts.max_grad_norm > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += G * opts.max_length
        row = {"step": step, "loss": float(loss_total) / max(1, global_tokens), "lr": lr_at(step - 1, total, opts),
               "grad_norm": None if norm is None else float(norm), "tokens": step * G * opts.max_length}
        if evals is not None and opts.eval_every and (step % opts.eval_every == 0 or step == total):
            row["eval_loss"] = evaluate(model, evals, opts, device, autocast)
        log.append(row)
        if rank == 0:
            _progress(row, step, total, tokens_seen, time.perf_counter() - t0, quiet)
            if opts.save_every and step % opts.save_every == 0 and step < total:
                save_checkpoint(ckpt_dir, step, params, optimizer, opts, fingerprint, log)
        _test_kill_hook(step)
    summary = _finish(model, params, evals, opts, device, autocast, out_dir, log, trainable, t0, tokens_seen,
                      model_dir, rank)
    if world > 1:
        dist.barrier()
    return summary


def load_config(model_dir):
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def _test_kill_hook(step):
    """Tests of --resume kill the run with SIGKILL right after a given step (no cleanup runs)."""
    if os.environ.get("MINILORA_TEST_KILL_AT_STEP") == str(step):
        os.kill(os.getpid(), 9)


def _progress(row, step, total, tokens, elapsed, quiet):
    if quiet:
        return
    rate = tokens / max(elapsed, 1e-9)
    eta = (total - step) * elapsed / max(step, 1)
    extra = f" eval {row['eval_loss']:.4f}" if "eval_loss" in row else ""
    print(f"step {step}/{total} loss {row['loss']:.4f}{extra} lr {row['lr']:.2e} "
          f"{rate:,.0f} tok/s ETA {eta:.0f}s", file=sys.stderr, flush=True)


def _finish(model, params, evals, opts, device, autocast, out_dir, log, trainable, t0, tokens, model_dir, rank):
    core = model.module if hasattr(model, "module") else model
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    summary = {"steps": len(log), "trainable_parameters": trainable, "final_loss": log[-1]["loss"] if log else None,
               "first_loss": log[0]["loss"] if log else None, "seconds": round(seconds, 3),
               "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), "peak_memory_bytes": int(peak),
               "device": str(device), "adapter": os.path.abspath(out_dir)}
    if evals is not None:
        summary["eval_loss"] = evaluate(core, evals, opts, device, autocast)
    if rank == 0:
        export_adapter(core, out_dir, base_model_name_or_path=os.path.abspath(model_dir))
        with open(os.path.join(out_dir, "train_log.jsonl"), "w", encoding="utf-8") as f:
            for row in log:
                f.write(json.dumps(row) + "\n")
        series = {"train": ([r["step"] for r in log], [r["loss"] for r in log])}
        ev = [r for r in log if "eval_loss" in r]
        if ev:
            series["eval"] = ([r["step"] for r in ev], [r["eval_loss"] for r in ev])
        if log:
            line_plot(series, os.path.join(out_dir, "loss.png"))
        with open(os.path.join(out_dir, "train_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary
