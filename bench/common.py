"""Helpers shared by the benchmark scripts (run as ``python bench/NAME.py``, so this folder is on sys.path)."""
import subprocess
import sys


def cpu_name():
    """The CPU model name ``lscpu`` reports."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "?")


def log(msg):
    print(msg, file=sys.stderr, flush=True)



def vm_kb(field):
    """A ``/proc/self/status`` field in KiB (``VmHWM``: peak RSS of this process alone; ``ru_maxrss``
    would include the parent's, which Linux carries over ``exec``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0
