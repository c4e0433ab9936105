"""Every C variant equals the NumPy reference: bit for bit for quantise / dequantise / double quantisation,
within the derived bound gamma_K * (|x| @ |w|.T) for the matmul. Needs no GPU, torch or bitsandbytes."""
import json
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minilora import double_quant, native, nf4
from minilora.tables import ALLOWED_BLOCKSIZES, NF4_MID, TINY
from minilora.tables import NF4 as NF4_VALUES

VARIANTS = native.available_variants()             # ("ref",) or ("ref", "avx2")
MATMUL_VARIANTS = native.matmul_variants()         # VARIANTS, plus "avx512" where the CPU has AVX-512F
SIZES = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4099]
OUT_DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
U = 2.0 ** -24
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # examples: the profile (tests/conftest.py)

F32 = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)
NORMAL = st.floats(-4.0, 4.0, width=32)


@st.composite
def float32_vectors(draw, sizes=SIZES, elements=None):
    """float32 (n,): mostly normal data with edge values (NaN, inf, subnormals, zeros) mixed in."""
    n = draw(st.sampled_from(sizes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * draw(st.sampled_from([1.0, 1e-3, 1e30, 1e-40]))).astype(np.float32)
    for i in draw(st.lists(st.integers(0, n - 1), max_size=4)):
        x[i] = draw(elements if elements is not None else F32)
    return x


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


def assert_same_float32(out, ref):
    """Bit-equal, except that any NaN equals any NaN."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))


# ---------------------------------------------------------------- quantise
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(x=float32_vectors(), blocksize=st.sampled_from(ALLOWED_BLOCKSIZES))
def test_quantize_equals_reference(variant, x, blocksize):
    ref_packed, ref_absmax = nf4.quantize_nf4(x, blocksize)
    out_packed, out_absmax = native.quantize_nf4(x, blocksize, variant=variant)
    np.testing.assert_array_equal(out_packed, ref_packed)
    assert out_packed.shape == ref_packed.shape
    assert_same_float32(out_absmax, ref_absmax)


def _edge_cases():
    mid = NF4_MID.astype(np.float32)
    yield "all-zero full block", np.zeros(64, np.float32)
    yield "all-zero partial block", np.zeros(37, np.float32)
    yield "plus/minus absmax", np.array([3.0, -3.0] * 40, np.float32)
    yield "values on every bound", np.concatenate([mid, -mid, [1.0, -1.0]] * 2).astype(np.float32)
    yield "bounds in a partial block", np.concatenate([mid, [1.0]]).astype(np.float32)
    yield "nan in a block", np.array([1.0] * 10 + [np.nan] + [0.5] * 60, np.float32)
    yield "inf in a block", np.array([1.0] * 10 + [np.inf] + [-0.5] * 60, np.float32)
    yield "-inf in a partial block", np.array([1.0, -np.inf, 2.0], np.float32)
    yield "subnormals only", (np.arange(1, 100) * np.float32(1e-45)).astype(np.float32)
    yield "tiny absmax", np.full(70, TINY, np.float32)
    yield "negative zero", np.full(65, -0.0, np.float32)
    yield "huge", np.full(65, np.finfo(np.float32).max, np.float32) * np.float32(-1)
    # Decision bounds scaled by an absmax that is not 1 (x/a and x·(1/a) round differently here), ±3 ulps,
    # in a full block and in a partial one.
    near = np.concatenate([np.nextafter(mid * np.float32(3), np.float32(np.inf * s)) if s else mid * np.float32(3)
                           for s in (0, -1, 1)] + [[3.0]]).astype(np.float32)
    near = np.concatenate([near, near + np.float32(0) * near, near]).astype(np.float32)
    steps = [near]
    for _ in range(2):
        steps.append(np.nextafter(steps[-1], np.float32(np.inf)))
        steps.append(np.nextafter(steps[-2], np.float32(-np.inf)))
    bounds = np.concatenate(steps).astype(np.float32)
    yield "bounds x 3 +-ulps, full blocks", np.concatenate([bounds, -bounds])[: len(bounds) // 64 * 64]
    yield "bounds x 3 +-ulps, partial block", np.concatenate([[3.0], bounds[:40]]).astype(np.float32)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,x", list(_edge_cases()), ids=[n for n, _ in _edge_cases()])
@pytest.mark.parametrize("blocksize", [32, 64])
def test_quantize_edge_cases(variant, name, x, blocksize):
    ref_packed, ref_absmax = nf4.quantize_nf4(x, blocksize)
    out_packed, out_absmax = native.quantize_nf4(x, blocksize, variant=variant)
    np.testing.assert_array_equal(out_packed, ref_packed)
    assert_same_float32(out_absmax, ref_absmax)


NF4_VECTORS = np.load(pathlib.Path(__file__).parent / "data" / "nf4" / "vectors.npz")
NF4_META = json.loads((pathlib.Path(__file__).parent / "data" / "nf4" / "meta.json").read_text())
NF4_CASES = [c for c in NF4_META["cases"] if c.get("kind") != "nested" and c["quant_type"] == "nf4"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_quantize_matches_bitsandbytes_vectors(variant):
    """Every C variant against bitsandbytes' own output (tests/data/nf4, generated by bitsandbytes 0.50.2),
    not only against the NumPy reference: random data, ties on decision bounds, special blocks."""
    dtypes = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    for case in NF4_CASES:
        name, bs = case["name"], case["blocksize"]
        x = NF4_VECTORS[f"{name}__x"].view(dtypes[case["dtype"]])
        packed, absmax = native.quantize_nf4(x, bs, variant=variant)
        want = NF4_VECTORS[f"{name}__absmax"].view(np.float32)  # (stored as bits)
        np.testing.assert_array_equal(packed.reshape(-1), NF4_VECTORS[f"{name}__packed"].reshape(-1), err_msg=name)
        np.testing.assert_array_equal(np.isnan(absmax), np.isnan(want), err_msg=name)
        ok = ~np.isnan(want)
        np.testing.assert_array_equal(absmax.view(np.uint32)[ok], want.view(np.uint32)[ok], err_msg=name)


def test_quantize_spec_consequences():
    packed, absmax = native.quantize_nf4(np.zeros(64, np.float32))
    assert (packed == 0x77).all() and absmax[0] == 0.0
    packed, absmax = native.quantize_nf4(np.zeros(10, np.float32))
    assert absmax.view(np.uint32)[0] == np.float32(TINY).view(np.uint32)
    packed, absmax = native.quantize_nf4(np.array([1.0] * 63 + [np.nan], np.float32))
    assert np.isnan(absmax[0]) and (packed == 0xFF).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_half_inputs_give_their_float32_image(variant):
    x = np.random.default_rng(1).standard_normal(301).astype(np.float32)
    for half in (np.float16, ml_dtypes.bfloat16):
        xh = x.astype(half)
        out = native.quantize_nf4(xh, 64, variant=variant)
        ref = native.quantize_nf4(xh.astype(np.float32), 64, variant=variant)
        np.testing.assert_array_equal(out[0], ref[0])
        np.testing.assert_array_equal(out[1], ref[1])


# ---------------------------------------------------------------- dequantise
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(n=st.sampled_from(SIZES), blocksize=st.sampled_from(ALLOWED_BLOCKSIZES),
       seed=st.integers(0, 2**32 - 1), specials=st.lists(F32, max_size=3))
def test_dequantize_equals_reference(variant, n, blocksize, seed, specials):
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, ((n + 1) // 2, 1), dtype=np.uint8)
    absmax = (rng.random(-(-n // blocksize)) * 10).astype(np.float32)
    for i, value in enumerate(specials[: absmax.size]):
        absmax[i] = value
    for dtype in OUT_DTYPES:
        ref = nf4.dequantize_nf4(packed, absmax, (n,), dtype, blocksize)
        out = native.dequantize_nf4(packed, absmax, (n,), dtype, blocksize, variant=variant)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        np.testing.assert_array_equal(bits(out), bits(ref))


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantize_bf16_keeps_every_nan(variant):
    """A NaN absmax with a large payload (bitsandbytes stores 0xffffffff for a partial NaN block) stays NaN in
    bfloat16: bitsandbytes' rounding formula would wrap 0xffff8000.. to +0.0 and 0x7fff8000.. to -0.0. Found by
    hypothesis on the GPU machine (its seed drew a payload >= 0x8000); both C variants rounded such NaNs."""
    payloads = [0xFFFFFFFF, 0xFFFF8000, 0x7FFFFFFF, 0x7FFF8000, 0x7FDB8000, 0xFFC00001, 0x7FC00000, 0x7F800001]
    absmax = np.array(payloads + [0x3F800000] * 4, dtype=np.uint32).view(np.float32)  # then 4 blocks of 1.0
    rng = np.random.default_rng(11)
    n = 64 * absmax.size
    packed = rng.integers(0, 256, (n // 2, 1), dtype=np.uint8)
    ref = nf4.dequantize_nf4(packed, absmax, (n,), ml_dtypes.bfloat16, 64)
    out = native.dequantize_nf4(packed, absmax, (n,), ml_dtypes.bfloat16, 64, variant=variant)
    assert np.isnan(out[: 64 * len(payloads)].astype(np.float32)).all()
    np.testing.assert_array_equal(bits(out), bits(ref))


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantize_half_outputs_cover_subnormals_overflow_and_ties(variant):
    n = 64 * 400
    rng = np.random.default_rng(6)
    packed = rng.integers(0, 256, (n // 2, 1), dtype=np.uint8)
    absmax = np.logspace(-9, 6, n // 64).astype(np.float32)  # float16 subnormals ... overflow to inf
    for dtype in OUT_DTYPES:
        ref = nf4.dequantize_nf4(packed, absmax, (n,), dtype, 64)
        out = native.dequantize_nf4(packed, absmax, (n,), dtype, 64, variant=variant)
        np.testing.assert_array_equal(bits(out), bits(ref))


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_shape_and_dtype(variant):
    x = np.random.default_rng(2).standard_normal((33, 65)).astype(ml_dtypes.bfloat16)
    packed, absmax = native.quantize_nf4(x, 128, variant=variant)
    out = native.dequantize_nf4(packed, absmax, x.shape, x.dtype, 128, variant=variant)
    ref = nf4.dequantize_nf4(*nf4.quantize_nf4(x, 128), x.shape, x.dtype, 128)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(bits(out), bits(ref))


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("variant", VARIANTS)
def test_thread_count_changes_no_bit(variant):
    x = np.random.default_rng(3).standard_normal(64 * 1000 + 17).astype(np.float32)
    x[500] = np.nan
    base_p, base_a = native.quantize_nf4(x, 64, variant=variant, num_threads=1)
    base_d = native.dequantize_nf4(base_p, base_a, x.shape, np.float32, 64, variant=variant, num_threads=1)
    for threads in (2, 3, 7):
        p, a = native.quantize_nf4(x, 64, variant=variant, num_threads=threads)
        np.testing.assert_array_equal(p, base_p)
        np.testing.assert_array_equal(bits(a), bits(base_a))
        d = native.dequantize_nf4(p, a, x.shape, np.float32, 64, variant=variant, num_threads=threads)
        np.testing.assert_array_equal(bits(d), bits(base_d))


def test_packed_nf4_shared_by_python_threads():
    """Several Python threads call one ``PackedNF4`` at once, each with its own x and workspace (the
    per-thread scratch of ``native._scratch``), and each gets the bits of a lone call."""
    import threading

    rng = np.random.default_rng(8)
    N, K = 96, 256
    packed, absmax = native.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), 64)
    w = native.PackedNF4(packed, absmax, N, K, num_threads=2)
    xs = [rng.standard_normal((M, K)).astype(np.float32) for M in (1, 5, 33, 64, 1, 17)]
    want = [w.matmul(x) for x in xs]
    wrong = [0] * len(xs)

    def work(i):
        for _ in range(20):
            wrong[i] += not np.array_equal(bits(w.matmul(xs[i])), bits(want[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0] * len(xs)


def _pool_generation():
    from minilora._native import ffi, lib

    gen, workers = ffi.new("uint32_t *"), ffi.new("int *")
    assert lib.minilora_pool_state(gen, workers) == 0
    return gen[0], workers[0]


def test_fork_during_a_pooled_job_leaves_the_child_a_clean_pool():
    """A fork while another thread runs a pooled job: the child must not inherit that job (its workers,
    started in the child, would run the parent's chunks and count them into the child's jobs: the child
    hung in 2 of 300 such forks before). The child sees an empty pool, then gets a lone call's bits."""
    import os
    import threading
    import time

    rng = np.random.default_rng(21)
    big = rng.standard_normal(1 << 23).astype(np.float32)
    N, K = 512, 512
    packed, absmax = native.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), 64)
    x = rng.standard_normal((1, K)).astype(np.float32)
    want = bits(native.matmul_nf4(x, packed, absmax, N, K, num_threads=1)).tobytes()
    stop = threading.Event()

    def hammer():  # long pooled jobs, back to back
        while not stop.is_set():
            native.quantize_nf4(big, 64, num_threads=2)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        time.sleep(0.05)
        for _ in range(20):
            assert _pool_generation()[0] != 0  # the parent's pool has run jobs
            pid = os.fork()
            if pid == 0:  # child: only this thread exists
                code = 0
                try:
                    code |= 1 if _pool_generation() != (0, 0) else 0
                    for _ in range(5):
                        y = native.matmul_nf4(x, packed, absmax, N, K, num_threads=2)
                        code |= 2 if bits(y).tobytes() != want else 0
                finally:
                    os._exit(code)
            for _ in range(400):  # 20 s at most
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("forked child hung in a pooled call")
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    finally:
        stop.set()
        t.join()


