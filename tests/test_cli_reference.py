"""docs/cli.md is generated from the click commands and must not be stale; every command's
--help carries an example."""
import difflib
import os

from click.testing import CliRunner

from minilora.cli.main import cli
from minilora.cli.reference import render

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "cli.md")


def test_cli_reference_is_current():
    with open(DOC, encoding="utf-8") as f:
        committed = f.read()
    fresh = render()
    diff = "\n".join(difflib.unified_diff(committed.splitlines(), fresh.splitlines(), lineterm="", n=1))
    assert committed == fresh, f"docs/cli.md is stale (python -m minilora.cli.reference > docs/cli.md):\n{diff[:2000]}"


def test_every_command_has_help_with_an_example():
    for name in cli.list_commands(None):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0 and "Example" in result.output, name
