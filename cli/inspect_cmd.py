"""``minilora inspect``: what a checkpoint or adapter holds."""
from collections import Counter

import click

from minilora.describe import describe

from .common import human_bytes, json_option, print_json


@click.command("inspect")
@click.argument("path", type=click.Path(exists=True))
@click.option("--tensors/--no-tensors", default=True, show_default=True, help="List every tensor.")
@json_option
def inspect(path, tensors, as_json):
    """Print what a checkpoint or a PEFT adapter holds.

    \b
    Example:
      minilora inspect ./my-adapter
    """
    info = describe(path)
    if as_json:
        if not tensors:
            info.pop("tensors", None)
        return print_json(info)
    if info["kind"] == "checkpoint":
        click.echo(f"checkpoint {info['path']}  model_type={info['model_type']}  shards={len(info['shards'])}")
        if tensors:
            for t in info["tensors"]:
                click.echo(f"  {t['name']:60s} {t['dtype']:9s} {tuple(t['shape'])}")
        kinds = Counter((q["quant_type"], q["blocksize"], q["double_quant"], q["dtype"])
                        for q in info["quantized"].values())
        for (quant_type, blocksize, double_quant, dtype), count in sorted(kinds.items()):
            dq = "with" if double_quant else "without"
            click.echo(f"  4-bit: {count} weights, {quant_type} blocksize {blocksize} {dq} double quantisation, "
                       f"stored from {dtype}")
        for dtype, d in info["by_dtype"].items():
            click.echo(f"  {dtype}: {d['parameters']:,} parameters, {human_bytes(d['bytes'])}")
        click.echo(f"total: {info['parameters']:,} parameters, {human_bytes(info['bytes'])}")
        return
    cfg = info["config"]
    click.echo(f"adapter {info['path']}  r={cfg['r']} alpha={cfg['lora_alpha']} rslora={bool(cfg['use_rslora'])} "
               f"dora={bool(cfg['use_dora'])} base={cfg['base_model_name_or_path']}")
    click.echo(f"targets: {', '.join(info['targets'])}")
    if tensors:
        for m in info["modules"]:
            extra = " dora" if m["dora"] else ""
            extra += " bias" if m["bias"] else ""
            click.echo(f"  {m['module']:60s} {m['kind']:9s} r={m['rank']:<4d} alpha={m['alpha']:<6g} "
                       f"scale={m['scale']:<8.4g} A{tuple(m['A'])} B{tuple(m['B'])}{extra}")
    if info["full_tensors"]:
        click.echo(f"modules_to_save: {', '.join(info['full_tensors'])}")
    if info["saved_base_tensors"]:
        click.echo(f"saved copies of base tensors (not trained): {', '.join(info['saved_base_tensors'])}")
    click.echo(f"total: {len(info['modules'])} modules, {info['parameters']:,} trainable parameters")
