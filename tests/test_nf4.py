"""minilora.nf4 against bitsandbytes 0.50.2 (CPU) known-answer vectors, plus properties of the reference.

The vectors in tests/data/nf4/ were made by tests/data/make_nf4_vectors.py; these tests need neither
torch nor bitsandbytes. Every comparison is exact, on bit patterns.
"""
import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora import nf4
from minilora.double_quant import dequantize_absmax, double_quantize, exact_mean_float32
from minilora.tables import ALLOWED_BLOCKSIZES, FP4, NF4, NF4_MID, TINY, ZERO_CODE

DATA = pathlib.Path(__file__).parent / "data" / "nf4"
META = json.loads((DATA / "meta.json").read_text())
VEC = np.load(DATA / "vectors.npz")
CASES = [c for c in META["cases"] if c.get("kind") != "nested"]
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
UINT = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}
TAIL_SIZES = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65]


def from_bits(bits, dtype_name):
    return bits.view(DTYPES[dtype_name])


def assert_same_bits(ref, out, what):
    """Exact equality of bit patterns; NaNs are compared by position and, where not both NaN, by bits.

    The sign of a NaN made by an invalid operation (0 * inf) is the CPU's default NaN: x86 sets it,
    ARM does not. Every other bit, and every NaN position, must match.
    """
    assert ref.shape == out.shape, f"{what}: shape {ref.shape} != {out.shape}"
    ref_f, out_f = np.asarray(ref), np.asarray(out)
    ref_nan, out_nan = np.isnan(ref_f.astype(np.float32)), np.isnan(out_f.astype(np.float32))
    np.testing.assert_array_equal(ref_nan, out_nan, err_msg=f"{what}: NaN positions differ")
    ub = UINT[str(ref_f.dtype)]
    rb, ob = ref_f.view(ub)[~ref_nan], out_f.view(ub)[~out_nan]
    bad = np.flatnonzero(rb != ob)
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[:5]}: {rb[bad[:5]]} vs {ob[bad[:5]]}"


# ---------------------------------------------------------------- known-answer vectors
def test_vectors_provenance():
    assert META["bitsandbytes"] == "0.50.2"
    assert len(CASES) > 80


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_quantize_matches_bitsandbytes(case):
    name, bs = case["name"], case["blocksize"]
    x = from_bits(VEC[f"{name}__x"], case["dtype"])
    quantize = nf4.quantize_nf4 if case["quant_type"] == "nf4" else nf4.quantize_fp4
    out_packed, out_absmax = quantize(x, bs)
    ref_packed, ref_absmax = VEC[f"{name}__packed"], from_bits(VEC[f"{name}__absmax"], "float32")
    assert out_packed.dtype == np.uint8 and out_packed.shape == tuple(case["packed_shape"])
    np.testing.assert_array_equal(out_packed, ref_packed)
    assert_same_bits(ref_absmax, out_absmax, "absmax")


@pytest.mark.parametrize("case", [c for c in CASES if c["double_quant"]],
                         ids=[c["name"] for c in CASES if c["double_quant"]])
def test_double_quant_matches_bitsandbytes(case):
    name = case["name"]
    absmax = from_bits(VEC[f"{name}__absmax"], "float32")
    bnb_offset = from_bits(VEC[f"{name}__dq_offset"], "float32")[0]
    codes, nested_absmax, offset = double_quantize(absmax, offset=bnb_offset)
    np.testing.assert_array_equal(codes, VEC[f"{name}__dq_codes"])
    assert_same_bits(from_bits(VEC[f"{name}__dq_nested_absmax"], "float32"), nested_absmax, "nested_absmax")
    assert_same_bits(np.array([bnb_offset]), np.array([offset]), "offset")
    stats = dequantize_absmax(codes, nested_absmax, offset)
    assert_same_bits(from_bits(VEC[f"{name}__dq_absmax"], "float32"), stats, "dequantised absmax")
    # minilora's default offset is the correctly rounded mean; torch.mean lands within one ulp of it
    own = exact_mean_float32(absmax)
    if np.isfinite(bnb_offset):
        assert abs(own.view(np.int32).astype(np.int64) - bnb_offset.view(np.int32).astype(np.int64)) <= 1


