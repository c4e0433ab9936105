"""The C LoRA merge kernel (csrc/lora_merge.c) against minilora.lora: the same bits for every variant,
dtype, layout and thread count; the same errors; NaN / inf reported with the first index."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from minilora import lora, native, native_merge

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
VARIANTS = native.available_variants()
K_SIZES = st.sampled_from([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 511, 512, 513, 1031])


def _case(N, K, R, dtype, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((N, K)) * 0.02).astype(dtype)  # (N, K)
    A = (rng.standard_normal((R, K)) * scale).astype(np.float32)  # (R, K)
    B = (rng.standard_normal((N, R)) * scale).astype(np.float32)  # (N, R)
    return W, A, B


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), K_SIZES, st.integers(1, 17), st.sampled_from(DTYPES), st.booleans(),
       st.sampled_from([2.0, -0.5, 5.656854249492381, 0.0]), st.integers(0, 2**32 - 1))
@example(1, 1, 1, np.float32, False, 2.0, 0)
def test_merge_and_unmerge_bit_exact(N, K, R, dtype, ffio, s, seed):
    W, A, B = _case(N, K, R, dtype, seed)
    if ffio:
        W = np.ascontiguousarray(W.T)  # Conv1D layout (K, N)
    ref = lora.merge_weight(W, A, B, s, ffio)
    back = lora.unmerge_weight(ref, A, B, s, ffio)
    for variant in VARIANTS:
        for threads in (1, 2):
            out, max_delta, bad, first = native_merge.merge_weight_stats(W, A, B, s, ffio, variant=variant, num_threads=threads)
            assert out.dtype == W.dtype and out.shape == W.shape
            assert out.tobytes() == ref.tobytes(), (variant, threads)
            assert bad == 0 and first == -1
            expect = np.max(np.abs(ref.astype(np.float32) - W.astype(np.float32)), initial=0.0)
            assert max_delta == expect
            assert native_merge.unmerge_weight(ref, A, B, s, ffio, variant=variant).tobytes() == back.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_overflow_is_reported_like_the_reference(dtype, variant):
    W, A, B = _case(5, 37, 4, dtype, 1, scale=1.0)
    s = 3e38 if dtype != np.float16 else 1e5
    with pytest.raises(ValueError) as ref_err:
        lora.merge_weight(W, A, B, s)
    with pytest.raises(ValueError) as out_err:
        native_merge.merge_weight(W, A, B, s, variant=variant)
    assert str(out_err.value) == str(ref_err.value)
    _, _, bad, first = native_merge.merge_weight_stats(W, A, B, s, variant=variant)
    with np.errstate(over="ignore"):
        expected = (W.astype(np.float32) + lora.delta_weight(A, B, s)).astype(dtype).astype(np.float32)
    assert bad == int(np.count_nonzero(~np.isfinite(expected)))
    assert first == int(np.flatnonzero(~np.isfinite(expected))[0])


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_and_inf_in_the_base_stay_and_are_not_blamed(variant):
    W, A, B = _case(3, 20, 2, np.float32, 2)
    W[1, 3], W[2, 19] = np.nan, np.inf
    out, _, bad, _ = native_merge.merge_weight_stats(W, A, B, 2.0, variant=variant)
    ref = lora.merge_weight(W, A, B, 2.0)
    assert bad == 0 and np.isnan(out[1, 3]) and np.isinf(out[2, 19])
    finite = np.isfinite(ref)
    assert out[finite].tobytes() == ref[finite].tobytes()


def test_bad_arguments_raise_the_reference_types():
    W, A, B = _case(4, 8, 2, np.float32, 3)
    with pytest.raises(ValueError):
        native_merge.merge_weight(W, A[:, :7], B, 1.0)
    with pytest.raises(ValueError):
        lora.merge_weight(W, A[:, :7], B, 1.0)
    with pytest.raises(TypeError):
        native_merge.merge_weight(W.astype(np.float64), A, B, 1.0)
    with pytest.raises(ValueError):
        native_merge.merge_weight(W, A, B, 1.0, variant="sse9")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("ffio", [False, True])
def test_in_place_merge_gives_the_same_bits(dtype, variant, ffio):
    W, A, B = _case(37, 70, 5, dtype, 4)  # odd row count: the paired-row path and the single-row tail
    if ffio:
        W = np.ascontiguousarray(W.T)
    ref, ref_delta, _, _ = native_merge.merge_weight_stats(W, A, B, 2.0, ffio, variant=variant)
    buf = W.copy()
    out, max_delta, bad, _ = native_merge.merge_weight_stats(buf, A, B, 2.0, ffio, variant=variant, out=buf)
    assert out is buf and bad == 0 and max_delta == ref_delta
    assert buf.tobytes() == ref.tobytes() == lora.merge_weight(W, A, B, 2.0, ffio).tobytes()


def test_out_must_fit_and_must_not_partly_overlap():
    W, A, B = _case(4, 16, 2, np.float32, 5)
    with pytest.raises(ValueError, match="out must be"):
        native_merge.merge_weight_stats(W, A, B, 1.0, out=np.empty((4, 15), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        native_merge.merge_weight_stats(W, A, B, 1.0, out=np.empty((4, 16), np.float16))
    big = np.zeros(80, np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        native_merge.merge_weight_stats(big[:64].reshape(4, 16), A, B, 1.0, out=big[16:].reshape(4, 16))
    # A or B inside out's memory: out=W in place, or a separate out (a silently wrong merge before)
    W = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    for kwargs in ({"A": W[:4], "B": np.ones((64, 4), np.float32)},
                   {"A": np.ones((4, 64), np.float32), "B": W.reshape(-1)[:256].reshape(64, 4)}):
        with pytest.raises(ValueError, match="out overlaps [AB]"):
            native_merge.merge_weight_stats(W, s=1.0, out=W, **kwargs)
    out = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="out overlaps A"):
        native_merge.merge_weight_stats(W.copy(), out[:4], np.ones((64, 4), np.float32), 1.0, out=out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_merge_reports_nan_and_overflow_like_a_fresh_output(dtype, variant):
    W, A, B = _case(6, 45, 3, dtype, 6, scale=1.0)
    W[0, 3], W[2, 40], W[5, 0] = np.nan, np.inf, -np.inf        # special base values stay, are not blamed
    big = 3e38 if dtype != np.float16 else 1e5                  # and most lanes overflow
    for s in (2.0, big, float("inf")):
        ref = native_merge.merge_weight_stats(W, A, B, s, variant=variant)
        buf = W.copy()
        got = native_merge.merge_weight_stats(buf, A, B, s, variant=variant, out=buf)
        assert got[1:] == ref[1:], s                             # max |Δ|, count, first index
        assert buf.tobytes() == ref[0].tobytes(), s
    assert ref[2] > 0
