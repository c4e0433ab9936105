"""``minilora demo``: the pipeline on a tiny built-in model, offline."""
import click

from minilora.demo import run_demo

from .common import human_bytes, json_option, print_json, quiet_option


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Keep the artefacts in this folder (default: a temporary folder, removed at the end).")
@click.option("--steps", default=60, show_default=True, help="Training steps.")
@click.option("--seed", default=0, show_default=True, help="Seed of the model, the data order and the adapter.")
@json_option
@quiet_option
def demo(out_dir, steps, seed, as_json, quiet):
    """Build a tiny Llama-layout model, train a LoRA adapter on a bundled text, merge it, check the
    merged model against base + adapter, quantise it to NF4, and report. Offline, about a minute.

    \b
    Example:
      minilora demo --out ./demo
    """
    r = run_demo(out_dir, seed, steps, quiet=quiet or as_json)
    if as_json:
        print_json(r)
    else:
        s, sec = r["sizes"], r["seconds"]
        click.echo(f"base model      {human_bytes(s['base']):>10}  tiny Llama layout, float32 ({sec['write']:.1f} s)")
        if r["trained"]:
            click.echo(f"LoRA adapter    {human_bytes(s['adapter']):>10}  r=16, all linear layers, {steps} steps: "
                       f"loss {r['loss_before']:.3f} -> {r['loss_after']:.3f} ({sec['train']:.1f} s)")
        else:
            click.echo(f"LoRA adapter    {human_bytes(s['adapter']):>10}  random (install torch + tokenizers to train)")
        click.echo(f"merged          {human_bytes(s['merged']):>10}  {r['tensors_merged']} tensors ({sec['merge']:.2f} s)")
        click.echo(f"merged, NF4+DQ  {human_bytes(s['merged-nf4']):>10}  max |error| {r['nf4_max_abs_error']:.3g} "
                   f"({sec['quantize']:.2f} s)")
        verdict = "OK" if r["check_passed"] else "FAILED"
        logits = f"; logits vs base + adapter: rel. diff {r['logits_rel_diff']:.1e}" if "logits_rel_diff" in r else ""
        click.echo(f"check: merged layers == base + adapter on {r['layers_checked']} layers, worst error / "
                   f"derived bound = {r['worst_error_over_bound']:.3f}{logits}  {verdict}")
        if r["out_dir"]:
            click.echo(f"artefacts in {r['out_dir']}")
    if not r["check_passed"]:
        raise SystemExit(1)