OUT_CASES = [(c, d) for c in CASES for d in DTYPES]


@pytest.mark.parametrize("case,out_dtype", OUT_CASES, ids=[f"{c['name']}-{d}" for c, d in OUT_CASES])
def test_dequantize_matches_bitsandbytes(case, out_dtype):
    name, shape = case["name"], tuple(case["shape"])
    packed = VEC[f"{name}__packed"]
    stats = VEC[f"{name}__dq_absmax" if case["double_quant"] else f"{name}__absmax"]
    dequantize = nf4.dequantize_nf4 if case["quant_type"] == "nf4" else nf4.dequantize_fp4
    out = dequantize(packed, from_bits(stats, "float32"), shape, DTYPES[out_dtype], case["blocksize"])
    assert out.shape == shape and out.dtype == DTYPES[out_dtype]
    ref = from_bits(VEC[f"{name}__out_{out_dtype}"], out_dtype).copy()
    if case["quant_type"] == "fp4" and case["cpp_dequant"]:
        # bitsandbytes' C++ dequantiser (even last dim) has -0.0 at FP4 code 8; its Python table and
        # minilora have +0.0. Undo exactly that sign bit, nowhere else, then compare every bit.
        code8 = nf4.unpack_nibbles(packed, out.size) == 8
        sign = np.array(0x8000_0000 if out_dtype == "float32" else 0x8000, dtype=UINT[out_dtype])
        ref_bits = ref.view(UINT[out_dtype])
        is_neg_zero = code8 & (ref_bits == sign)
        assert np.array_equal(is_neg_zero, code8 & (ref_bits & ~sign == 0)), "code 8 is not +-0 in bnb's output"
        ref_bits[is_neg_zero] = 0
    if out_dtype == "bfloat16" and case["cpp_dequant"]:
        # bitsandbytes' C++ bf16 cast (bits + 0x7FFF + lsb) >> 16 wraps a NaN with bits >= 0xFFFF8000 (torch's
        # max makes 0xFFFFFFFF) around to 0x0000. minilora keeps the NaN; check that bug exactly, then skip it.
        f32_bits = VEC[f"{name}__out_float32"]
        wrapped = np.isnan(f32_bits.view(np.float32)) & (f32_bits >= 0xFFFF8000)
        lsb = (f32_bits >> 16) & 1
        expect = ((f32_bits.astype(np.uint64) + 0x7FFF + lsb) % 2**32 >> 16).astype(np.uint16)
        np.testing.assert_array_equal(ref.view(np.uint16)[wrapped], expect[wrapped])
        assert np.isnan(out.reshape(-1)[wrapped].astype(np.float32)).all()
        ref[wrapped] = out.reshape(-1)[wrapped]
    assert_same_bits(ref, out.reshape(-1), f"dequantised {out_dtype}")


def test_bitsandbytes_bf16_nan_wrap_bug_is_in_the_vectors():
    out = VEC["nf4_nan_tail_even__out_bfloat16"].view(np.uint16)
    f32 = VEC["nf4_nan_tail_even__out_float32"]
    assert f32[-1] == 0xFFFFFFFF and out[-1] == 0x0000  # NaN came back as +0.0 from bitsandbytes


def test_bitsandbytes_output_shape_surprise_is_recorded():
    """bnb 0.50.2 on CPU returns (1, n) for an even 1-D length and (2, 1) for n == 2; minilora keeps the shape."""
    by_name = {c["name"]: c for c in CASES}
    assert by_name["nf4_randn_float32_n64"]["bnb_out_shapes"]["float32"] == [1, 64]
    assert by_name["nf4_randn_float32_n2"]["bnb_out_shapes"]["float32"] == [2, 1]
    assert by_name["nf4_randn_float32_n65"]["bnb_out_shapes"]["float32"] == [65]


# ---------------------------------------------------------------- tables
def test_bounds_are_float32_midpoints():
    np.testing.assert_array_equal(((NF4[:-1] + NF4[1:]) / np.float32(2)).view(np.uint32), NF4_MID.view(np.uint32))
    assert nf4._FP4_ORDER.tolist() == [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3]


