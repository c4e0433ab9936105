"""Known-answer vectors shipped with the package, for kernel authors in any language.

``python -m minilora.vectors list`` names the cases; ``python -m minilora.vectors export DIR`` writes
each case as plain ``.npy`` files (``DIR/<case>/<field>.npy``), all of them in one
``DIR/vectors.safetensors`` (keys ``<case>/<field>``), and ``DIR/manifest.json`` saying which oracle
library and version produced each case, the operation, its parameters and each field's meaning.
Floats are stored as bit patterns (uint32 / uint16): compare bits, no float parsing needed.
The cases are a subset of tests/data, selected by tests/data/make_package_vectors.py.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
USAGE = "usage: python -m minilora.vectors list | export DIR"


def manifest():
    with open(os.path.join(HERE, "vectors.json"), encoding="utf-8") as f:
        return json.load(f)


def load(case):
    """``{field: array}`` of one case (floats as bit patterns, see the manifest)."""
    with np.load(os.path.join(HERE, "vectors.npz")) as z:
        out = {k.split("/", 1)[1]: z[k] for k in z.files if k.split("/", 1)[0] == case}
    if not out:
        raise KeyError(f"no vector case {case!r}; see `python -m minilora.vectors list`")
    return out


def export(folder):
    """Write every case as .npy files, one safetensors file and manifest.json into ``folder``."""
    from minilora.output import staged_folder
    from minilora.safetensors_write import save_file

    with staged_folder(folder) as stage, np.load(os.path.join(HERE, "vectors.npz")) as z:
        everything = {}
        for key in z.files:
            case, field = key.split("/", 1)
            os.makedirs(os.path.join(stage, case), exist_ok=True)
            np.save(os.path.join(stage, case, field.replace("/", "_") + ".npy"), z[key])
            everything[key] = z[key]
        save_file(everything, os.path.join(stage, "vectors.safetensors"))
        with open(os.path.join(stage, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest(), f, indent=1)
    return folder


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    if argv == ["list"]:
        try:
            for name, case in manifest()["cases"].items():
                print(f"{name:32s} {case['operation']:16s} {case['oracle']}")
            sys.stdout.flush()
        except BrokenPipeError:  # `... list | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if len(argv) == 2 and argv[0] == "export" and not argv[1].startswith("-"):
        if os.path.exists(argv[1]):
            print(f"minilora.vectors: error: {argv[1]} exists", file=sys.stderr)
            return 2
        export(argv[1])
        print(f"wrote {len(manifest()['cases'])} cases to {argv[1]}")
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
