"""Low-rank approximations by truncated SVD: shrink an adapter (``resize``) and pull a LoRA adapter out
of a fine-tuned checkpoint and its base (``extract``, as mergekit's ``extract-lora``).

Both split ``U S Vᵀ = svd(D)`` as ``B = U_r √S_r``, ``A = √S_r V_rᵀ`` with ``r = alpha`` (scaling 1).
``resize``: ``D = s·B A`` of each module, taken from the factors (``arithmetic.factored_svd``), so
resizing to the module's own rank is lossless. ``extract``: ``D = W_ft − W_base`` per Linear weight,
both checkpoints streamed tensor by tensor; rank fixed, or per module the smallest rank whose singular
values keep ``energy`` of ``‖D‖_F²``. Embeddings are kept full-rank (``modules_to_save``) unless
``embed_lora``; 1-D tensors (norms) that changed cannot be a LoRA and are listed, not extracted.

For a fixed rank ``k`` much below ``min(N, K)`` the SVD is randomized (Halko, Martinsson & Tropp 2011,
Alg. 4.4: ``k + 10`` Gaussian probes, 4 power iterations with re-orthonormalisation); every module's
reported error is measured on the residual ``D − B A`` itself, so it is honest for either SVD. Not
here: Conv1D (GPT-2) layouts and tied embeddings (``W_ft`` of those is treated as ``(N, K)``).
"""
import os
import time

import numpy as np

from minilora.arithmetic import factored_svd, lora_config
from minilora.checkpoint import Checkpoint, LoraModule, load_adapter, save_adapter
from minilora.dtypes import is_float
from minilora.errors import InputError
from minilora.lora import module_rank_alpha, scaling
from minilora.output import check_output, staged_folder
from minilora.progress import Progress

F32, F64 = np.float32, np.float64
SVD_MODES = ("auto", "exact", "randomized")
EMBED_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in")
OVERSAMPLE, POWER_ITERATIONS = 10, 4


def randomized_svd(D, k, n_iter=POWER_ITERATIONS, oversample=OVERSAMPLE, seed=0):
    """Approximate top-``k`` ``(U (N, k), S (k,), Vt (k, K))`` of ``D`` in D's precision (float32 here)."""
    N, K = D.shape
    l = min(k + oversample, N, K)
    G = np.random.default_rng(seed).standard_normal((K, l)).astype(D.dtype)  # (K, l)
    Q = np.linalg.qr(D @ G)[0]  # (N, l)
    for _ in range(n_iter):  # re-orthonormalise each half step, or small singular values drown
        Q = np.linalg.qr(D @ np.linalg.qr(D.T @ Q)[0])[0]  # (N, l)
    Uh, S, Vt = np.linalg.svd((Q.T @ D).astype(F64), full_matrices=False)  # (l, l), (l,), (l, K)
    return Q @ Uh[:, :k], S[:k], Vt[:k]  # (N, k), (k,), (k, K)


def choose_rank(S, total, rank=None, energy=None):
    """The rank to keep: ``rank``, or the smallest k with ``Σ_{j≤k} S_j² ≥ energy · total`` (at most
    ``rank`` when both are given)."""
    if energy is None:
        return min(rank, len(S))
    kept = np.cumsum(np.asarray(S, F64) ** 2)  # (q,)
    k = int(np.searchsorted(kept, energy * total * (1 - 1e-12))) + 1
    return max(1, min(k, len(S), rank or len(S)))


def split_factors(U, S, Vt, k):
    """``A = √S_k V_kᵀ (k, K)``, ``B = U_k √S_k (N, k)``."""
    root = np.sqrt(S[:k])  # (k,)
    return root[:, None] * Vt[:k], U[:, :k] * root  # (k, K), (N, k)


def check_rank(rank, energy, shape, path=None, tensor=None):
    if rank is None and energy is None:
        raise InputError("give a rank, an energy threshold, or both")
    if rank is not None and (not isinstance(rank, (int, np.integer)) or rank <= 0):
        raise InputError(f"rank must be a positive integer, got {rank!r}", path, tensor)
    if rank is not None and rank > min(shape):
        raise InputError(f"rank {rank} exceeds min(N, K) = {min(shape)} of this {tuple(shape)} matrix", path, tensor)
    if energy is not None and not 0 < energy <= 1:
        raise InputError(f"energy threshold must be in (0, 1], got {energy}", path, tensor)


def low_rank(D, rank=None, energy=None, svd="auto", path=None, tensor=None):
    """``(A, B, info)`` with ``B A ≈ D (N, K)``; info: rank, ``rel_error = ‖D − B A‖_F / ‖D‖_F``,
    ``discarded_energy`` (its square) and which SVD ran."""
    check_rank(rank, energy, D.shape, path, tensor)
    if svd not in SVD_MODES:
        raise InputError(f"svd must be one of {SVD_MODES}, got {svd!r}")
    use_random = svd == "randomized" or (svd == "auto" and energy is None
                                         and 4 * (rank + OVERSAMPLE) <= min(D.shape))
    if use_random and energy is None:
        U, S, Vt = randomized_svd(D, rank)
    else:
        U, S, Vt = np.linalg.svd(D, full_matrices=False)  # (N, q), (q,), (q, K)
    total = float(np.linalg.norm(D.astype(F64)) ** 2)
    k = choose_rank(S, total, rank, energy)
    A, B = split_factors(U, S, Vt, k)
    A, B = A.astype(F32), B.astype(F32)
    residual = float(np.linalg.norm(D - B @ A)) ** 2  # (N, K) formed once: the honest error
    rel = np.sqrt(residual / total) if total > 0 else 0.0
    return A, B, {"rank_out": int(k), "rel_error": float(rel), "discarded_energy": float(rel**2),
                  "svd": "randomized" if use_random and energy is None else "exact"}