def test_cuda_bounds_differ_on_exactly_four_values():
    """CUDA's decimal-literal bounds sit one ulp from four CPU bounds: one float32 value each changes code."""
    from minilora.tables import NF4_MID_CUDA
    steps = NF4_MID_CUDA.view(np.int32).astype(np.int64) - NF4_MID.view(np.int32).astype(np.int64)
    assert np.flatnonzero(steps).tolist() == [0, 8, 12, 14] and (np.abs(steps) <= 1).all()
    v = np.concatenate([NF4_MID, NF4_MID_CUDA])
    cpu, cuda = np.searchsorted(NF4_MID, v), np.searchsorted(NF4_MID_CUDA, v)
    moved = sorted(zip(v[cpu != cuda].view(np.uint32).tolist(), cpu[cpu != cuda].tolist(), cuda[cpu != cuda].tolist()))
    assert moved == [(0x3DF64863, 9, 8), (0x3F006D04, 12, 13), (0x3F5C89DA, 14, 15), (0xBF591CD8, 0, 1)]


# ---------------------------------------------------------------- explicit examples
def test_all_zero_full_block():
    packed, absmax = nf4.quantize_nf4(np.zeros(64, np.float32))
    assert (packed == 0x77).all() and absmax.view(np.uint32).tolist() == [0]


def test_all_zero_partial_block_stores_tiny():
    packed, absmax = nf4.quantize_nf4(np.zeros(65, np.float32))
    assert (packed == 0x77).all()
    assert absmax.view(np.uint32).tolist() == [0, np.float32(TINY).view(np.uint32)]


def test_plus_minus_absmax_and_odd_padding():
    x = np.array([-3.0, 3.0, 0.0], np.float32)
    packed, absmax = nf4.quantize_nf4(x)
    assert packed.ravel().tolist() == [0x0F, (ZERO_CODE << 4) | ZERO_CODE] and absmax.tolist() == [3.0]
    out = nf4.dequantize_nf4(packed, absmax, (3,))
    assert out.tolist() == [-3.0, 3.0, 0.0]


@pytest.mark.parametrize("i", range(15))
def test_on_bound_takes_lower_code(i):
    mid = NF4_MID[i]
    v = np.array([mid, np.nextafter(mid, np.float32(-2)), np.nextafter(mid, np.float32(2))], np.float32)
    assert nf4.nf4_codes(v).tolist() == [i, i, i + 1]
    x = np.concatenate([[np.float32(1.0)], v]).astype(np.float32)  # absmax 1.0: normalised == value
    codes = nf4.unpack_nibbles(nf4.quantize_nf4(x)[0], x.size)
    assert codes.tolist() == [15, i, i, i + 1]


def test_nan_block():
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    x[10] = np.nan
    packed, absmax = nf4.quantize_nf4(np.concatenate([x, np.ones(64, np.float32)]))
    assert np.isnan(absmax[0]) and absmax[1] == 1.0
    assert (packed[:32] == 0xFF).all() and (packed[32:] == 0xFF).all()
    assert nf4.nf4_codes(np.array([np.nan], np.float32)).tolist() == [15]


@pytest.mark.parametrize("inf", [np.inf, -np.inf])
def test_inf_block(inf):
    x = np.linspace(-1, 1, 64, dtype=np.float32)
    x[3] = inf
    packed, absmax = nf4.quantize_nf4(x)
    codes = nf4.unpack_nibbles(packed, 64)
    assert absmax[0] == np.inf
    assert codes[3] == 15 and (np.delete(codes, 3) == ZERO_CODE).all()  # inf * 0 is NaN -> 15


def test_subnormal_block_is_scaled_by_one_over_tiny():
    x = np.full(64, 1e-39, np.float32)
    x[1::2] = -1e-39
    packed, absmax = nf4.quantize_nf4(x)
    v = x * (np.float32(1) / TINY)  # no flush to zero: +-1e-39 / 1e-38 = +-0.1
    assert absmax[0] == np.float32(1e-39)
    np.testing.assert_array_equal(nf4.unpack_nibbles(packed, 64), nf4.nf4_codes(v))
    assert set(nf4.unpack_nibbles(packed, 64).tolist()) == {6, 8}  # not {0, 15}: the floor keeps v small


