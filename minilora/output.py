"""Atomic outputs: a folder is built in a temporary sibling folder and renamed into place only when
complete, so a crash, Ctrl-C or SIGTERM never leaves a half-written checkpoint; an existing output is
replaced only with ``force`` (also one that another run finished meanwhile); an output never overwrites,
contains or lies inside an input, nor the file an input's symbolic link points to; errors while writing
name the output, not the temporary path. Signals that arrive while an output is being swapped into place
are held until the swap is done (``signals_deferred``), and ``COMMITTED`` tells the CLI what was written."""
import contextlib
import ctypes
import errno
import os
import shutil
import tempfile

from minilora.errors import InputError

TEMP_PREFIX = ".minilora-"
# Errors without a file name that can only come from writing (a read of an input names its file).
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


COMMITTED = []  # outputs this process has put in place (the CLI's message after a late signal)
_DEFERRED = {"depth": 0, "pending": None}


def check_output(out, inputs, force, single_file=False):
    """Refuse an output that is an input, contains one, or lies inside an input folder (also the targets of
    the symbolic links inside an input folder: a Hugging Face cache snapshot links to ``blobs/``); a
    symbolic link; an existing path without ``force``, or one of the other kind (file vs folder) even with
    it; with ``force``, a folder that holds folders or the current directory (``-o . --force``, ``-o ~``).
    ``inputs``: every path the command reads (folders protect everything inside them)."""
    if os.path.islink(out):
        raise InputError("output is a symbolic link; give the path it should be written to", out)
    real = os.path.realpath(out)
    for path, p in _protected(inputs):
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
        if os.path.isdir(out):
            cwd = os.path.realpath(os.getcwd())
            if cwd == real or cwd.startswith(real + os.sep):
                raise InputError("output folder contains the current directory; --force would delete it", out)
            inner = next((e.name for e in os.scandir(out) if e.is_dir(follow_symlinks=False)), None)
            if inner is not None:
                raise InputError(f"output exists and holds the folder {inner}/; --force replaces only a folder of "
                                 f"files (a checkpoint): remove it yourself or choose another output", out)


def _protected(inputs):
    """``(path, real path)`` of every input and of every symbolic link inside an input folder."""
    for path in inputs:
        yield path, os.path.realpath(path)
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):  # does not follow links into other folders
                for name in files + dirs:
                    full = os.path.join(root, name)
                    if os.path.islink(full):
                        yield full, os.path.realpath(full)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT / SIGTERM (as raised by the CLI's handlers, which call ``defer_signal``) until the block
    ends, then raise the held one: an output is never left half swapped into place."""
    _DEFERRED["depth"] += 1
    try:
        yield
    finally:
        _DEFERRED["depth"] -= 1
        if _DEFERRED["depth"] == 0 and _DEFERRED["pending"] is not None:
            held, _DEFERRED["pending"] = _DEFERRED["pending"], None
            raise held


def defer_signal(exc):
    """For a signal handler: True if ``exc`` is held by ``signals_deferred`` (raise it yourself otherwise)."""
    if _DEFERRED["depth"]:
        _DEFERRED["pending"] = _DEFERRED["pending"] or exc
        return True
    return False


def commit(tmp, path, replace):
    """Rename ``tmp`` to ``path`` (a finished output). ``replace=False``: fail if ``path`` exists by now
    (another run wrote it meanwhile) instead of replacing it; ``replace=None``: a file inside a stage folder
    (replaced freely, not recorded as written)."""
    with signals_deferred():
        if replace is False:
            _rename_noreplace(tmp, path)
        else:
            os.replace(tmp, path)
        if replace is not None:
            COMMITTED.append(path)


def _rename_noreplace(src, dst):
    """rename(2) that never replaces ``dst``: renameat2(RENAME_NOREPLACE) where the kernel and file system
    have it, else check-then-rename (a small race)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise InputError("output appeared while this command ran (another run?); pass --force to replace it",
                             dst)
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise InputError("output appeared while this command ran (another run?); pass --force to replace it", dst)
    os.rename(src, dst)


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
def staged_folder(out, replace=True):
    """``with staged_folder(out) as stage:`` write into ``stage``; on success it becomes ``out``.
    ``replace``: whether an ``out`` that exists at that moment may be replaced (the caller's ``--force``)."""
    parent = make_parent(out)
    with output_errors(out, parent):
        stage = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    try:
        with output_errors(out, stage):
            yield stage
        os.chmod(stage, 0o755)  # mkdtemp makes it private; an output folder is an ordinary folder
        _replace_folder(stage, out, parent, replace)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace_folder(stage, out, parent, replace):
    """Swap ``stage`` in as ``out``; the previous ``out`` (with ``replace``) is removed once the new one is
    in place. Signals wait until all of it is done."""
    old = None
    with signals_deferred(), output_errors(out, stage, parent):
        if not replace:
            _rename_noreplace(stage, out)
        else:
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
        COMMITTED.append(out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
