"""``minilora train`` and ``minilora generate`` (torch is imported only when they run)."""

import os

import click

from minilora.errors import InputError

from .common import json_option, print_json, quiet_option


def _has_nf4_weights(model_dir):
    """The folder holds bitsandbytes-layout NF4 weights (read from the safetensors headers only)."""
    from minilora.checkpoint import Checkpoint
    from minilora.nf4_checkpoint import quantized_weights
    with Checkpoint(model_dir) as ckpt:
        return bool(quantized_weights(ckpt.keys()))


def _torch_backend():
    """Import the torch backend, or fail with one line (exit 2) saying how to install torch."""
    try:
        import minilora.torch_backend  # noqa: F401
    except ImportError as e:
        raise InputError(str(e)) from None


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Hugging Face Llama-family model folder (config.json, safetensors, tokenizer.json).")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help=".txt, or .jsonl with text / instruction+input+output / messages.")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output adapter folder.")
@click.option("--rank", default=8, show_default=True)
@click.option("--alpha", type=float, default=None, help="LoRA alpha [default: 2 × rank].")
@click.option("--targets", default=None, help="Comma-separated layer names or 'attn' / 'mlp' [default: all linear layers].")
@click.option("--dropout", default=0.0, show_default=True)
@click.option("--rslora", is_flag=True, help="Scale by alpha/√r.")
@click.option("--dora", is_flag=True, help="Weight-decomposed LoRA.")
@click.option("--qlora", is_flag=True, help="Quantise the frozen base to NF4 (QLoRA).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option("--lr", default=2e-4, show_default=True)
@click.option("--scheduler", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True)
@click.option("--warmup", default=0, show_default=True, help="Warmup steps.")
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--epochs", default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimiser steps.")
@click.option("--batch-size", default=4, show_default=True, help="Rows per process per micro-batch.")
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--max-grad-norm", default=1.0, show_default=True, help="0 disables clipping.")
@click.option("--grad-checkpointing", is_flag=True)
@click.option("--max-length", default=256, show_default=True, help="Tokens per packed row.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Base weight dtype [default: float32 on CPU, bfloat16 autocast on CUDA].")
@click.option("--eval-split", default=0.0, show_default=True, help="Share of examples held out for eval loss.")
@click.option("--eval-every", default=0, show_default=True, help="Evaluate every N steps (and at the end).")
@click.option("--save-every", default=0, show_default=True, help="Save a resumable checkpoint every N steps.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT/checkpoint.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: cuda if present, else cpu].")
@click.option("--compile/--no-compile", "compile", default=None,
              help="torch.compile each decoder block (fused element-wise kernels, fewer launches; the first "
                   "steps pay the compilation) [default: on CUDA yes, on the CPU no].")
@json_option
@quiet_option
def train(model_dir, data_path, output, resume, as_json, quiet, **options):
    """Train a LoRA / QLoRA adapter on a Llama-family checkpoint; write a PEFT adapter folder,
    train_log.jsonl, loss.png and train_summary.json. The same command runs under
    `torchrun --nproc_per_node N minilora train ...` (DDP; only rank 0 writes).

    \b
    Example:
      minilora train --model ./TinyLlama --data alpaca.jsonl -o ./adapter --rank 16 --max-steps 200
    """
    _torch_backend()
    from minilora.torch_backend.train import train as run
    from minilora.torch_backend.train_state import TrainOptions

    summary = run(model_dir, data_path, output, TrainOptions(**options), resume=resume, quiet=quiet or as_json)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports (and writes)
        return None
    if as_json:
        return print_json(summary)
    click.echo(f"trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
               + (f", eval {summary['eval_loss']:.4f}" if "eval_loss" in summary else "")
               + f"; {summary['trainable_parameters']:,} trainable parameters, {summary['tokens_per_second']:,.0f} tok/s, "
               f"peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB; adapter in {summary['adapter']}")


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--adapter", type=click.Path(exists=True), default=None, help="A PEFT adapter folder to apply.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=None)
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="cpu, cuda, cuda:1 [default: cuda if present, else cpu].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype [default: the checkpoint's; float32 for an NF4 folder on the CPU].")
@click.option("--nf4-matmul", type=click.Choice(["exact", "int16"]), default="exact", show_default=True,
              help="NF4 layers on the CPU (float32): the exact C matmul, or the faster approximate int16 GEMV "
                   "(error about 1e-5 of |x|·|w|, up to 3e-5 for same-sign x; docs/nf4.md §7).")
@click.argument("prompt")
@json_option
def generate(model_dir, adapter, max_new_tokens, temperature, top_k, seed, device, dtype, nf4_matmul, prompt,
             as_json):
    """Continue PROMPT with the model (and an adapter), greedy or sampled, with a KV cache.

    \b
    Example:
      minilora generate --model ./TinyLlama --adapter ./adapter "Once upon a time"
    """
    _torch_backend()
    import torch

    from minilora import data
    from minilora.torch_backend import generate as gen, load_adapter_into, load_llama
    from minilora.torch_backend.qlora import set_nf4_matmul_mode

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None and dev.type == "cpu" and _has_nf4_weights(model_dir):
        dtype = "float32"  # the C kernels serve NF4 layers in float32; the other tensors of an NF4 folder are small
    tok, eos, _ = data.load_tokenizer(model_dir)
    model = load_llama(model_dir, dtype=getattr(torch, dtype) if dtype else None, device=dev)
    if nf4_matmul == "int16" and (dev.type != "cpu" or model.model.embed_tokens.weight.dtype != torch.float32):
        raise InputError("--nf4-matmul int16 runs on the CPU in float32 only (--device cpu --dtype float32)")
    set_nf4_matmul_mode(model, nf4_matmul)
    if adapter:
        load_adapter_into(model, adapter)
    model.eval()
    ids = torch.tensor(tok.encode(prompt, add_special_tokens=False).ids, dtype=torch.long, device=dev)
    out = gen(model, ids, max_new_tokens, temperature, top_k, torch.Generator(device=dev).manual_seed(seed), eos)
    text = tok.decode(out[0, len(ids):].tolist())
    if as_json:
        return print_json({"prompt": prompt, "completion": text, "ids": out[0].tolist()})
    click.echo(prompt + text)