def test_fp4_signed_zero_and_padding():
    # a tiny positive value gets code 8, a tiny negative one code 0; odd length pads code 0 (not 7)
    x = np.array([1.0, 1e-4, -1e-4], np.float32)
    codes = nf4.unpack_nibbles(nf4.quantize_fp4(x)[0], 3)
    assert codes.tolist() == [3, 8, 0]
    assert nf4.quantize_fp4(x)[0].ravel()[-1] & 0xF == 0


def test_quant_state_round_trip():
    x = np.random.default_rng(0).standard_normal((8, 96)).astype(ml_dtypes.bfloat16)
    for dq in (False, True):
        state = nf4.quantize(x, blocksize=32, double_quant=dq)
        out = nf4.dequantize(state)
        assert out.shape == x.shape and out.dtype == x.dtype
        plain = nf4.dequantize_nf4(*nf4.quantize_nf4(x, 32), x.shape, x.dtype, 32)
        if not dq:
            assert_same_bits(plain, out, "state round trip")


def test_matmul_reference():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    packed, absmax = nf4.quantize_nf4(w)
    y = nf4.matmul_nf4(x, packed, absmax, 5, 64)
    wd = nf4.dequantize_nf4(packed, absmax, (5, 64)).astype(np.float64)
    assert y.shape == (3, 5) and y.dtype == np.float64
    np.testing.assert_array_equal(y, x.astype(np.float64) @ wd.T)


# ---------------------------------------------------------------- bad input
def test_bad_blocksize():
    with pytest.raises(ValueError, match=r"blocksize=48.*\(32, 64, 128"):
        nf4.quantize_nf4(np.ones(64, np.float32), 48)
    with pytest.raises(ValueError, match="blocksize"):
        nf4.dequantize_nf4(np.zeros((32, 1), np.uint8), np.ones(1, np.float32), (64,), blocksize=48)


@pytest.mark.parametrize("x", [np.ones(4, np.float64), np.ones(4, np.int32), [1.0, 2.0]])
def test_bad_input_dtype(x):
    with pytest.raises(TypeError, match="x must be"):
        nf4.quantize_nf4(x)


def test_bad_state():
    packed, absmax = nf4.quantize_nf4(np.ones(130, np.float32))
    with pytest.raises(ValueError, match=r"absmax has 2 entries.*needs ceil\(n/blocksize\) = 3"):
        nf4.dequantize_nf4(packed, absmax[:2], (130,))
    with pytest.raises(TypeError, match="packed must be a uint8"):
        nf4.dequantize_nf4(packed.astype(np.int8), absmax, (130,))
    with pytest.raises(TypeError, match="absmax must be a float32"):
        nf4.dequantize_nf4(packed, absmax.astype(np.float64), (130,))
    with pytest.raises(ValueError, match=r"packed has 65 bytes.*needs \(n\+1\)//2 = 66"):
        nf4.dequantize_nf4(packed, absmax, (131,))
    with pytest.raises(TypeError, match="dtype must be"):
        nf4.dequantize_nf4(packed, absmax, (130,), np.float64)
    with pytest.raises(ValueError, match="x must be \\(M, K\\)"):
        nf4.matmul_nf4(np.ones((2, 3), np.float32), packed, absmax, 2, 65)
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_nf4(np.ones(0, np.float32))
    with pytest.raises(ValueError, match="4-bit"):
        nf4.pack_nibbles(np.array([16], np.uint8))


# ---------------------------------------------------------------- properties of the reference
sizes = st.one_of(st.sampled_from(TAIL_SIZES), st.integers(1, 300))
# zero or |x| in [2**-66, 2**66]: scaling by 2**+-16 stays in the normal range and every absmax >= TINY
normal_f32 = st.one_of(st.just(0.0), st.floats(2.0**-66, 2.0**66, width=32), st.floats(-(2.0**66), -(2.0**-66), width=32))


@st.composite
def tensors(draw):
    n = draw(sizes)
    return draw(hnp.arrays(np.float32, n, elements=normal_f32))