def test_workers_take_the_callers_floating_point_mode():
    """With flush-to-zero / denormals-are-zero set in the calling thread (torch.set_flush_denormal), the
    pool's workers compute in the same mode, so the thread count still changes no bit."""
    torch = pytest.importorskip("torch")
    x = (np.random.default_rng(5).standard_normal(1 << 20) * 1e-39).astype(np.float32)  # subnormals
    native.quantize_nf4(x, 64, num_threads=8)  # start the workers in the default mode
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero switch")
    try:
        one = native.quantize_nf4(x, 64, num_threads=1)
        many = native.quantize_nf4(x, 64, num_threads=8)
    finally:
        torch.set_flush_denormal(False)
    np.testing.assert_array_equal(many[0], one[0])
    np.testing.assert_array_equal(bits(many[1]), bits(one[1]))


def test_environment_switches(monkeypatch):
    x = np.random.default_rng(4).standard_normal(5000).astype(np.float32)
    base = native.quantize_nf4(x)
    monkeypatch.setenv("MINILORA_NUM_THREADS", "3")
    np.testing.assert_array_equal(native.quantize_nf4(x)[0], base[0])
    monkeypatch.setenv("MINILORA_FORCE_REF", "1")
    assert native._kernel("quantize_nf4", "auto") == native.lib.minilora_quantize_nf4_ref
    np.testing.assert_array_equal(native.quantize_nf4(x)[0], base[0])
    monkeypatch.setenv("MINILORA_FORCE_REF", " 1 ")
    assert native._kernel("quantize_nf4", "auto") == native.lib.minilora_quantize_nf4_ref
    monkeypatch.setenv("MINILORA_FORCE_REF", "0")
    assert native._kernel("quantize_nf4", "auto") == native.lib.minilora_quantize_nf4
    monkeypatch.setenv("MINILORA_FORCE_REF", "true")  # was silently ignored
    with pytest.raises(ValueError, match="MINILORA_FORCE_REF must be 1"):
        native.quantize_nf4(x)
    monkeypatch.delenv("MINILORA_FORCE_REF")
    monkeypatch.setenv("MINILORA_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="MINILORA_NUM_THREADS"):
        native.quantize_nf4(x)


def test_avx512_variant_is_for_the_matmul_only(monkeypatch):
    with pytest.raises(ValueError, match="no AVX-512 kernel"):
        native.quantize_nf4(np.ones(4, np.float32), variant="avx512")
    with pytest.raises(ValueError, match="no AVX-512 kernel"):
        native.dequantize_nf4(np.zeros(2, np.uint8), np.ones(1, np.float32), (4,), variant="avx512")
    monkeypatch.setattr(native, "has_avx512", lambda: False)
    packed, absmax = nf4.quantize_nf4(np.ones(64, np.float32))
    with pytest.raises(RuntimeError, match="AVX-512F"):
        native.matmul_nf4(np.ones((1, 64), np.float32), packed, absmax, 1, 64, variant="avx512")


@pytest.mark.skipif(not native.has_avx512(), reason="this CPU has no AVX-512F")
def test_dispatcher_takes_the_avx512_gemv_and_the_avx2_gemm():
    """variant="auto" on an AVX-512 CPU: the GEMV's bits are the AVX-512 kernel's (its summation order differs
    from the AVX2 one), the GEMM's are the AVX2 kernel's; the int16 mode of an "avx512" object is AVX2's."""
    rng = np.random.default_rng(8)
    N, K = 33, 4096
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal((1, K)).astype(np.float32)
    got = {v: native.matmul_nf4(x, packed, absmax, N, K, variant=v) for v in ("auto", "avx2", "avx512")}
    assert bits(got["auto"]).tolist() == bits(got["avx512"]).tolist()
    assert bits(got["avx2"]).tolist() != bits(got["avx512"]).tolist()  # K = 4096: the orders round apart
    x8 = rng.standard_normal((8, K)).astype(np.float32)
    assert bits(native.matmul_nf4(x8, packed, absmax, N, K, variant="auto")).tolist() == \
        bits(native.matmul_nf4(x8, packed, absmax, N, K, variant="avx2")).tolist()
    w = native.PackedNF4(packed, absmax, N, K, variant="avx512")
    assert bits(w.matmul(x, mode="int16")).tolist() == \
        bits(native.matmul_nf4(x, packed, absmax, N, K, variant="avx2", mode="int16")).tolist()


def test_no_silent_fallback(monkeypatch):
    monkeypatch.setattr(native, "has_avx2", lambda: False)
    with pytest.raises(RuntimeError, match="AVX2"):
        native.quantize_nf4(np.ones(4, np.float32), variant="avx2")
    with pytest.raises(ValueError, match="variant"):
        native.quantize_nf4(np.ones(4, np.float32), variant="sse")


# ---------------------------------------------------------------- double quantisation
@FAST
@given(absmax=float32_vectors(sizes=[1, 2, 3, 255, 256, 257, 600], elements=F32), explicit=st.booleans())
def test_double_quantize_equals_reference(absmax, explicit):
    absmax = np.abs(absmax)
    offset = np.float32(absmax[0]) if explicit else None
    ref = double_quant.double_quantize(absmax, offset)
    out = native.double_quantize(absmax, offset)
    np.testing.assert_array_equal(out[0], ref[0])
    assert_same_float32(out[1], ref[1])
    assert_same_float32(np.array([out[2]]), np.array([ref[2]]))
    if np.isfinite(out[1]).all() and np.isfinite(out[2]):
        assert_same_float32(native.dequantize_absmax(*out), double_quant.dequantize_absmax(*ref))


@FAST
@given(x=float32_vectors(sizes=[1, 2, 3, 4, 7, 100]))
@example(x=np.array([1.0, 1.0, 2.0**-23, 2.0**-80], np.float32))
@example(x=np.array([3, 0, 0, 0], np.uint32).view(np.float32))  # 3·2**-149 / 4 -> 2**-149: needs the sticky bit
def test_exact_mean_is_correctly_rounded(x):
    ref = double_quant.exact_mean_float32(x)
    for out in (native.double_quantize(x)[2], native.exact_mean_float32(x)):
        assert_same_float32(np.array([out]), np.array([ref]))


def test_exact_mean_where_float64_rounding_twice_fails():
    x = np.array([1.0, 1.0, 2.0**-23, 2.0**-80], np.float32)  # exact mean just above a float32 midpoint
    assert native.double_quantize(x)[2] == np.nextafter(np.float32(0.5), np.float32(1))


@FAST
@given(n=st.sampled_from([1, 2, 255, 256, 257, 1000]), seed=st.integers(0, 2**32 - 1))
def test_dequantize_absmax_equals_reference(n, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, n, dtype=np.uint8)
    nested = (rng.random(-(-n // 256)) * 3).astype(np.float32)
    offset = np.float32(rng.random())
    assert_same_float32(native.dequantize_absmax(codes, nested, offset),
                        double_quant.dequantize_absmax(codes, nested, offset))


# ---------------------------------------------------------------- matmul
@pytest.mark.parametrize("variant", MATMUL_VARIANTS)
@FAST
@given(M=st.sampled_from([1, 2, 3, 7, 8, 9, 16, 17, 33]), N=st.sampled_from([1, 2, 5, 6, 7, 13, 64]),
       kblocks=st.integers(1, 5), blocksize=st.sampled_from([32, 64, 128, 256]),
       threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**32 - 1))
def test_matmul_within_derived_bound(variant, M, N, kblocks, blocksize, threads, seed):
    K = kblocks * blocksize
    rng = np.random.default_rng(seed)
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), blocksize)
    x = rng.standard_normal((M, K)).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 1e3]))
    ref = nf4.matmul_nf4(x, packed, absmax, N, K, blocksize)  # float64
    out = native.matmul_nf4(x, packed, absmax, N, K, blocksize, variant=variant, num_threads=threads)
    assert out.dtype == np.float32 and out.shape == (M, N)
    w = nf4.dequantize_nf4(packed, absmax, (N, K), np.float32, blocksize).astype(np.float64)  # (N, K)
    gamma = K * U / (1 - K * U)
    bound = gamma * (np.abs(x.astype(np.float64)) @ np.abs(w).T)  # (M, N)
    assert (np.abs(out - ref) <= bound).all()


