"""``minilora demo``: the whole pipeline on a tiny seeded model, offline, in well under two minutes.

1. write a tiny Llama-layout checkpoint (float32, seeded) with a BPE tokenizer trained on the small
   text bundled with the package (``minilora/data/demo.txt``);
2. train a LoRA adapter on that text until the loss visibly drops (``minilora train``'s trainer);
3. merge it with the streaming merge, and check every merged layer: ``x W'ᵀ`` equals
   ``x Wᵀ + s·(x Aᵀ) Bᵀ`` within ``|x| (u |W + ΔW| + 4u (|W| + |s| |B| |A|))ᵀ``, u = 2⁻²⁴ (float32),
   and the merged model's logits against base + adapter;
4. quantise the merged model to NF4 with double quantisation; report sizes, losses and timings.
Without torch (``import minilora`` needs NumPy only) steps 1 and 2 use a random adapter instead.
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

U_F32 = 2.0 ** -24
TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo.txt")


def merged_forward_bound(x, W, A, B, s, u=U_F32):
    """Derived bound on ``|x W'ᵀ − (x Wᵀ + s (x Aᵀ) Bᵀ)|`` for a merge rounded to unit roundoff ``u``
    (products in float64): ``|x| (u |W + ΔW| + 4 u_32 (|W| + |s||B||A|))ᵀ``."""
    ax = np.abs(x.astype(np.float64))  # (M, K)
    aW = np.abs(W.astype(np.float64))  # (N, K)
    aD = abs(s) * (np.abs(B.astype(np.float64)) @ np.abs(A.astype(np.float64)))  # (N, K)
    return ax @ (u * (aW + aD) + 4 * U_F32 * (aW + aD)).T  # (M, N)


def check_merge(base, adapter_dir, merged, rng):
    """(layers checked, worst error / bound) over every adapted Linear of ``merged``."""
    adapter = load_adapter(adapter_dir)
    s = lora.scaling(adapter.alpha, adapter.r, bool(adapter.config.get("use_rslora")))
    worst = 0.0
    with Checkpoint(base) as b, Checkpoint(merged) as m:
        for name, mod in adapter.modules.items():
            W, Wm = b.get(f"{name}.weight"), m.get(f"{name}.weight")
            x = rng.standard_normal((4, W.shape[1])).astype(np.float32)  # (M, K)
            ref = lora.lora_forward(x, W, mod.A, mod.B, s)  # (M, N)
            out = x.astype(np.float64) @ Wm.astype(np.float64).T  # (M, N)
            u = 2.0 ** -8 if Wm.dtype.itemsize == 2 else U_F32
            worst = max(worst, float(np.max(np.abs(out - ref) / merged_forward_bound(x, W, mod.A, mod.B, s, u))))
    return len(adapter.modules), worst


def write_tokenizer(folder, text_path, vocab=384):
    """Train a small byte-level BPE on the demo text; write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([text_path], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"], show_progress=False,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write('{"bos_token": "<s>", "eos_token": "</s>"}\n')
    return tok.get_vocab_size()


def _size(folder):
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if os.path.isfile(os.path.join(folder, f)))


def _logits_check(base, adapter, merged, text_ids):
    """Max |logits(merged) − logits(base + adapter)| relative to max |logits| on the demo text."""
    import torch

    from minilora.torch_backend import load_adapter_into, load_llama

    ids = torch.tensor(text_ids[:64])[None]  # (1, T)
    with torch.no_grad():
        m = load_llama(base)
        load_adapter_into(m, adapter)
        ref = m.eval()(ids).double()  # (1, T, V)
        out = load_llama(merged)(ids).double()  # (1, T, V)
    return float((out - ref).abs().max() / ref.abs().max())


def run_demo(out_dir=None, seed=0, steps=60, quiet=True):
    """Run the demo in ``out_dir`` (a temporary folder if None); return a report dict."""
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="minilora-demo-")
        out_dir = tmp.name
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, k) for k in ("base", "adapter", "merged", "merged-nf4")}
    t, report = {}, {"out_dir": None if tmp else out_dir}
    try:
        import torch  # noqa: F401
        import tokenizers  # noqa: F401
        trained = True
    except ImportError:
        trained = False
    t0 = time.perf_counter()
    os.makedirs(paths["base"], exist_ok=True)
    vocab = write_tokenizer(paths["base"], TEXT, vocab=384) if trained else 384
    config = llama_config(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=vocab, dtype="float32")
    write_llama_checkpoint(paths["base"], config, seed=seed)
    t["write"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if trained:
        from minilora.torch_backend.train import train
        from minilora.torch_backend.train_state import TrainOptions

        summary = train(paths["base"], TEXT, paths["adapter"],
                        TrainOptions(rank=16, alpha=32, lr=1e-2, max_steps=steps, batch_size=8, max_length=64,
                                     warmup=5, seed=seed, compile=False),  # tiny: compiling would cost more
                        quiet=quiet)
        report.update(loss_before=summary["first_loss"], loss_after=summary["final_loss"])
    else:
        write_lora_adapter(paths["adapter"], config, rank=16, alpha=32, seed=seed + 1)
    t["train" if trained else "adapter"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    merge_report = merge_checkpoint(paths["base"], [paths["adapter"]], paths["merged"], force=True)
    t["merge"] = time.perf_counter() - t0
    n_layers, worst = check_merge(paths["base"], paths["adapter"], paths["merged"], np.random.default_rng(seed))
    if trained:
        from minilora import data

        tok, _, _ = data.load_tokenizer(paths["base"])
        ids = tok.encode(open(TEXT).read()).ids
        report["logits_rel_diff"] = _logits_check(paths["base"], paths["adapter"], paths["merged"], ids)
    t0 = time.perf_counter()
    q_report = quantize_checkpoint(paths["merged"], paths["merged-nf4"], force=True)
    t["quantize"] = time.perf_counter() - t0
    report.update({
        "trained": trained, "layers_checked": n_layers, "worst_error_over_bound": worst,
        "check_passed": worst <= 1.0 and report.get("logits_rel_diff", 0.0) <= 1e-4,
        "tensors_merged": merge_report["totals"]["changed"],
        "sizes": {k: _size(p) for k, p in paths.items()},
        "nf4_max_abs_error": q_report["totals"]["max_abs_error"],
        "seconds": {k: round(v, 3) for k, v in t.items()},
    })
    if tmp:
        tmp.cleanup()
    return report
