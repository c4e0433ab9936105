"""Atomic outputs: a folder is built in a temporary sibling folder and renamed into place only when
complete, so a crash or Ctrl-C never leaves a half-written checkpoint; an existing output is
replaced only with ``force``; an output never overwrites or contains an input."""
import contextlib
import os
import shutil
import tempfile

from minilora.errors import InputError


def check_output(out, inputs, force):
    """Refuse an output that is an input (or contains one), or that exists without ``force``."""
    real = os.path.realpath(out)
    for path in inputs:
        p = os.path.realpath(path)
        if real == p or p.startswith(real + os.sep):
            raise InputError(f"output would overwrite or contain the input {path}", out)
    if os.path.exists(out) and not force:
        raise InputError("output exists; pass --force to replace it", out)


@contextlib.contextmanager
def staged_folder(out):
    """``with staged_folder(out) as stage:`` write into ``stage``; on success it becomes ``out``."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".minilora-", dir=parent)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.chmod(stage, 0o755)  # mkdtemp makes it private; an output folder is an ordinary folder
    old = None
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=".minilora-old-", dir=parent)
        os.rename(out, os.path.join(old, "previous"))
    os.rename(stage, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)
