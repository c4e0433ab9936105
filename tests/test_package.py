"""The package installs, imports without torch, builds its cffi extension and exposes the CLI."""
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

import minilora
from minilora.cli.main import cli


def test_import_does_not_pull_torch(tmp_path):
    # cwd=tmp_path: `python -c` puts the cwd first on sys.path; the installed package must answer.
    code = "import sys, minilora, minilora.lora, minilora.checkpoint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


def test_native_extension_smoke():
    from minilora._native import ffi, lib

    x = np.arange(5, dtype=np.float32)
    y = np.ones(5, dtype=np.float32)
    status = lib.minilora_saxpy(5, 2.0, ffi.from_buffer("float[]", x), ffi.from_buffer("float[]", y))
    assert status == 0
    np.testing.assert_array_equal(y, 2 * np.arange(5, dtype=np.float32) + 1)
    assert lib.minilora_saxpy(-1, 2.0, ffi.NULL, ffi.NULL) != 0


def test_cli_version_and_module_entry(tmp_path):
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and minilora.__version__ in result.output
    out = subprocess.run([sys.executable, "-m", "minilora", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "Usage" in out.stdout


def test_no_toplevel_cli_module_installed():
    """The install must not put a generic ``cli`` package on the path. The checkout's own ``cli/`` folder is
    left out of the search: ``python -m pytest`` or ``PYTHONPATH=.`` put the repository root on sys.path."""
    import importlib.machinery
    import os
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != repo]
    spec = importlib.machinery.PathFinder.find_spec("cli", path)
    assert spec is None, f"a generic top-level 'cli' module is importable from {spec.origin}"


def test_readme_library_example_runs(tmp_path):
    import os
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    text = open(readme, encoding="utf-8").read()
    code = re.search(r"## As a library\n+```python\n(.*?)```", text, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md (As a library)", "exec"), namespace)  # noqa: S102  (our own README)
    assert namespace["y"].shape == (1, 64) and namespace["W2"].shape == (64, 128)
