"""``minilora diff``: compare two tensors / checkpoints / adapters / 4-bit folders."""
import sys

import click

from minilora.diff import diff as run_diff

from .common import json_option, print_json


@click.command()
@click.argument("a", type=click.Path(exists=True))
@click.argument("b", type=click.Path(exists=True))
@click.option("--rtol", default=0.0, show_default=True, help="Relative tolerance against B.")
@click.option("--atol", default=0.0, show_default=True, help="Absolute tolerance.")
@click.option("--bound", type=click.Choice(["matmul"]), default=None,
              help="Use the derived matmul bound γ_K·|x||w|ᵀ instead of rtol/atol (needs --x, --w).")
@click.option("--x", "x_path", type=click.Path(exists=True), default=None, help="x (M, K) of y = x wᵀ (.npy or .safetensors).")
@click.option("--w", "w_path", type=click.Path(exists=True), default=None, help="w (N, K) of y = x wᵀ.")
@click.option("--delta", is_flag=True, help="Adapters: compare s·B A per module, not the factors.")
@click.option("--tensor", "names", multiple=True, help="Only compare these tensors.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor, not only those outside tolerance.")
@json_option
def diff(a, b, rtol, atol, bound, x_path, w_path, delta, names, show_all, as_json):
    """Compare A with the reference B, tensor by tensor. Exit 0 when both hold the same tensor names and
    every tensor is within tolerance (default: bit-identical), 1 when not, 2 on bad input.

    Reads .npy, .safetensors, model folders (single or sharded), PEFT adapters and 4-bit
    bitsandbytes folders, in any mix; a 4-bit weight is dequantised to compare with a float one,
    and two 4-bit weights also report how many codes differ.

    \b
    Examples:
      minilora diff ./my-merge ./peft-merge
      minilora diff y_kernel.npy y_ref.npy --bound matmul --x x.npy --w w.npy
      minilora diff ./adapter-a ./adapter-b --delta --rtol 1e-5
    """
    report = run_diff(a, b, rtol, atol, bound, x_path, w_path, delta, set(names) or None)
    if as_json:
        print_json(report)
    else:
        for r in report["tensors"]:
            if show_all or not r["within"]:
                if "problem" in r:
                    click.echo(f"{r['name']}: {r['problem']} {r['shape'][0]} vs {r['shape'][1]}")
                    continue
                codes = f" codes≠ {r['code_mismatches']}" if "code_mismatches" in r else ""
                ulp = f" ulp {r['max_ulp']}" if r["max_ulp"] is not None else ""
                mark = "ok " if r["within"] else "BAD"
                click.echo(f"{mark} {r['name']}: max|Δ| {r['max_abs_error']:.3g} rel {r['max_rel_error']:.3g}{ulp} "
                           f"identical {100 * r['identical_fraction']:.2f}%{codes} outside {r['outside']}")
        for side, keys in (("A", report["only_in_a"]), ("B", report["only_in_b"])):
            if keys:
                click.echo(f"only in {side}: {', '.join(keys[:10])}{' …' if len(keys) > 10 else ''} ({len(keys)})")
        t = report["totals"]
        verdict = "within tolerance" if report["ok"] else "DIFFERENT"
        click.echo(f"{t['compared']} tensors compared, {t['bit_identical']} bit-identical, {t['outside']} outside "
                   f"tolerance: {verdict}")
    if not report["ok"]:
        sys.exit(1)
