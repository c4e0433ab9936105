"""Render the CLI reference (docs/cli.md) from the click commands themselves.

``python -m minilora.cli.reference > docs/cli.md`` regenerates it; tests/test_cli_reference.py fails
when the committed file is stale.
"""
import click

from .main import cli

HEADER = """# CLI reference

Generated from the click commands by `python -m minilora.cli.reference > docs/cli.md`; do not edit.

Exit codes: `0` ok, `1` a check failed (`diff` outside tolerance, `demo` check), `2` usage or input
error (one line on stderr). Progress goes to stderr; `--json` prints a report on stdout.
Output is plain text with no colour, so `NO_COLOR` and pipes need nothing special.

Shell completion (click's): `eval "$(_MINILORA_COMPLETE=bash_source minilora)"` in `~/.bashrc`
(`zsh_source` / `fish_source` for zsh and fish).
"""


def render():
    parts = [HEADER]
    ctx = click.Context(cli, info_name="minilora", terminal_width=100, max_content_width=100,
                        **cli.context_settings)
    for name in sorted(cli.list_commands(ctx)):
        command = cli.get_command(ctx, name)
        sub = click.Context(command, info_name=name, parent=ctx)
        parts.append(f"## `minilora {name}`\n\n```\n{command.get_help(sub)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(), end="")
