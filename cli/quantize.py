"""``minilora quantize`` and ``minilora dequantize``: parse, call ``minilora.quantize``, print."""
import click

from minilora.quantize import dequantize_checkpoint, quantize_checkpoint
from minilora.tables import ALLOWED_BLOCKSIZES, DEFAULT_BLOCKSIZE

from .common import force_option, human_bytes, json_option, print_json, quiet_option


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output model folder.")
@click.option("--blocksize", type=click.Choice([str(b) for b in ALLOWED_BLOCKSIZES]),
              default=str(DEFAULT_BLOCKSIZE), show_default=True, help="Elements per absmax block.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantise the absmax values too (QLoRA's DQ: 4.127 instead of 4.5 bits/parameter).")
@click.option("--quant-type", type=click.Choice(["nf4", "fp4"]), default="nf4", show_default=True)
@click.option("--include", multiple=True, metavar="GLOB",
              help="Quantise the modules matching GLOB (e.g. 'model.layers.*.mlp.*') instead of the default.")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Keep the modules matching GLOB in float.")
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="bnb_4bit_compute_dtype in quantization_config: the dtype transformers "
              "computes the 4-bit layers in (float32 is BitsAndBytesConfig's default).")
@click.option("--nested-offset", "offset_mean", type=click.Choice(["exact", "torch"]), default="exact",
              show_default=True, help="Double quantisation's offset: the correctly rounded mean of the absmax "
              "values, or bitsandbytes' torch.mean on the CPU (its last bit differs in about half the tensors; "
              "'torch' reproduces transformers' own CPU save tensor for tensor).")
@force_option
@json_option
@quiet_option
def quantize(model, output, blocksize, double_quant, quant_type, include, exclude, compute_dtype, offset_mean, force,
             as_json, quiet):
    """Quantise a Hugging Face model folder to NF4, in the layout transformers + bitsandbytes load.

    By default the Linear weights of the decoder blocks are quantised; embeddings, norms,
    lm_head, MoE experts and routers keep their dtype. Tokenizer files are copied; config.json gets
    quantization_config, whose llm_int8_skip_modules lists every Linear kept in float.

    \b
    Example:
      minilora quantize ./Llama-3.2-1B -o ./Llama-3.2-1B-nf4
    """
    report = quantize_checkpoint(model, output, int(blocksize), double_quant, quant_type, include, exclude,
                                 force=force, quiet=quiet or as_json, compute_dtype=compute_dtype,
                                 offset_mean=offset_mean)
    if as_json:
        return print_json(report)
    t = report["totals"]
    error = "n/a" if t["max_abs_error"] is None else f"{t['max_abs_error']:.3g}"
    click.echo(f"quantised {t['quantized']} of {t['tensors']} tensors to {quant_type} (blocksize {blocksize}, "
               f"double quant {'on' if double_quant else 'off'}): {human_bytes(t['bytes_before'])} -> "
               f"{human_bytes(t['bytes_after'])}, max |error| {error}; wrote {report['output']}")
    if t["non_finite_tensors"]:
        click.echo(f"warning: {t['non_finite_tensors']} quantised tensor(s) hold NaN/inf weights (their blocks "
                   f"dequantise to NaN; error not measured: see 'non_finite' in --json)", err=True)


@click.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output model folder.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "fp32", "fp16", "bf16"]),
              default=None, help="Output dtype (default: the dtype each quant state records).")
@force_option
@json_option
@quiet_option
def dequantize(model, output, dtype, force, as_json, quiet):
    """Turn a 4-bit bitsandbytes checkpoint (minilora's or transformers') back into float weights,
    bit-exact with bitsandbytes' dequantisation (one exception: FP4's code 8 gives +0.0 where
    bitsandbytes' C++ kernel gives -0.0). --dtype is also written into config.json.

    \b
    Example:
      minilora dequantize ./Llama-3.2-1B-nf4 -o ./Llama-3.2-1B-dq --dtype bfloat16
    """
    report = dequantize_checkpoint(model, output, dtype, force=force, quiet=quiet or as_json)
    if as_json:
        return print_json(report)
    t = report["totals"]
    click.echo(f"dequantised {t['dequantized']} of {t['tensors']} tensors ({human_bytes(t['bytes'])}); "
               f"wrote {report['output']}")
