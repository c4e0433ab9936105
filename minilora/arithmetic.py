"""Adapter arithmetic: combine LoRA adapters module by module, the NumPy reference.

Adapter ``i`` changes a module by ``Δ_i = s_i B_i A_i`` (``s_i`` its own alpha/r or alpha/√r, rank and
alpha patterns applied); with weights ``w_i`` the exact combination is ``D = Σ w_i Δ_i``. Weighted
sums, differences (``w = (1, −1)``), negation (``w = −1``) and scaling are this one formula.

* ``cat``: ``A = [w_i s_i A_i]`` (rows), ``B = [B_i]`` (columns) — exact, rank Σ r_i.
* ``linear``, ``ties``, ``dare_*``, ``magnitude_prune``: merge the A's with weights ``sign(c_i)√|c_i|``
  and the B's with ``√|c_i|`` (``c_i = w_i s_i``), see ``minilora.ties`` — PEFT's factor-wise
  approximation: ``BA`` picks up cross terms ``B_i A_j``. Equal ranks only.
* ``svd`` and ``*_svd``: merge the full ``Δ_i`` (``svd``: ``D`` itself), then ``U S Vᵀ = svd``,
  ``B = U_r S_r``, ``A = V_rᵀ`` — exact when r ≥ rank(D); optionally clamp both factors to the
  ``clamp`` quantile of their entries (PEFT's ``svd_clamp``).

The result always has scaling 1 (``r = alpha`` per module) and no rsLoRA / DoRA flag. This is PEFT's
``add_weighted_adapter`` (0.21) without its defects: SVD paths scaled twice (``Σ w_i s_i² B_i A_i``,
PEFT ≤ 0.20) and the first adapter's ``use_rslora`` inherited, inflating ``BA`` by √r' (0.21); see
docs/arithmetic.md. Not here: file I/O beyond ``combine_files``, resize and extract (``minilora.extract``).
"""
import collections
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from minilora import lora
from minilora.checkpoint import LoraModule, load_adapter, save_adapter
from minilora.errors import InputError
from minilora.output import check_output, staged_folder
from minilora.ties import FACTOR_MERGES, SIGN_METHODS, merge_tensors, random_mask

F32, F64 = np.float32, np.float64
METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
DENSITY_METHODS = tuple(m for m in METHODS if m not in ("cat", "linear", "svd"))


@dataclass
class Term:
    """Adapter ``index``'s part in one module: it contributes ``w · s · B A``."""
    index: int
    A: np.ndarray  # (R, K)
    B: np.ndarray  # (N, R)
    s: float
    w: float


def factored_svd(B, A):
    """Thin SVD of ``B @ A`` without forming it: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``,
    ``svd(R_b R_aᵀ) = Ũ S Ṽᵀ`` → ``U = Q_b Ũ``, ``Vᵀ = Ṽᵀ Q_aᵀ``. Float64; R = columns of B."""
    Qb, Rb = np.linalg.qr(np.asarray(B, F64))  # (N, R), (R, R)
    Qa, Ra = np.linalg.qr(np.asarray(A, F64).T)  # (K, R), (R, R)
    U, S, Vt = np.linalg.svd(Rb @ Ra.T)  # (R, R), (R,), (R, R)
    return Qb @ U, S, Vt @ Qa.T  # (N, R), (R,), (R, K)


def product_norm(B, A):
    """``‖B A‖_F`` from the QR factors, accurate even when ``B A`` is a difference that nearly cancels."""
    return float(np.linalg.norm(np.linalg.qr(np.asarray(B, F64))[1] @ np.linalg.qr(np.asarray(A, F64).T)[1].T))


def exact_factors(terms):
    """``(A (ΣR, K), B (N, ΣR))`` with ``B A = Σ w s B_i A_i`` exactly: the ``cat`` combination."""
    A = np.concatenate([t.w * t.s * np.asarray(t.A, F64) for t in terms], axis=0)  # (ΣR, K)
    B = np.concatenate([np.asarray(t.B, F64) for t in terms], axis=1)  # (N, ΣR)
    return A, B


