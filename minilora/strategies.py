"""Hypothesis strategies for kernel authors: weights, activations, blocksizes and adversarial NF4
inputs (values exactly on a decision bound and one ulp either side, all-zero / NaN / inf blocks,
subnormals). Sizes are drawn from the lengths that hit every SIMD and block tail.

    from hypothesis import given
    from minilora import nf4, strategies as st_ml, testing

    @given(st_ml.nf4_inputs())
    def test_my_kernel(case):
        x, blocksize = case
        testing.assert_nf4_equal(my_quantize(x, blocksize)[0], nf4.quantize_nf4(x, blocksize)[0], x, blocksize)
"""
try:
    from hypothesis import strategies as st
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("minilora.strategies needs hypothesis: pip install hypothesis") from e

import numpy as np

from minilora.tables import ALLOWED_BLOCKSIZES, NF4_MID, TINY

TAIL_SIZES = (1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)


def sizes(max_size=4100):
    """Lengths that hit SIMD and block tails, plus arbitrary ones up to ``max_size``."""
    return st.one_of(st.sampled_from([s for s in TAIL_SIZES if s <= max_size]),
                     st.integers(1, max_size))


def blocksizes(max_blocksize=4096):
    """The blocksizes bitsandbytes allows (32 … 4096)."""
    return st.sampled_from([b for b in ALLOWED_BLOCKSIZES if b <= max_blocksize])


def floats32(scale=1.0):
    """Finite float32 arrays of a tail-hitting length: normal values times ``scale``."""
    return sizes().flatmap(lambda n: st.integers(0, 2**32 - 1).map(
        lambda seed: (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)))


def activations(max_m=9, max_k=300):
    """``x (M, K)`` float32 activations, K hitting tails."""
    return st.tuples(st.integers(1, max_m), sizes(max_k), st.integers(0, 2**32 - 1)).map(
        lambda t: np.random.default_rng(t[2]).standard_normal((t[0], t[1])).astype(np.float32))


def weights(max_n=70, max_k=300, blocksize=None):
    """``W (N, K)`` float32 weights with std 0.02; K a multiple of ``blocksize`` when given."""
    k = sizes(max_k) if blocksize is None else st.integers(1, max(1, max_k // blocksize)).map(lambda b: b * blocksize)
    return st.tuples(st.integers(1, max_n), k, st.integers(0, 2**32 - 1)).map(
        lambda t: (np.random.default_rng(t[2]).standard_normal((t[0], t[1])) * 0.02).astype(np.float32))


def _adversarial_block(kind, blocksize, rng):
    x = rng.standard_normal(blocksize).astype(np.float32)  # (blocksize,)
    if kind == "zero":
        return np.zeros(blocksize, np.float32)
    if kind in ("nan", "inf", "-inf"):
        x[rng.integers(blocksize)] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
        return x
    if kind == "subnormal":
        return (rng.uniform(-1, 1, blocksize) * float(TINY)).astype(np.float32)
    if kind == "bounds":
        # absmax exactly 1.0, so normalised values ARE the inputs: bounds and their neighbours.
        mids = NF4_MID[rng.integers(0, len(NF4_MID), blocksize)]  # (blocksize,)
        step = rng.integers(-1, 2, blocksize)
        x = np.nextafter(mids, np.where(step < 0, -np.inf, np.inf).astype(np.float32))
        x = np.where(step == 0, mids, x).astype(np.float32)
        x[0] = 1.0
        return x
    if kind == "absmax":
        x[: 2] = [np.abs(x).max(), -np.abs(x).max()]  # ±absmax
        return x
    return x


def nf4_inputs(max_blocks=6):
    """``(x, blocksize)``: float32 vectors of whole and partial blocks, each block random or adversarial."""
    kinds = st.sampled_from(["random", "zero", "nan", "inf", "-inf", "subnormal", "bounds", "absmax"])
    return st.tuples(blocksizes(256), st.lists(kinds, min_size=1, max_size=max_blocks),
                     st.integers(0, 255), st.integers(0, 2**32 - 1)).map(_assemble)


def _assemble(t):
    blocksize, kinds, cut, seed = t
    rng = np.random.default_rng(seed)
    x = np.concatenate([_adversarial_block(k, blocksize, rng) for k in kinds])  # (blocks*blocksize,)
    n = max(1, x.size - cut % blocksize)  # a partial last block most of the time
    return x[:n].copy(), blocksize