def resize_adapter(adapter, rank=None, energy=None):
    """Every module of ``adapter`` to ``rank`` (or by ``energy``); returns ``(config, modules, rows)``.
    A module already at or below ``rank`` keeps its rank (and loses nothing)."""
    cfg, modules, rows = adapter.config, [], []
    for name, m in adapter.modules.items():
        if m.magnitude is not None or m.bias is not None:
            raise InputError("has a DoRA magnitude or lora_B bias; resize handles plain LoRA only", adapter.path, name)
        N, K = m.B.shape[0], m.A.shape[1]
        check_rank(rank, energy, (N, K), adapter.path, name)
        r, alpha = module_rank_alpha(name, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                                     cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
        s = scaling(alpha, r, bool(cfg.get("use_rslora")))
        U, S, Vt = factored_svd(s * np.asarray(m.B, F64), m.A)  # (N, R), (R,), (R, K)
        total = float(np.sum(S**2))
        k = choose_rank(S, total, rank, energy)
        A, B = split_factors(U, S, Vt, k)
        modules.append(LoraModule(name, m.kind, A=A.astype(F32), B=B.astype(F32)))
        lost = float(np.sum(S[k:] ** 2) / total) if total > 0 else 0.0
        rows.append({"module": name, "kind": m.kind, "rank_in": int(m.A.shape[0]), "rank_out": int(k),
                     "discarded_energy": lost, "rel_error": float(np.sqrt(lost))})
    config = lora_config(modules, cfg, modules_to_save=cfg.get("modules_to_save"))
    return config, modules, rows


def resize_file(path, out, rank=None, energy=None, force=False):
    """``resize_adapter`` on an adapter folder; writes ``out``; returns a report."""
    t0 = time.perf_counter()
    out = os.path.abspath(str(out))
    check_output(out, [path], force)
    adapter = load_adapter(path)
    config, modules, rows = resize_adapter(adapter, rank, energy)
    with staged_folder(out, force) as stage:
        save_adapter(stage, config, modules, adapter.full_tensors)
    return _report("resize", [adapter.path], out, rows, t0, rank=rank, energy=energy)


def _report(operation, inputs, out, rows, t0, **extra):
    return {"operation": operation, "inputs": inputs, "output": out, **extra, "modules": rows,
            "totals": {"modules": len(rows), "max_rel_error": max((r["rel_error"] for r in rows), default=0.0),
                       "seconds": round(time.perf_counter() - t0, 3)}}


def extract_checkpoints(base, finetuned, out, rank=None, energy=None, embed_lora=False, svd="auto",
                        force=False, quiet=True):
    """Extract a LoRA adapter ``W_ft − W_base ≈ B A`` into the PEFT folder ``out``; returns a report
    (per module: shape, rank, relative error; unchanged, full-rank and not-extracted tensors)."""
    t0 = time.perf_counter()
    out = os.path.abspath(str(out))
    check_output(out, [base, finetuned], force)
    check_rank(rank, energy, (float("inf"),) * 2)
    modules, full, rows = [], {}, []
    skipped = {"unchanged": [], "not_extracted": []}
    with Checkpoint(base) as cb, Checkpoint(finetuned) as cf:
        total = sum(cf.info(k)[2] for k in cf.keys())
        with Progress(total, "extract", enabled=not quiet) as progress:
            for name in cf.keys():
                _, shape, nbytes = cf.info(name)
                if name not in cb:
                    raise InputError(f"tensor is missing from the base {cb.path} (checkpoints of different "
                                     "models?)", cf.path, name)
                if tuple(cb.info(name)[1]) != tuple(shape):
                    raise InputError(f"shape {tuple(shape)} here but {tuple(cb.info(name)[1])} in the base "
                                     f"{cb.path}", cf.path, name)
                progress.update(nbytes, name)
                if not (is_float(cf.info(name)[0]) and is_float(cb.info(name)[0])):
                    continue
                D = cf.get(name).astype(F32) - cb.get(name).astype(F32)  # W's shape
                if not np.isfinite(D).all():
                    raise InputError("W_ft − W_base has NaN/inf entries", cf.path, name)
                if not D.any():
                    skipped["unchanged"].append(name)
                    continue
                module = name[: -len(".weight")] if name.endswith(".weight") else None
                if D.ndim != 2 or module is None:
                    skipped["not_extracted"].append(name)
                    continue
                embedding = module.rsplit(".", 1)[-1] in EMBED_NAMES
                if embedding and not embed_lora:
                    full[name] = cf.get(name)
                    continue
                # Embedding LoRA stores ΔW (V, d) as (B A)ᵀ: B (d, R), A (R, V).
                A, B, info = low_rank(D.T if embedding else D, rank, energy, svd, cf.path, name)
                kind = "embedding" if embedding else "linear"
                modules.append(LoraModule(module, kind, A=A, B=B))
                rows.append({"module": module, "kind": kind, "shape": list(shape), **info})
        if not modules:
            hint = "; only embeddings changed: pass --embed-lora" if full else ""
            raise InputError(f"no Linear weight differs from the base {cb.path}{hint}", cf.path)
        task = "CAUSAL_LM" if any(a.endswith("ForCausalLM") for a in (cb.config or {}).get("architectures", [])) else None
    saved = sorted(n[: -len(".weight")] for n in full) or None
    config = lora_config(modules, None, base_model_name_or_path=os.path.abspath(str(base)),
                         modules_to_save=saved, task_type=task)
    with staged_folder(out, force) as stage:
        save_adapter(stage, config, modules, full)
    return _report("extract", [os.path.abspath(str(base)), os.path.abspath(str(finetuned))], out, rows, t0,
                   rank=rank, energy=energy, full_rank=sorted(full), **skipped)
