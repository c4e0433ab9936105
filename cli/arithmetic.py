"""``minilora combine``, ``resize`` and ``extract``: parse, call ``minilora.arithmetic`` /
``minilora.extract``, print."""
import click

from minilora.arithmetic import METHODS, combine_files
from minilora.errors import InputError
from minilora.extract import SVD_MODES, extract_checkpoints, resize_file
from minilora.ties import SIGN_METHODS

from .common import force_option, json_option, print_json, quiet_option


def _weights(text):
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise InputError(f"--weights must be numbers separated by commas, got {text!r}") from None


def _summary(report, what):
    rows, t = report["modules"], report["totals"]
    ranks = sorted({r["rank_out"] for r in rows})
    worst = max(rows, key=lambda r: r["rel_error"], default=None)
    click.echo(f"{what} {t['modules']} modules (rank {', '.join(map(str, ranks))}) into {report['output']} "
               f"in {t['seconds']:.2f} s")
    if worst is not None:
        click.echo(f"largest relative error of B A: {worst['rel_error']:.3g} ({worst['module']})")


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output PEFT adapter folder.")
@click.option("--weights", default=None, help="Comma-separated weight per adapter, e.g. 1,-0.5 (default: all 1).")
@click.option("--method", type=click.Choice(METHODS), default="cat", show_default=True,
              help="cat and svd (at full rank) are exact; the others approximate.")
@click.option("--rank", type=int, default=None, help="Rank of the svd methods (default: the largest input rank).")
@click.option("--density", type=float, default=None, help="Fraction kept by ties / dare / magnitude_prune, in (0, 1].")
@click.option("--majority-sign", type=click.Choice(SIGN_METHODS), default="total", show_default=True,
              help="TIES sign election.")
@click.option("--clamp", type=float, default=None, help="svd methods: clip the factors at this quantile.")
@click.option("--seed", type=int, default=0, show_default=True, help="DARE random seed (NumPy default_rng).")
@force_option
@json_option
def combine(adapters, output, weights, method, rank, density, majority_sign, clamp, seed, force, as_json):
    """Combine LoRA ADAPTERS module by module into one adapter with scaling 1.

    The exact target is Σ w_i s_i B_i A_i (s_i each adapter's alpha/r or alpha/√r). The report gives,
    per module, the ranks in and out and the relative Frobenius error of the result's B A against it.

    \b
    Examples:
      minilora combine ./math ./code --weights 0.5,0.5 -o ./mix            # exact (cat)
      minilora combine ./ft ./base-ish --weights 1,-1 --method svd --rank 16 -o ./diff
    """
    report = combine_files(list(adapters), output, _weights(weights), method, rank, density, majority_sign,
                           clamp, seed, force)
    print_json(report) if as_json else _summary(report, f"combined ({method})")


@click.command()
@click.argument("adapter", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output PEFT adapter folder.")
@click.option("--rank", type=int, default=None, help="Target rank (modules already smaller keep theirs).")
@click.option("--energy", type=float, default=None,
              help="Instead (or as well): per module the smallest rank keeping this fraction of ‖s·B A‖².")
@force_option
@json_option
def resize(adapter, output, rank, energy, force, as_json):
    """Reduce the rank of ADAPTER by truncated SVD of each module's s·B A (lossless at full rank).

    \b
    Example:
      minilora resize ./my-adapter --rank 8 -o ./my-adapter-r8
    """
    report = resize_file(adapter, output, rank, energy, force)
    if as_json:
        print_json(report)
        return
    _summary(report, "resized")
    worst = max(report["modules"], key=lambda r: r["discarded_energy"])
    click.echo(f"largest discarded energy: {worst['discarded_energy']:.3g} ({worst['module']})")


@click.command()
@click.argument("base", type=click.Path(exists=True))
@click.argument("finetuned", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(), help="Output PEFT adapter folder.")
@click.option("--rank", type=int, default=None, help="Rank of every extracted module.")
@click.option("--energy", type=float, default=None,
              help="Per module the smallest rank keeping this fraction of ‖W_ft − W_base‖² (capped by --rank).")
@click.option("--embed-lora", is_flag=True, help="Extract embeddings as LoRA too (default: kept full-rank).")
@click.option("--svd", type=click.Choice(SVD_MODES), default="auto", show_default=True,
              help="auto: randomized when the rank is small against the matrix, else exact.")
@force_option
@json_option
@quiet_option
def extract(base, finetuned, output, rank, energy, embed_lora, svd, force, as_json, quiet):
    """Extract a LoRA adapter from FINETUNED and its BASE: truncated SVD of W_ft − W_base per Linear,
    B = U√S, A = √S Vᵀ, alpha = r. Both checkpoints are streamed tensor by tensor.

    \b
    Example:
      minilora extract ./Llama-3.2-1B ./Llama-3.2-1B-Instruct --rank 16 -o ./instruct-lora
    """
    report = extract_checkpoints(base, finetuned, output, rank, energy, embed_lora, svd, force,
                                 quiet=quiet or as_json)
    if as_json:
        print_json(report)
        return
    _summary(report, "extracted")
    if report["full_rank"]:
        click.echo(f"kept full-rank (modules_to_save): {', '.join(report['full_rank'])}")
    if report["not_extracted"]:
        click.echo(f"warning: {len(report['not_extracted'])} changed tensors cannot be a LoRA and were left out "
                   f"(first: {report['not_extracted'][0]})", err=True)