def relative_error(terms, A, B):
    """``‖B A − Σ w s B_i A_i‖_F / ‖Σ w s B_i A_i‖_F`` (0 when both are 0, inf when only the sum is)."""
    A0, B0 = exact_factors(terms)
    ref = product_norm(B0, A0)
    err = product_norm(np.concatenate([B0, -np.asarray(B, F64)], axis=1),
                       np.concatenate([A0, np.asarray(A, F64)], axis=0))  # ‖[B0, −B] [A0; A]‖
    return err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))


def svd_factors(U, S, Vt, rank, clamp=None):
    """``B = U_r S_r``, ``A = V_rᵀ``; with ``clamp``, both clipped to ±quantile(entries, clamp)."""
    B, A = U[:, :rank] * S[:rank], Vt[:rank]  # (N, r), (r, K)
    if clamp is not None:
        hi = np.quantile(np.concatenate([B.ravel(), A.ravel()]), clamp)
        B, A = np.clip(B, -hi, hi), np.clip(A, -hi, hi)
    return A, B


def combine_module(terms, method, rank=None, density=1.0, majority_sign="total", clamp=None, mask=None):
    """Combine the ``terms`` of one module by ``method``; returns ``(A (r', K), B (N, r'))`` float64.

    ``rank``: r' of the SVD methods (default: the largest input rank). ``mask(part, index, shape)``
    gives the DARE keep-mask of adapter ``index``'s tensor ``part`` ("A", "B" or "delta")."""
    if method == "cat":
        return exact_factors(terms)
    if method in FACTOR_MERGES:
        c = [t.w * t.s for t in terms]
        kw = dict(density=density, majority_sign=majority_sign)
        parts = {"A": ([t.A for t in terms], [np.sign(x) * np.sqrt(abs(x)) for x in c]),
                 "B": ([t.B for t in terms], [np.sqrt(abs(x)) for x in c])}
        out = {}
        for part, (tensors, weights) in parts.items():
            masks = ([mask(part, t.index, x.shape) for t, x in zip(terms, tensors)]
                     if method.startswith("dare") and density < 1 else None)
            out[part] = merge_tensors(method, tensors, weights, masks=masks, **kw)
        return out["A"], out["B"]
    rank = rank or max(t.A.shape[0] for t in terms)
    if method == "svd":
        A0, B0 = exact_factors(terms)
        U, S, Vt = factored_svd(B0, A0)  # of D = B0 A0, never formed
    else:
        # PEFT's task tensors are the float32 get_delta_weight(); lora.delta_weight rounds the same way.
        deltas = [lora.delta_weight(t.A, t.B, t.s) for t in terms]  # n × (N, K)
        masks = ([mask("delta", t.index, d.shape) for t, d in zip(terms, deltas)]
                 if method.startswith("dare") and density < 1 else None)
        D = merge_tensors(method[: -len("_svd")], deltas, [t.w for t in terms], density, majority_sign, masks)
        U, S, Vt = np.linalg.svd(D, full_matrices=False)  # (N, q), (q,), (q, K)
    return svd_factors(U, S, Vt, min(rank, len(S)), clamp)


def _check_options(n, weights, method, rank, density, majority_sign, clamp):
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if len(weights) != n:
        raise InputError(f"got {len(weights)} weights for {n} adapters; give one weight per adapter")
    if not all(np.isfinite(weights)):
        raise InputError(f"weights must be finite numbers, got {list(weights)}")
    if method in DENSITY_METHODS and density is None:
        raise InputError(f"method {method} needs a density in (0, 1]")
    if density is not None and not 0 < density <= 1:
        raise InputError(f"density must be in (0, 1], got {density}")
    if rank is not None and (not isinstance(rank, (int, np.integer)) or rank <= 0):
        raise InputError(f"rank must be a positive integer, got {rank!r}")
    if (rank is not None or clamp is not None) and not method.endswith("svd"):
        raise InputError(f"rank and clamp apply to the svd methods only, not to {method}")
    if clamp is not None and not 0 < clamp <= 1:
        raise InputError(f"clamp must be a quantile in (0, 1], got {clamp}")
    if majority_sign not in SIGN_METHODS:
        raise InputError(f"majority sign method must be one of {SIGN_METHODS}, got {majority_sign!r}")


