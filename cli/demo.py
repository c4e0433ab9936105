"""``minilora demo``: the pipeline on a tiny built-in model, offline."""
import click

from minilora.demo import run_demo

from .common import human_bytes, json_option, print_json


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Keep the artefacts in this folder (default: a temporary folder, removed at the end).")
@click.option("--seed", default=0, show_default=True, help="Seed of the synthetic model and adapter.")
@json_option
def demo(out_dir, seed, as_json):
    """Build a tiny Llama-layout model and a LoRA adapter, merge them, check the merged layers
    against the reference within the derived bound, quantise the result to NF4, and report.

    \b
    Example:
      minilora demo --out ./demo
    """
    r = run_demo(out_dir, seed)
    if as_json:
        print_json(r)
    else:
        s, sec = r["sizes"], r["seconds"]
        click.echo(f"base model      {human_bytes(s['base']):>10}  (tiny Llama layout, bf16, written in {sec['write']:.2f} s)")
        click.echo(f"LoRA adapter    {human_bytes(s['adapter']):>10}  (r=16, alpha=32, all linear layers)")
        click.echo(f"merged          {human_bytes(s['merged']):>10}  ({r['tensors_merged']} tensors, {sec['merge']:.2f} s)")
        click.echo(f"merged, NF4+DQ  {human_bytes(s['merged-nf4']):>10}  ({sec['quantize']:.2f} s, max |error| {r['nf4_max_abs_error']:.3g})")
        verdict = "OK" if r["check_passed"] else "FAILED"
        click.echo(f"check: merged forward == base + adapter forward on {r['layers_checked']} layers, "
                   f"worst error / bound = {r['worst_error_over_bound']:.3f}  {verdict}")
        if r["out_dir"]:
            click.echo(f"artefacts in {r['out_dir']}")
    if not r["check_passed"]:
        raise SystemExit(1)
