"""``minilora merge`` and ``minilora unmerge``: parse, call ``minilora.merge``, print."""
import math

import click

from minilora.merge import merge_checkpoint

from .common import force_option, fsync_option, human_bytes, json_option, print_json, quiet_option

_DTYPES = click.Choice(["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"])


def _summary(report):
    for adapter, renames in report.get("renamed_modules", {}).items():
        rules = ", ".join(f"{p or '(none)'} -> {q}" for p, q in renames.items())
        click.echo(f"note: {adapter}: module names mapped onto the checkpoint's: {rules}", err=True)
    t = report["totals"]
    verb = "merged" if report["operation"] == "merge" else "unmerged"
    click.echo(f"{verb} {len(report['adapters'])} adapter(s) into {t['changed']} of {t['tensors']} tensors; "
               f"wrote {report['output']} ({human_bytes(t['bytes'])}, {t['seconds']:.2f} s, "
               f"{t['mb_per_s']:.0f} MB/s)")
    if report["operation"] == "unmerge":
        rows = [r for r in report["tensors"] if "roundtrip_max_abs_error" in r]
        if rows:
            worst = max(rows, key=lambda r: r["roundtrip_max_abs_error"])
            exact = min(r["roundtrip_bit_exact_fraction"] for r in rows)
            click.echo(f"round trip merge(unmerge(W')) vs W': max |error| {worst['roundtrip_max_abs_error']:.3g} "
                       f"({worst['name']}), bit-exact fraction >= {_floor(exact)}")


def _floor(fraction, digits=4):
    """``fraction`` rounded down to ``digits`` decimals: 0.99999 prints 0.9999, 1 only when it is 1."""
    scaled = math.floor(fraction * 10**digits) / 10**digits
    return f"{scaled:.{digits}f}"


@click.command()
@click.argument("base", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file (.safetensors) or folder.")
@click.option("--scale", default=1.0, show_default=True, type=float,
              help="Extra multiplier on every adapter's alpha/r (like llama.cpp --lora-scaled).")
@click.option("--dtype", type=_DTYPES, default=None, help="Output dtype of float tensors (default: keep).")
@click.option("--requantize", is_flag=True,
              help="4-bit base: quantise the merged weights again (lossy; the report says how much of ΔW survived).")
@click.option("--nested-offset", "offset_mean", type=click.Choice(["exact", "torch"]), default="exact",
              show_default=True, help="With --requantize on a double-quantised base: the offset as the correctly "
              "rounded mean of the absmax values, or as bitsandbytes' torch.mean on the CPU ('torch' gives PEFT's "
              "merged bytes; the last bit of the offset differs in about half the tensors).")
@click.option("--merge-tied-embeddings", "tied_ok", is_flag=True,
              help="Merge an embedding LoRA even where the output layer is tied to that embedding "
                   "(tie_word_embeddings): the output layer changes too, as with PEFT's merge_and_unload.")
@fsync_option
@force_option
@json_option
@quiet_option
def merge(base, adapters, output, scale, dtype, requantize, offset_mean, tied_ok, fsync, force, as_json, quiet):
    """Merge one or more PEFT LoRA adapters into BASE: W' = W + scale·(alpha/r)·B A, one rounding.

    BASE is a .safetensors file, a sharded checkpoint folder or a model folder (also a 4-bit
    bitsandbytes one: it is dequantised, or re-quantised with --requantize); each ADAPTER a PEFT
    adapter folder or adapter_model.safetensors. Streams tensor by tensor; other tensors are copied
    byte for byte; config and tokenizer files come along.

    \b
    Example:
      minilora merge ./Llama-3.2-1B ./my-adapter -o ./merged
    """
    report = merge_checkpoint(base, list(adapters), output, scale=scale, dtype=dtype, force=force,
                              quiet=quiet or as_json, sign=+1, requantize=requantize, durable=fsync,
                              tied_ok=tied_ok, offset_mean=offset_mean)
    print_json(report) if as_json else _summary(report)


@click.command()
@click.argument("merged", type=click.Path(exists=True))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output file (.safetensors) or folder.")
@click.option("--scale", default=1.0, show_default=True, type=float, help="The --scale used when merging.")
@click.option("--dtype", type=_DTYPES, default=None, help="Output dtype of float tensors (default: keep).")
@fsync_option
@force_option
@json_option
@quiet_option
def unmerge(merged, adapters, output, scale, dtype, fsync, force, as_json, quiet):
    """Subtract adapters from a MERGED checkpoint: W = W' − scale·(alpha/r)·B A.

    Exact up to rounding in float32; in bfloat16 / float16 it is not an exact inverse, and the
    report says how far merge(unmerge(W')) lands from W'. DoRA merges cannot be undone.

    \b
    Example:
      minilora unmerge ./merged ./my-adapter -o ./base-again
    """
    report = merge_checkpoint(merged, list(adapters), output, scale=scale, dtype=dtype, force=force,
                              quiet=quiet or as_json, sign=-1, durable=fsync)
    print_json(report) if as_json else _summary(report)
