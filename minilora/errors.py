"""The one exception type for bad user input.

``InputError`` is a ``ValueError`` whose message is one line naming the file, the tensor and the
problem. The CLI prints it to stderr and exits with code 2; it never shows a traceback for it.
"""


class InputError(ValueError):
    """Bad input: a missing / truncated / inconsistent file, a mismatched tensor, an unsafe path."""

    def __init__(self, message, path=None, tensor=None):
        self.path = None if path is None else str(path)
        self.tensor = tensor
        where = ": ".join(str(p) for p in (self.path, tensor) if p)
        super().__init__(f"{where}: {message}" if where else message)
