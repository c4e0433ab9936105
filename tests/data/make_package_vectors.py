"""Select the known-answer vectors shipped inside the package (minilora/data/vectors.npz + .json)
from the committed test vectors (tests/data/nf4, tests/data/peft). No oracle library is needed here:
the values were produced by bitsandbytes and PEFT when those sets were generated (their versions are
copied into the manifest). Floats are stored as their bit patterns (uint32 for float32, uint16 for
float16 / bfloat16) so a C, CUDA or Rust test can compare bits without a float parser.

Run from the repository root:  python tests/data/make_package_vectors.py
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
from minilora import __version__  # noqa: E402
from minilora.safetensors_io import load_file  # noqa: E402

NF4_CASES = ["nf4_randn_float32_n4097", "nf4_randn_bfloat16_n127", "nf4_randn_float16_n65", "nf4_bs32_tail",
             "nf4_bs4096_tail", "nf4_2d_even_bf16", "nf4_bounds", "nf4_special", "nf4_zero_tail",
             "nf4_nan_tail", "nf4_inf_tail", "nf4_subnormal_tail", "nf4_dq_bf16", "nf4_dq_special",
             "fp4_randn_float32_n4097", "fp4_bounds", "fp4_special", "nested_edges"]
LORA_CASES = ["lora-float32", "lora-bfloat16", "rslora-float32", "dora-float32", "conv1d-float32",
              "embedding-float32", "patterns-bfloat16"]
NF4_FIELDS = {"x": "input", "packed": "output: packed codes ((n+1)//2, 1), element 2k in the high nibble",
              "absmax": "output: float32 absmax per block", "dq_codes": "output: nested uint8 codes",
              "dq_nested_absmax": "output: float32 nested absmax per 256 blocks",
              "dq_offset": "input/output: float32 offset (bitsandbytes' stored one)",
              "dq_absmax": "output: dequantised absmax", "c": "input: absmax - offset",
              "codes": "output: nested codes", "nested_absmax": "output: nested absmax"}


def _bits(a):
    a = np.asarray(a)
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        return a.view(f"u{a.dtype.itemsize}"), f"{a.dtype.name} bits"
    return a, a.dtype.name


def main():
    arrays, cases = {}, {}
    z = np.load(os.path.join(ROOT, "tests/data/nf4/vectors.npz"))
    meta = json.load(open(os.path.join(ROOT, "tests/data/nf4/meta.json")))
    by_name = {c["name"]: c for c in meta["cases"]}
    for name in NF4_CASES:
        c = by_name.get(name, {"name": name})
        fields = {}
        for key in z.files:
            if key.startswith(name + "__"):
                field = key.split("__", 1)[1]
                arrays[f"{name}/{field}"] = z[key]
                fields[field] = {"shape": list(z[key].shape), "stored": z[key].dtype.name,
                                 "meaning": NF4_FIELDS.get(field, "output: dequantised in the named dtype" if field.startswith("out_") else "")}
        cases[name] = {"operation": "nested_quantize" if name.startswith("nested") else f"{name.split('_')[0]}_quantize",
                       "oracle": f"bitsandbytes {meta['bitsandbytes']} (CPU)",
                       "params": {k: c.get(k) for k in ("dtype", "shape", "quant_type", "blocksize", "double_quant", "note") if k in c},
                       "fields": fields}
    manifest = json.load(open(os.path.join(ROOT, "tests/data/peft/manifest.json")))
    for name in LORA_CASES:
        case, dtype = name.rsplit("-", 1)
        tensors = load_file(os.path.join(ROOT, f"tests/data/peft/{name}.safetensors"))
        fields = {}
        for key, value in tensors.items():
            stored, meaning = _bits(value)
            arrays[f"{name}/{key}"] = stored
            fields[key] = {"shape": list(value.shape), "stored": meaning}
        cases[name] = {"operation": "lora_layer", "oracle": f"peft {manifest['versions']['peft']}, torch {manifest['versions']['torch']}",
                       "params": {"base_dtype": dtype, **manifest["cases"][case]}, "fields": fields}
    out = os.path.join(ROOT, "minilora", "data")
    np.savez_compressed(os.path.join(out, "vectors.npz"), **arrays)
    with open(os.path.join(out, "vectors.json"), "w") as f:
        json.dump({"minilora": __version__, "generated_by": "tests/data/make_package_vectors.py",
                   "float_storage": "floats are stored as bit patterns: 'float32 bits' = uint32, 'bfloat16 bits' / 'float16 bits' = uint16",
                   "lora_fields": "W (N, K) base, A (R, K), B (N, R), delta = s·B A (float32), merged = PEFT merge_and_unload, "
                                  "merged_safe = safe_merge, unmerged, x / y = forward input / output, g = upstream grad, grad_* = gradients",
                   "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
