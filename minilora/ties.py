"""Merging a stack of task tensors: task arithmetic, magnitude pruning, TIES and DARE, in NumPy.

With task tensors ``T_i`` (all one shape) and weights ``w_i``:

* ``linear``:           ``Σ w_i T_i``
* ``magnitude_prune``:  ``Σ w_i top_density(T_i)``                       (keep the largest |entries|)
* ``ties``:             ``disjoint(w_i top_density(T_i))``               (Yadav et al. 2023, §3)
* ``dare_linear``:      ``Σ w_i m_i ⊙ T_i / density``, ``m_i ~ Bernoulli(density)``  (Yu et al. 2023, §3)
* ``dare_ties``:        ``disjoint(w_i m_i ⊙ T_i / density)``

``disjoint`` elects a sign per entry from the pruned, *unweighted* tensors — the sign of their sum
(``total``) or of the sum of their signs (``frequency``), a tie electing + — and averages the weighted
entries that carry the elected sign: ``Σ / max(count, 1)``. This is PEFT's ``utils/merge_utils.py``
(0.21) step for step, including ``k = int(density · numel)`` and "density ≥ 1 prunes nothing".

DARE masks come from ``numpy.random.default_rng(seed)`` (``rng.random(shape) < density``), so they
differ from PEFT's ``torch.bernoulli`` draws; an oracle passes the masks in instead. Not here: the
LoRA factors and scalings (``minilora.arithmetic``).
"""
import numpy as np

F64 = np.float64
FACTOR_MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def prune_magnitude(t, density):
    """Keep the ``int(density · t.size)`` entries of largest magnitude, zero the rest (density ≥ 1: all)."""
    t = np.asarray(t, F64)
    if density >= 1:
        return t
    k = int(density * t.size)
    flat = np.abs(t).ravel()  # (numel,)
    keep = np.zeros(t.size, dtype=bool)  # (numel,)
    if k > 0:
        keep[np.argpartition(-flat, k - 1)[:k]] = True
    return t * keep.reshape(t.shape)


def random_mask(rng, shape, density):
    """A DARE keep-mask: each entry kept with probability ``density``."""
    return rng.random(shape) < density


def prune_random(t, density, mask):
    """DARE: ``mask ⊙ t / density`` (density ≥ 1: ``t`` unchanged, no mask used, as PEFT)."""
    t = np.asarray(t, F64)
    if density >= 1:
        return t
    if mask.shape != t.shape:
        raise ValueError(f"DARE mask has shape {mask.shape}, the tensor {t.shape}")
    return t * mask / density


def majority_sign_mask(stack, method="total"):
    """``(n, ...)`` bool: which entries of each tensor carry the elected sign (zeros never do)."""
    if method not in SIGN_METHODS:
        raise ValueError(f"majority sign method must be one of {SIGN_METHODS}, got {method!r}")
    sign = np.sign(stack)  # (n, ...)
    votes = stack.sum(axis=0) if method == "total" else sign.sum(axis=0)  # (...)
    elected = np.where(votes >= 0, 1.0, -1.0)  # (...)
    return sign == elected


def disjoint_merge(weighted, mask):
    """Mean of the weighted entries that agree with the elected sign: ``Σ / max(count, 1)``."""
    count = mask.sum(axis=0)  # (...)
    return (weighted * mask).sum(axis=0) / np.maximum(count, 1)


def merge_tensors(method, tensors, weights, density=1.0, majority_sign="total", masks=None):
    """Merge ``tensors`` (a list of equal-shape arrays) with ``weights`` by ``method`` (one of
    ``FACTOR_MERGES``). ``masks``: one DARE keep-mask per tensor (``dare_*`` with density < 1 only).
    Float64 result."""
    if method not in FACTOR_MERGES:
        raise ValueError(f"method must be one of {FACTOR_MERGES}, got {method!r}")
    w = np.asarray(weights, F64).reshape((-1,) + (1,) * np.ndim(tensors[0]))  # (n, 1, ...)
    if method in ("ties", "magnitude_prune"):
        tensors = [prune_magnitude(t, density) for t in tensors]
    elif method.startswith("dare") and density < 1:
        tensors = [prune_random(t, density, m) for t, m in zip(tensors, masks)]
    stack = np.stack([np.asarray(t, F64) for t in tensors])  # (n, ...)
    if method in ("ties", "dare_ties"):
        return disjoint_merge(stack * w, majority_sign_mask(stack, majority_sign))
    return (stack * w).sum(axis=0)