@settings(max_examples=60, deadline=None)
@given(codes=st.integers(1, 70).flatmap(lambda n: hnp.arrays(np.uint8, n, elements=st.integers(0, 15))))
def test_pack_unpack_round_trip(codes):
    packed = nf4.pack_nibbles(codes)
    assert packed.shape == ((codes.size + 1) // 2, 1)
    np.testing.assert_array_equal(nf4.unpack_nibbles(packed, codes.size), codes)
    if codes.size % 2:
        assert packed[-1, 0] & 0xF == ZERO_CODE


def _half_gaps(table, mids):
    """For code c, the largest distance from table[c] to a normalised value that rounds to c."""
    t, m = table.astype(np.float64), mids.astype(np.float64)
    lo = np.concatenate([[t[0]], m])  # (16,) lower edge of each code's interval
    hi = np.concatenate([m, [t[-1]]])  # (16,)
    return np.maximum(t - lo, hi - t)


@settings(max_examples=80, deadline=None)
@given(x=tensors(), blocksize=st.sampled_from([32, 64]))
def test_dequantised_within_half_gap(x, blocksize):
    packed, absmax = nf4.quantize_nf4(x, blocksize)
    out = nf4.dequantize_nf4(packed, absmax, x.shape, np.float32, blocksize).astype(np.float64)
    codes = nf4.unpack_nibbles(packed, x.size)
    a = np.repeat(absmax, blocksize)[: x.size].astype(np.float64)
    eps = 2.0**-24
    bound = a * (_half_gaps(NF4, NF4_MID)[codes] + 4 * eps) + np.abs(out) * eps
    assert (np.abs(out - x.astype(np.float64)) <= bound).all()


@settings(max_examples=60, deadline=None)
@given(v=hnp.arrays(np.float32, st.sampled_from(TAIL_SIZES),
                    elements=st.floats(-1, 1, width=32, allow_subnormal=True)))
def test_codes_monotone(v):
    v = np.sort(v)
    assert (np.diff(nf4.nf4_codes(v).astype(int)) >= 0).all()
    assert (np.diff(FP4[nf4.fp4_codes(v)]) >= 0).all()


@settings(max_examples=60, deadline=None)
@given(x=tensors(), k=st.integers(-16, 16), blocksize=st.sampled_from([32, 64]))
def test_scale_invariance_by_powers_of_two(x, k, blocksize):
    scale = np.float32(2.0**k)
    packed, absmax = nf4.quantize_nf4(x, blocksize)
    packed2, absmax2 = nf4.quantize_nf4(x * scale, blocksize)
    np.testing.assert_array_equal(packed, packed2)
    full = x.size // blocksize  # an all-zero partial block stores TINY, which does not scale
    np.testing.assert_array_equal(absmax[:full] * scale, absmax2[:full])


@settings(max_examples=60, deadline=None)
@given(x=tensors(), dtype=st.sampled_from([np.float16, ml_dtypes.bfloat16]), fp4=st.booleans())
@example(x=np.array([np.nan, 1.0, -np.inf], np.float32), dtype=np.float16, fp4=False)
def test_half_inputs_equal_their_float32_image(x, dtype, fp4):
    quantize = nf4.quantize_fp4 if fp4 else nf4.quantize_nf4
    with np.errstate(over="ignore"):
        h = x.astype(dtype)
    p1, a1 = quantize(h)
    p2, a2 = quantize(h.astype(np.float32))
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_array_equal(a1.view(np.uint32), a2.view(np.uint32))


@settings(max_examples=40, deadline=None)
@given(x=tensors(), blocksize=st.sampled_from(ALLOWED_BLOCKSIZES[:3]))
def test_dequantised_output_dtypes_are_rne_casts_of_float32(x, blocksize):
    packed, absmax = nf4.quantize_nf4(x, blocksize)
    f32 = nf4.dequantize_nf4(packed, absmax, x.shape, np.float32, blocksize)
    with np.errstate(over="ignore"):
        for dt in (np.float16, ml_dtypes.bfloat16):
            out = nf4.dequantize_nf4(packed, absmax, x.shape, dt, blocksize)
            assert_same_bits(f32.astype(dt), out, str(dt))  # ml_dtypes / numpy casts are RNE too