def _check_adapters(adapters):
    base = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    if len(base) > 1:
        raise InputError(f"adapters are for different base models: {', '.join(sorted(base))}", adapters[1].path)
    if len({bool(a.config.get("fan_in_fan_out")) for a in adapters}) > 1:
        raise InputError("adapters disagree on fan_in_fan_out (Conv1D layout)", adapters[1].path)
    for a in adapters:
        if a.full_tensors:
            raise InputError(f"modules_to_save tensor {next(iter(a.full_tensors))} cannot be combined; "
                             "remove it from the adapter", a.path)
        for m in a.modules.values():
            if m.magnitude is not None or m.bias is not None:
                what = "DoRA magnitude" if m.magnitude is not None else "lora_B bias"
                raise InputError(f"has a {what}; only plain LoRA A/B can be combined", a.path, m.name)


def module_terms(adapters, weights):
    """``{module: [Term]}`` in order of first appearance, each adapter's scaling resolved."""
    _check_adapters(adapters)
    terms, kinds = {}, {}
    for i, (a, w) in enumerate(zip(adapters, weights)):
        cfg = a.config
        for name, m in a.modules.items():
            r, alpha = lora.module_rank_alpha(name, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                                              cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
            if m.A.shape[0] != r:
                raise InputError(f"lora_A has rank {m.A.shape[0]} but the config gives r={r}", a.path, name)
            if not (np.isfinite(m.A).all() and np.isfinite(m.B).all()):
                raise InputError("lora_A or lora_B holds NaN/inf", a.path, name)
            first = terms.setdefault(name, [])
            if first and (m.kind != kinds[name] or m.A.shape[1] != first[0].A.shape[1]
                          or m.B.shape[0] != first[0].B.shape[0]):
                f = first[0]
                raise InputError(f"shape conflict: {m.kind} A {m.A.shape}, B {m.B.shape} here but "
                                 f"{kinds[name]} A {f.A.shape}, B {f.B.shape} in {adapters[f.index].path}",
                                 a.path, name)
            kinds[name] = m.kind
            first.append(Term(i, m.A, m.B, lora.scaling(alpha, r, bool(cfg.get("use_rslora"))), float(w)))
    return terms, kinds


def lora_config(modules, template=None, **fields):
    """An adapter config with scaling 1 everywhere: ``r = lora_alpha`` = the most common rank, other
    ranks as exact-name ``rank_pattern`` / ``alpha_pattern`` entries; ``target_modules`` lists the
    modules by full name. ``fields`` override."""
    ranks = {m.name: int(m.A.shape[0]) for m in modules}
    count = collections.Counter(ranks.values())
    r = max(count, key=lambda k: (count[k], k)) if count else 1
    pattern = {re.escape(name): k for name, k in ranks.items() if k != r}
    config = dict(template or {"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.0,
                               "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True})
    config.update(r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern),
                  target_modules=sorted(ranks), use_rslora=False, use_dora=False, modules_to_save=None,
                  layers_to_transform=None, layers_pattern=None, exclude_modules=None, lora_bias=False)
    config.update(fields)
    return config


def combine_adapters(adapters, weights, method="cat", rank=None, density=None, majority_sign="total",
                     clamp=None, seed=0, masks=None):
    """Combine loaded adapters; returns ``(config, [LoraModule], rows)``, rows per module with
    ``rank_in``, ``rank_out`` and ``rel_error`` (of ``B A`` vs the exact ``Σ w_i Δ_i``).

    DARE masks: ``masks[(module, part, adapter index)]`` if given (an oracle injecting PEFT's), else
    drawn from ``default_rng(seed)`` module by module, A's then B's (or the deltas), adapter by adapter.
    Part "delta" masks are in the base weight's layout (``(V, d)`` for an embedding), like PEFT's."""
    _check_options(len(adapters), weights, method, rank, density, majority_sign, clamp)
    terms, kinds = module_terms(adapters, weights)
    rng = np.random.default_rng(seed)
    default_rank = max(max((m.A.shape[0] for m in a.modules.values()), default=1) for a in adapters)
    modules, rows = [], []
    ffio = bool(adapters[0].config.get("fan_in_fan_out"))
    for name, ts in terms.items():
        def mask(part, index, shape, name=name, flip=ffio or kinds[name] == "embedding"):
            flip = flip and part == "delta"  # delta masks are in the base layout, as get_delta_weight's
            if masks is None:
                m = random_mask(rng, shape[::-1] if flip else shape, density)
            elif (name, part, index) in masks:
                m = np.asarray(masks[(name, part, index)], dtype=bool)
            else:
                raise InputError(f"no DARE mask given for {part} of adapter {index}", tensor=name)
            return m.T if flip else m
        ranks = [t.A.shape[0] for t in ts]
        if method in FACTOR_MERGES and len(set(ranks)) > 1:
            raise InputError(f"method {method} needs equal ranks, got {ranks}; use cat or svd",
                             adapters[ts[0].index].path, name)
        N, K = ts[0].B.shape[0], ts[0].A.shape[1]
        if rank is not None and rank > min(N, K):
            raise InputError(f"rank {rank} exceeds min(N, K) = {min(N, K)} of this ({N}, {K}) module", tensor=name)
        r_out = min(rank or default_rank, N, K)
        A, B = (x.astype(F32) for x in combine_module(ts, method, r_out, density or 1.0, majority_sign, clamp, mask))
        if not (np.isfinite(A).all() and np.isfinite(B).all()):
            raise InputError("the combination overflows float32 (weights too large?)", tensor=name)
        modules.append(LoraModule(name, kinds[name], A=A, B=B))
        rows.append({"module": name, "kind": kinds[name], "adapters": [t.index for t in ts],
                     "rank_in": ranks, "rank_out": int(A.shape[0]), "rel_error": relative_error(ts, A, B)})
    base = next((a.config.get("base_model_name_or_path") for a in adapters
                 if a.config.get("base_model_name_or_path")), None)
    return lora_config(modules, adapters[0].config, base_model_name_or_path=base), modules, rows


def combine_files(paths, out, weights=None, method="cat", rank=None, density=None, majority_sign="total",
                  clamp=None, seed=0, force=False):
    """``combine_adapters`` on adapter folders; writes a PEFT adapter folder ``out``; returns a report."""
    t0 = time.perf_counter()
    out = os.path.abspath(str(out))
    check_output(out, paths, force)
    weights = [1.0] * len(paths) if weights is None else list(weights)
    _check_options(len(paths), weights, method, rank, density, majority_sign, clamp)
    adapters = [load_adapter(p) for p in paths]
    config, modules, rows = combine_adapters(adapters, weights, method, rank, density, majority_sign,
                                             clamp, seed)
    with staged_folder(out, force) as stage:
        save_adapter(stage, config, modules)
    return {"operation": "combine", "adapters": [a.path for a in adapters], "weights": weights,
            "method": method, "density": density, "majority_sign": majority_sign, "seed": seed,
            "output": out, "modules": rows,
            "totals": {"modules": len(rows), "r": config["r"],
                       "max_rel_error": max((r["rel_error"] for r in rows), default=0.0),
                       "seconds": round(time.perf_counter() - t0, 3)}}
