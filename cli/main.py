"""The ``minilora`` click group and the one place where user errors become exit codes.

Exit codes: 0 ok, 1 a check failed, 2 usage or input error (one line on stderr, no traceback).
"""
import signal
import sys

import click

from minilora import __version__, output
from minilora.errors import InputError


class Group(click.Group):
    """A click group whose errors are one line on stderr: 2 for usage or input errors."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.ClickException as e:       # usage errors: bad option, missing argument
            _fail(e.format_message(), e.exit_code)
        except click.exceptions.Abort:        # click's name for Ctrl-C
            _fail(_interrupted("interrupted"), 130)
        except InputError as e:
            _fail(str(e))
        except OSError as e:
            # A missing file, a full disk, a permission problem: say which file, no traceback.
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")
        except Terminated:
            _fail(_interrupted("terminated (SIGTERM)"), code=143)
        except KeyboardInterrupt:
            _fail(_interrupted("interrupted"), code=130)
        if isinstance(rv, int) and rv:          # ctx.exit(1): a check failed
            sys.exit(rv)
        return rv


class Terminated(BaseException):
    """SIGTERM (``kill``, a job scheduler's time limit): unwinds like Ctrl-C (every clean-up is an
    ``except BaseException`` / ``finally``), so no partial output stays."""


def _on_signal(signum, frame):
    """SIGTERM -> Terminated, SIGINT -> KeyboardInterrupt; held while an output is swapped into place."""
    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if not output.defer_signal(exc):
        raise exc


def _interrupted(what):
    if output.COMMITTED:  # the signal came after the output was in place (it waited for the swap)
        return f"{what} after the output was written: {output.COMMITTED[-1]} is complete"
    return f"{what}; no output was written"


def _fail(message, code=2):
    click.echo(f"minilora: error: {message}", err=True)
    sys.exit(code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="minilora")
def cli():
    """minilora: LoRA / QLoRA merge, quantise and check tools with a NumPy reference.

    Shape legend: M tokens, K in_features, N out_features, R rank; W (N, K), A (R, K), B (N, R).
    """


def _register():
    from .arithmetic import combine, extract, resize
    from .demo import demo
    from .diff import diff
    from .inspect_cmd import inspect
    from .merge import merge, unmerge
    from .quantize import dequantize, quantize
    from .train import generate, train

    for command in (demo, merge, unmerge, quantize, dequantize, inspect, diff, combine, resize, extract,
                    train, generate):
        cli.add_command(command)


_register()


def main():
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    cli(prog_name="minilora")
