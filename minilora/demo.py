"""``minilora demo``: the whole pipeline on a tiny seeded model, offline, in seconds.

1. write a tiny Llama-layout checkpoint (bf16) and a LoRA adapter for all its Linear layers;
2. merge them with the streaming merge;
3. check every merged layer: ``x W'ᵀ`` equals ``x Wᵀ + s·(x Aᵀ) Bᵀ`` within the derived bound
   ``|x| (u_bf16 |W + ΔW| + 4 u_32 (|W| + |s| |B| |A|))ᵀ``, u the unit roundoff (bf16 2⁻⁸, fp32 2⁻²⁴);
4. quantise the merged model to NF4 with double quantisation and report sizes and error.
Training comes with the torch backend (``minilora train``).
"""
import os
import tempfile
import time

import numpy as np

from minilora import lora
from minilora.checkpoint import Checkpoint, load_adapter
from minilora.merge import merge_checkpoint
from minilora.quantize import quantize_checkpoint
from minilora.synthetic import llama_config, write_llama_checkpoint, write_lora_adapter

U_BF16, U_F32 = 2.0 ** -8, 2.0 ** -24


def merged_forward_bound(x, W, A, B, s):
    """Derived bound on ``|x W'ᵀ − (x Wᵀ + s (x Aᵀ) Bᵀ)|`` for a bf16 merge (float64 products)."""
    ax = np.abs(x.astype(np.float64))  # (M, K)
    aW = np.abs(W.astype(np.float64))  # (N, K)
    aD = abs(s) * (np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64)))  # (N, K)
    return ax @ (U_BF16 * (aW + aD) + 4 * U_F32 * (aW + aD)).T  # (M, N)


def _check_merge(base, adapter_dir, merged, rng):
    adapter = load_adapter(adapter_dir)
    s = lora.scaling(adapter.alpha, adapter.r)
    worst = 0.0
    with Checkpoint(base) as b, Checkpoint(merged) as m:
        for name, mod in adapter.modules.items():
            W, Wm = b.get(f"{name}.weight"), m.get(f"{name}.weight")
            x = rng.standard_normal((4, W.shape[1])).astype(np.float32)  # (M, K)
            ref = lora.lora_forward(x, W, mod.A, mod.B, s)  # (M, N)
            out = x.astype(np.float64) @ Wm.astype(np.float64).T  # (M, N)
            ratio = np.max(np.abs(out - ref) / merged_forward_bound(x, W, mod.A, mod.B, s))
            worst = max(worst, float(ratio))
    return len(adapter.modules), worst


def _size(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def run_demo(out_dir=None, seed=0):
    """Run the demo in ``out_dir`` (a temporary folder if None); return a report dict."""
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="minilora-demo-")
        out_dir = tmp.name
    os.makedirs(out_dir, exist_ok=True)
    t = {}
    config = llama_config(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=1024)
    paths = {k: os.path.join(out_dir, k) for k in ("base", "adapter", "merged", "merged-nf4")}
    t0 = time.perf_counter()
    write_llama_checkpoint(paths["base"], config, seed=seed)
    write_lora_adapter(paths["adapter"], config, rank=16, alpha=32, seed=seed + 1)
    t["write"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merge_report = merge_checkpoint(paths["base"], [paths["adapter"]], paths["merged"], force=True)
    t["merge"] = time.perf_counter() - t0
    n_layers, worst = _check_merge(paths["base"], paths["adapter"], paths["merged"], np.random.default_rng(seed))
    t0 = time.perf_counter()
    q_report = quantize_checkpoint(paths["merged"], paths["merged-nf4"], force=True)
    t["quantize"] = time.perf_counter() - t0
    report = {
        "out_dir": None if tmp else out_dir, "layers_checked": n_layers, "worst_error_over_bound": worst,
        "check_passed": worst <= 1.0, "tensors_merged": merge_report["totals"]["changed"],
        "sizes": {k: _size(p) for k, p in paths.items()},
        "nf4_max_abs_error": q_report["totals"]["max_abs_error"],
        "seconds": {k: round(v, 3) for k, v in t.items()},
    }
    if tmp:
        tmp.cleanup()
    return report
