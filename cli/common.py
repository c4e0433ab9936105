"""Shared CLI pieces: the --json / --quiet options and printing a report."""
import json
import math

import click

json_option = click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
force_option = click.option("--force", is_flag=True, help="Replace an existing output.")
fsync_option = click.option(
    "--fsync/--no-fsync", default=True, show_default=True,
    help="Flush each output file to disk before renaming it into place, so not even a power cut leaves a "
         "damaged file (large files are written with O_DIRECT, past the page cache, where the filesystem "
         "allows). --no-fsync leaves the writes to the page cache, as cp and save_pretrained do (faster "
         "where the disk is slow; a crash or Ctrl-C still never leaves a partial output).")


def _finite(value):
    """JSON has no NaN / Infinity: non-finite floats are written as the strings "nan", "inf", "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_json(report):
    click.echo(json.dumps(_finite(report), indent=2, default=str, allow_nan=False))


def human_bytes(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
