"""Helpers shared by the benchmark scripts (run as ``python bench/NAME.py``, so this folder is on sys.path)."""


def vm_kb(field):
    """A ``/proc/self/status`` field in KiB (``VmHWM``: peak RSS of this process alone; ``ru_maxrss``
    would include the parent's, which Linux carries over ``exec``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