@pytest.mark.parametrize("variant", MATMUL_VARIANTS)
def test_prepared_weights_give_matmul_nf4_bits_for_every_m(variant):
    rng = np.random.default_rng(3)
    N, K = 13, 192
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), 64)
    w = native.PackedNF4(packed, absmax, N, K, 64, variant=variant, num_threads=2)
    for M in (1, 5, 1, 64, 2):   # one object for GEMV and GEMM calls in any order
        x = rng.standard_normal((M, K)).astype(np.float32)
        assert w.matmul(x).tobytes() == native.matmul_nf4(x, packed, absmax, N, K, 64, variant=variant,
                                                          num_threads=2).tobytes()
    assert w.matmul(np.zeros((0, K), np.float32)).shape == (0, N)
    with pytest.raises(ValueError, match="K=192"):
        w.matmul(np.zeros((1, 191), np.float32))
    with pytest.raises(TypeError):
        w.matmul(np.zeros((1, K), np.float64))
    with pytest.raises(ValueError):   # the state is checked once, up front, with the reference's errors
        native.PackedNF4(packed[:-1], absmax, N, K, 64)


@pytest.mark.parametrize("variant", MATMUL_VARIANTS)
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("kblocks", [1, 2, 3, 5])
def test_gemv_one_hot_x_reads_each_weight(variant, blocksize, kblocks):
    """M = 1 with x = e_k gives column k of dequant(W) exactly (one nonzero product, exact zeros elsewhere):
    checks the AVX2 and AVX-512 GEMVs' reordering of x for every k, with half groups of 64 (blocksize 32, odd
    kblocks)."""
    N, K = 19, kblocks * blocksize
    rng = np.random.default_rng(blocksize + kblocks)
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), blocksize)
    w = nf4.dequantize_nf4(packed, absmax, (N, K), np.float32, blocksize)  # (N, K)
    for k in range(K):
        x = np.zeros((1, K), np.float32)  # (1, K)
        x[0, k] = 1.0
        out = native.matmul_nf4(x, packed, absmax, N, K, blocksize, variant=variant, num_threads=1)  # (1, N)
        np.testing.assert_array_equal(out[0], w[:, k])


GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np
from minilora import native, nf4
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

def at_page_end(a):
    # a copy of `a` whose last byte is the last byte before a PROT_NONE page: reading past it is a SIGSEGV
    buf = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(base + mmap.PAGESIZE, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()
    out = np.frombuffer(buf, a.dtype, a.size, mmap.PAGESIZE - a.nbytes).reshape(a.shape)
    out[...] = a
    KEEP.append(buf)
    return out

KEEP = []
variant = sys.argv[1]
rng = np.random.default_rng(0)
for bs in (32, 64, 128):
    for K in (bs, 3 * bs, 5 * bs):
        N = 3
        packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), bs)
        x = rng.standard_normal((1, K)).astype(np.float32)
        want = native.matmul_nf4(x, packed, absmax, N, K, bs, variant=variant, num_threads=1)
        got = native.matmul_nf4(x, at_page_end(packed), at_page_end(absmax), N, K, bs, variant=variant, num_threads=1)
        assert got.tobytes() == want.tobytes()
print("ok")
"""


@pytest.mark.parametrize("variant", MATMUL_VARIANTS)
def test_gemv_reads_no_byte_past_the_weights(variant, tmp_path):
    """The weights and absmax of the last row end just before a PROT_NONE page: a GEMV whose last chunk loads
    a whole 64 / 128 elements (the AVX-512 kernel reads 128 at a time, masked) would die with SIGSEGV. In a
    subprocess, so that a crash fails this test instead of killing pytest."""
    done = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT, variant], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # not the checkout: its minilora/ has no built extension
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("variant", MATMUL_VARIANTS)
def test_matmul_thread_count_changes_no_bit(variant):
    rng = np.random.default_rng(5)
    N, K = 77, 256
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32))
    for M in (1, 20):
        x = rng.standard_normal((M, K)).astype(np.float32)
        base = native.matmul_nf4(x, packed, absmax, N, K, variant=variant, num_threads=1)
        for threads in (2, 3):
            out = native.matmul_nf4(x, packed, absmax, N, K, variant=variant, num_threads=threads)
            np.testing.assert_array_equal(bits(out), bits(base))


# ---------------------------------------------------------------- the approximate int16 GEMV (opt-in)
@pytest.mark.parametrize("variant", VARIANTS)
@FAST
@given(M=st.sampled_from([1, 2, 3]), N=st.sampled_from([1, 2, 5, 13, 64]), kblocks=st.integers(1, 5),
       blocksize=st.sampled_from([32, 64, 128, 256]), threads=st.sampled_from([1, 2, 3]),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), spread=st.sampled_from([0.0, 1.0, 3.0]),
       seed=st.integers(0, 2**32 - 1))
def test_int16_gemv_within_its_derived_bound(variant, M, N, kblocks, blocksize, threads, scale, spread, seed):
    """mode="int16" against the float64 product with the float32 dequantised weights, within
    ``nf4.int16_matmul_error_bound`` (its docstring derives it); x spread over e^±spread within groups."""
    K = kblocks * blocksize
    rng = np.random.default_rng(seed)
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), blocksize)
    x = (rng.standard_normal((M, K)) * np.exp(spread * rng.standard_normal((M, K))) * scale).astype(np.float32)
    out = native.matmul_nf4(x, packed, absmax, N, K, blocksize, variant=variant, num_threads=threads, mode="int16")
    assert out.dtype == np.float32 and out.shape == (M, N)
    w = nf4.dequantize_nf4(packed, absmax, (N, K), np.float32, blocksize).astype(np.float64)  # (N, K)
    ref = x.astype(np.float64) @ w.T  # (M, N)
    bound = nf4.int16_matmul_error_bound(x, packed, absmax, N, K, blocksize)
    assert (np.abs(out - ref) <= bound).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("blocksize,kblocks", [(32, 1), (32, 3), (64, 2), (128, 1)])
def test_int16_gemv_one_hot_x_reads_each_weight(variant, blocksize, kblocks):
    """x = e_k: the result is weight (n, k) within the int16 bound, which is far below the gap to any other
    weight, so each k must meet its own weight: checks the AVX2 reordering of x, half groups too."""
    N, K = 11, kblocks * blocksize
    rng = np.random.default_rng(blocksize * kblocks)
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), blocksize)
    w = nf4.dequantize_nf4(packed, absmax, (N, K), np.float32, blocksize)  # (N, K)
    for k in range(K):
        x = np.zeros((1, K), np.float32)  # (1, K)
        x[0, k] = 1.0
        out = native.matmul_nf4(x, packed, absmax, N, K, blocksize, variant=variant, num_threads=1, mode="int16")
        bound = nf4.int16_matmul_error_bound(x, packed, absmax, N, K, blocksize)[0]  # (N,)
        assert (np.abs(out[0] - w[:, k]) <= bound).all(), k
        # the bound charges every weight of the group half a quantisation step of the group max (the zeros of
        # x quantise exactly, but the bound does not know): ≤ 64/16382 of absmax, far below a wrong weight
        assert (bound <= 0.005 * absmax.reshape(N, -1)[:, k // blocksize]).all()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("blocksize,K", [(32, 96), (64, 128), (128, 128)])
def test_int16_gemv_is_exact_where_every_step_is(variant, blocksize, K):
    """A known answer: absmax 1, x integers in [-7, 7] plus one 8191 per group of 64 sitting on code 7 (0.0).
    Then the group max is 8191, so q = x and d_g = 2^-14 exactly, every int32 lane sum is < 2^24 and every
    float32 partial sum a multiple of 2^-14 below 2^10: the result must be Σ x·round(NF4·2^14)·2^-14 to the
    bit. Pins the int16 table (round to nearest, not truncation) and the scale d_g."""
    rng = np.random.default_rng(K + blocksize)
    N = 9
    codes = rng.integers(0, 16, (N, K))  # (N, K)
    x = rng.integers(-7, 8, K).astype(np.float32)  # (K,)
    for g in range(0, K, 64):
        codes[:, g + 5] = 7  # NF4 0.0 under the group max
        x[g + 5] = 8191.0
    packed = (codes[:, 0::2] * 16 + codes[:, 1::2]).astype(np.uint8).reshape(-1, 1)  # high nibble first
    absmax = np.ones(N * K // blocksize, np.float32)
    table = np.rint(np.asarray(NF4_VALUES, np.float64) * 2**14).astype(np.int64)  # round half to even
    expected = (table[codes] @ x.astype(np.int64)).astype(np.float64) * 2.0**-14  # (N,)
    out = native.matmul_nf4(x[None], packed, absmax, N, K, blocksize, variant=variant, num_threads=1, mode="int16")
    np.testing.assert_array_equal(out[0].astype(np.float64), expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_int16_mode_is_opt_in_and_a_non_finite_row_runs_exact(variant):
    rng = np.random.default_rng(11)
    N, K = 40, 320
    packed, absmax = nf4.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32))
    x = rng.standard_normal((3, K)).astype(np.float32)
    exact = native.matmul_nf4(x, packed, absmax, N, K, variant=variant, num_threads=2, mode="exact")
    assert bits(native.matmul_nf4(x, packed, absmax, N, K, variant=variant, num_threads=2)).tobytes() == \
        bits(exact).tobytes()  # the default is the exact mode
    approx = native.matmul_nf4(x, packed, absmax, N, K, variant=variant, num_threads=2, mode="int16")
    assert (approx != exact).any()  # the modes differ: the default is not secretly the int16 one
    w = native.PackedNF4(packed, absmax, N, K, variant=variant, num_threads=2)
    for m in range(3):  # row by row: each row is one GEMV
        assert bits(w.matmul(x[m:m + 1], mode="int16")).tobytes() == bits(approx[m:m + 1]).tobytes()
    x[1, 7] = np.nan
    x[2, 300] = np.inf
    out = w.matmul(x, mode="int16")
    exact = w.matmul(x)
    assert bits(out[0]).tobytes() == bits(approx[0]).tobytes()
    np.testing.assert_array_equal(bits(out[1:]), bits(exact[1:]))  # no int16 code for NaN / inf: exact rows
    with pytest.raises(ValueError, match="mode"):
        w.matmul(x, mode="int8")


# ---------------------------------------------------------------- errors: same type as the reference
_X = np.ones((4, 64), np.float32)
_P, _A = nf4.quantize_nf4(np.ones((8, 64), np.float32))
BAD_CALLS = {
    "quantize: list input": ("quantize_nf4", ([1.0, 2.0],), {}),
    "quantize: int dtype": ("quantize_nf4", (np.ones(4, np.int32),), {}),
    "quantize: empty": ("quantize_nf4", (np.ones(0, np.float32),), {}),
    "quantize: blocksize 48": ("quantize_nf4", (np.ones(4, np.float32), 48), {}),
    "quantize: blocksize float": ("quantize_nf4", (np.ones(4, np.float32), 64.0), {}),
    "dequantize: packed too short": ("dequantize_nf4", (_P[:-1], _A, (8, 64)), {}),
    "dequantize: absmax too long": ("dequantize_nf4", (_P, np.ones(9, np.float32), (8, 64)), {}),
    "dequantize: packed int8": ("dequantize_nf4", (_P.astype(np.int8), _A, (8, 64)), {}),
    "dequantize: absmax float64": ("dequantize_nf4", (_P, _A.astype(np.float64), (8, 64)), {}),
    "dequantize: zero size": ("dequantize_nf4", (_P, _A, (0, 64)), {}),
    "dequantize: bad dtype": ("dequantize_nf4", (_P, _A, (8, 64), np.int32), {}),
    "matmul: x wrong K": ("matmul_nf4", (np.ones((4, 32), np.float32), _P, _A, 8, 64), {}),
    "matmul: x 1-D": ("matmul_nf4", (np.ones(64, np.float32), _P, _A, 8, 64), {}),
    "matmul: x float64": ("matmul_nf4", (_X.astype(np.float64), _P, _A, 8, 64), {}),
    "matmul: N mismatch": ("matmul_nf4", (_X, _P, _A, 9, 64), {}),
    "matmul: bad blocksize": ("matmul_nf4", (_X, _P, _A, 8, 64, 100), {}),
    "double_quantize: 2-D": ("double_quantize", (np.ones((2, 2), np.float32),), {}),
    "double_quantize: float64": ("double_quantize", (np.ones(4),), {}),
    "double_quantize: inexact offset": ("double_quantize", (np.ones(4, np.float32), 0.1), {}),
    "dequantize_absmax: nested size": ("dequantize_absmax", (np.ones(300, np.uint8), np.ones(1, np.float32), 0.0), {}),
    "dequantize_absmax: codes float": ("dequantize_absmax", (np.ones(3, np.float32), np.ones(1, np.float32), 0.0), {}),
}
_REF = {"quantize_nf4": nf4, "dequantize_nf4": nf4, "matmul_nf4": nf4,
        "double_quantize": double_quant, "dequantize_absmax": double_quant}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_input_raises_same_type_as_reference(case):
    name, args, kwargs = BAD_CALLS[case]
    with pytest.raises((TypeError, ValueError)) as ref:
        getattr(_REF[name], name)(*args, **kwargs)
    with pytest.raises(ref.type):
        getattr(native, name)(*args, **kwargs)


def test_matmul_rejects_blocks_spanning_rows():
    packed, absmax = nf4.quantize_nf4(np.ones((2, 96), np.float32), 64)
    nf4.matmul_nf4(np.ones((1, 96), np.float32), packed, absmax, 2, 96, 64)  # the reference handles it
    with pytest.raises(ValueError, match="K % blocksize"):
        native.matmul_nf4(np.ones((1, 96), np.float32), packed, absmax, 2, 96, 64)


def test_quantstate_bundles_match_the_reference():
    from minilora import nf4

    x = (np.random.default_rng(5).standard_normal((70, 64)) * 0.02).astype(ml_dtypes.bfloat16)
    for dq in (False, True):
        ref, out = nf4.quantize(x, 64, dq), native.quantize(x, 64, dq)
        assert out.packed.tobytes() == ref.packed.tobytes()
        assert out.block_absmax().tobytes() == ref.block_absmax().tobytes()
        assert native.dequantize(out).tobytes() == nf4.dequantize(ref).tobytes()
    assert native.for_quant_type("nf4") is native and native.for_quant_type("fp4") is nf4
    with pytest.raises(ValueError, match="NF4 only"):
        native.quantize(x, 64, quant_type="fp4")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("K", [64, 128])
def test_int16_gemv_rounds_x_to_nearest(variant, K):
    """Known answer with non-integer x·8191/max: q = round(x·8191/max) (not truncated), N_c = round(NF4·2^14),
    exact integer sums, d = float32(max/8191·2^-14). The float32 steps after the integer sums move y by
    < 4·K·u of Σ|x||w|; truncating x would move it by ~1e-4 of it (the bound test cannot see a bias)."""
    rng = np.random.default_rng(K)
    N = 16
    packed, absmax = native.quantize_nf4(rng.standard_normal((N, K)).astype(np.float32), 64)
    x = (rng.standard_normal(K) * 3.7).astype(np.float32)
    Nc = np.rint(np.asarray(NF4_VALUES, np.float32) * np.float32(16384)).astype(np.int64)
    codes = nf4.unpack_nibbles(packed, N * K).reshape(N, K)
    want = np.zeros(N)
    for g in range(0, K, 64):
        xg = x[g:g + 64].astype(np.float64)
        m = np.abs(xg).max()
        q = np.rint(xg * 8191 / m).astype(np.int64)
        d = np.float64(np.float32(m / 8191 * 2.0**-14))
        want += absmax.reshape(N, -1)[:, g // 64].astype(np.float64) * ((q * Nc[codes[:, g:g + 64]]).sum(axis=1) * d)
    y = native.matmul_nf4(x[None, :], packed, absmax, N, K, 64, variant=variant, mode="int16")[0]
    w = native.dequantize_nf4(packed, absmax, (N, K)).astype(np.float64)
    scale = (np.abs(x.astype(np.float64)) * np.abs(w)).sum(axis=1)
    assert np.all(np.abs(y - want) <= 4 * K * 2.0**-24 * scale)
