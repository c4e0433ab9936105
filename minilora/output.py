"""Atomic outputs: a folder is built in a temporary sibling folder and renamed into place only when
complete, so a crash, Ctrl-C or SIGTERM never leaves a half-written checkpoint; an existing output is
replaced only with ``force``; an output never overwrites, contains or lies inside an input; errors while
writing name the output, not the temporary path."""
import contextlib
import errno
import os
import shutil
import tempfile

from minilora.errors import InputError

TEMP_PREFIX = ".minilora-"
# Errors without a file name that can only come from writing (a read of an input names its file).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def check_output(out, inputs, force, single_file=False):
    """Refuse an output that is an input, contains one, or lies inside an input folder; a symbolic
    link; an existing path without ``force``, or one of the other kind (file vs folder) even with it.
    ``inputs``: every path the command reads (folders protect everything inside them)."""
    if os.path.islink(out):
        raise InputError("output is a symbolic link; give the path it should be written to", out)
    real = os.path.realpath(out)
    for path in inputs:
        p = os.path.realpath(path)
        if real == p or p.startswith(real + os.sep):
            raise InputError(f"output would overwrite or contain the input {path}", out)
        if os.path.isdir(p) and real.startswith(p + os.sep):
            raise InputError(f"output lies inside the input folder {path}; write it somewhere else", out)
    if os.path.exists(out):
        if not force:
            raise InputError("output exists; pass --force to replace it", out)
        if os.path.isdir(out) and single_file:
            raise InputError("output exists and is a folder; a single .safetensors file cannot replace it", out)
        if not os.path.isdir(out) and not single_file:
            raise InputError("output exists and is a file; the output is a folder", out)


@contextlib.contextmanager
def output_errors(out, *temporaries):
    """Re-raise an OSError of writing ``out`` (through ``temporaries``) as one line naming ``out``."""
    try:
        yield
    except OSError as e:
        name = getattr(e, "filename", None)
        ours = (name is None and e.errno in _WRITE_ERRNOS) or (
            name is not None and any(str(name).startswith(str(t)) for t in (out, *temporaries) if t))
        if not ours:
            raise
        raise InputError(f"cannot write the output: {e.strerror or e}", out) from e


def make_parent(out):
    """Create the folder an output goes into (as ``save_pretrained`` does), naming ``out`` on failure."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the folder {parent}: {e.strerror or e}", out) from None
    return parent


@contextlib.contextmanager
def staged_folder(out):
    """``with staged_folder(out) as stage:`` write into ``stage``; on success it becomes ``out``."""
    parent = make_parent(out)
    with output_errors(out, parent):
        stage = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    try:
        with output_errors(out, stage):
            yield stage
        os.chmod(stage, 0o755)  # mkdtemp makes it private; an output folder is an ordinary folder
        _replace_folder(stage, out, parent)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace_folder(stage, out, parent):
    old = None
    with output_errors(out, stage, parent):
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=TEMP_PREFIX + "old-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
        try:
            os.rename(stage, out)
        except BaseException:
            if old:  # put the previous output back
                os.rename(os.path.join(old, "previous"), out)
                os.rmdir(old)
            raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
