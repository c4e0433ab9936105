"""minilora.double_quant: bitsandbytes 0.50.2 (CPU) nested-quantiser vectors and properties of the reference.

The NF4 cases with double quantisation are checked in test_nf4.py; here the nested quantiser alone is
fed values aimed at its LUT edges (bnb's quantize_blockwise(c, blocksize=256) == double_quantize(c, 0)).
"""
import json
import pathlib
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora import double_quant as dq
from minilora.tables import DYNAMIC_MAP, NESTED_BLOCKSIZE

DATA = pathlib.Path(__file__).parent / "data" / "nf4"
META = json.loads((DATA / "meta.json").read_text())
VEC = np.load(DATA / "vectors.npz")
NESTED = [c for c in META["cases"] if c.get("kind") == "nested"]


@pytest.mark.parametrize("case", NESTED, ids=[c["name"] for c in NESTED])
def test_nested_quantiser_matches_bitsandbytes(case):
    name = case["name"]
    c = VEC[f"{name}__c"].view(np.float32)
    codes, nested_absmax, offset = dq.double_quantize(c, offset=np.float32(0.0))
    np.testing.assert_array_equal(codes, VEC[f"{name}__codes"])
    np.testing.assert_array_equal(nested_absmax.view(np.uint32), VEC[f"{name}__nested_absmax"])


def test_edges_case_covers_every_lut_step():
    c = VEC["nested_edges__c"].view(np.float32)
    assert c.size > 2 * NESTED_BLOCKSIZE and c.size % NESTED_BLOCKSIZE != 0  # a short last nested block
    # every code the LUT can produce appears; codes 124..130 (|DYN| <= 7.75e-6, 0.0 included) lie between two
    # LUT points and are never produced on CPU
    unreachable = set(range(256)) - set(dq._nested_lut().tolist())
    assert unreachable == set(range(124, 131))
    assert set(VEC["nested_edges__codes"].tolist()) == set(range(256)) - unreachable


def test_dynamic_map_zero_is_at_127():
    """The spec text says DYN[128] == 0.0; the table (and bitsandbytes' create_dynamic_map) has it at 127."""
    assert DYNAMIC_MAP[127] == 0.0 and DYNAMIC_MAP[128] > 0 and DYNAMIC_MAP[255] == 1.0
    assert DYNAMIC_MAP[0] == np.float32(-0.99296875)


def test_lut_shape_and_known_non_nearest_zero():
    lut = dq._nested_lut()
    assert lut.shape == (65536,) and lut[0] == 0 and lut[-1] == 255
    assert (np.diff(lut.astype(int)) >= 0).all()
    # t = 0 lands on LUT point 32768 (V = 1.5e-5), above four positive midpoints: code 131, not 127
    codes, _, _ = dq.double_quantize(np.array([1.0, 0.0], np.float32), offset=np.float32(0))
    assert codes.tolist() == [255, 131]


def test_all_zero_and_all_nan_nested_blocks_store_code_zero():
    codes, nested, _ = dq.double_quantize(np.full(300, 2.5, np.float32), offset=np.float32(2.5))
    assert (codes == 0).all() and nested.tolist() == [0.0, 0.0]
    codes, nested, _ = dq.double_quantize(np.array([np.nan, np.nan], np.float32), offset=np.float32(0))
    assert codes.tolist() == [0, 0] and nested.tolist() == [0.0]


@settings(max_examples=200, deadline=None)
@given(t=st.floats(-1, 1, width=32))
@example(t=-1.0).via("lowest")
@example(t=1.0).via("highest")
@example(t=float(np.nextafter(np.float32(-1), np.float32(0)))).via("just above -1")
def test_lut_index_is_one_fused_rounding(t):
    """trunc(fmaf(u, 65535, 0.5)) from exact rational arithmetic equals the float64 emulation."""
    t32 = np.float32(t)
    u = (t32 + np.float32(1)) * np.float32(0.5)
    exact = Fraction(float(u)) * 65535 + Fraction(1, 2)
    assert Fraction(float(exact)) == exact  # representable in float64, so one float32 cast == fmaf
    fused = int(np.trunc(np.float32(float(exact))))
    assert dq._lut_index(np.array([t32]))[0] == fused


@settings(max_examples=100, deadline=None)
@given(t=st.floats(-1, 1, width=32))
def test_nested_code_is_nearest_up_to_one_lut_step(t):
    codes, _, _ = dq.double_quantize(np.array([1.0, t], np.float32), offset=np.float32(0))
    err = abs(float(DYNAMIC_MAP[codes[1]]) - t)
    best = np.abs(DYNAMIC_MAP.astype(np.float64) - t).min()
    assert err <= best + 2 / 65535 + 1e-7


def _nearest_f32(q):
    """Brute force: the float32 nearest to the rational q, ties to the even bit pattern."""
    f = np.float32(float(q))
    cands = [np.nextafter(np.nextafter(f, np.float32(-np.inf)), np.float32(-np.inf)),
             np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    best = min(abs(Fraction(float(c)) - q) for c in cands)
    ties = [c for c in cands if abs(Fraction(float(c)) - q) == best]
    return min(ties, key=lambda c: int(c.view(np.uint32)) & 1)


@settings(max_examples=60, deadline=None)
@given(a=hnp.arrays(np.float32, st.integers(1, 40), elements=st.floats(0, 1e6, width=32)))
@example(a=np.array([1.0, 1.0 + 2.0**-23], np.float32))  # mean 1 + 2**-24: a tie -> 1.0 (even)
@example(a=np.array([1.0 + 2.0**-23, 1.0 + 2.0**-22], np.float32))  # tie -> 1 + 2**-22 (even)
@example(a=np.array([1e-45, 0.0, 0.0], np.float32))
@example(a=np.array([1.0, 1.0, 2.0**-23, 2.0**-80], np.float32))  # just above a midpoint: float64 rounds twice
@example(a=np.array([3, 0, 0, 0], np.uint32).view(np.float32))  # 3·2**-149 / 4 -> 2**-149: the remainder decides
def test_exact_mean_is_correctly_rounded(a):
    q = sum(Fraction(float(v)) for v in a) / a.size
    out = dq.exact_mean_float32(a)
    assert out.dtype == np.float32 and out.view(np.uint32) == _nearest_f32(q).view(np.uint32)


def test_exact_mean_tie_examples():
    assert dq.exact_mean_float32(np.array([1.0, 1.0 + 2.0**-23], np.float32)) == np.float32(1.0)
    assert dq.exact_mean_float32(np.array([1.0 + 2.0**-23, 1.0 + 2.0**-22], np.float32)) == np.float32(1.0 + 2.0**-22)
    assert np.isnan(dq.exact_mean_float32(np.array([1.0, np.nan], np.float32)))
    assert dq.exact_mean_float32(np.array([1.0, np.inf], np.float32)) == np.inf
    fmax = np.finfo(np.float32).max  # the mean is FLT_MAX: no finite candidate above it (OverflowError before)
    assert dq.exact_mean_float32(np.full(5, fmax, np.float32)) == fmax
    below = np.nextafter(fmax, np.float32(0))  # 0x7F7FFFFE: the even one of the two
    assert dq.exact_mean_float32(np.array([fmax, below], np.float32)) == below  # a tie: to even


@settings(max_examples=60, deadline=None)
@given(a=hnp.arrays(np.float32, st.sampled_from([1, 2, 3, 255, 256, 257, 600]),
                    elements=st.floats(2.0**-20, 2.0**20, width=32)))
def test_dequantised_absmax_error_bound(a):
    codes, nested, offset = dq.double_quantize(a)
    out = dq.dequantize_absmax(codes, nested, offset).astype(np.float64)
    gaps = np.diff(DYNAMIC_MAP.astype(np.float64))
    local = np.maximum(np.concatenate([[gaps[0]], gaps])[codes], np.concatenate([gaps, [gaps[-1]]])[codes])
    scale = np.repeat(nested, NESTED_BLOCKSIZE)[: a.size].astype(np.float64)
    bound = scale * (local + 4 / 65535) + (abs(float(offset)) + np.abs(out)) * 2.0**-23
    assert (np.abs(out - a.astype(np.float64)) <= bound).all()


def test_dequantize_absmax_two_roundings():
    codes = np.array([0, 127, 200, 255], np.uint8)
    nested = np.array([0.3], np.float32)
    offset = np.float32(0.1)
    expect = (DYNAMIC_MAP[codes] * nested[0]).astype(np.float32) + offset
    np.testing.assert_array_equal(dq.dequantize_absmax(codes, nested, offset).view(np.uint32), expect.view(np.uint32))


def test_bad_input():
    with pytest.raises(TypeError, match="absmax must be float32"):
        dq.double_quantize(np.ones(4, np.float64))
    with pytest.raises(ValueError, match="non-empty 1-D"):
        dq.double_quantize(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="not exactly representable in float32"):
        dq.double_quantize(np.ones(4, np.float32), offset=0.1)
    for huge in (1e39, -1e300, 10**40, 10**400):  # became ±inf (a NaN absmax) with only a warning
        with pytest.raises(ValueError, match="outside the float32 range"):
            dq.double_quantize(np.ones(4, np.float32), offset=huge)
    assert dq.as_f32_scalar(float("-inf"), "offset") == -np.inf  # asked for: kept
    with pytest.raises(TypeError, match="offset must be a float"):
        dq.double_quantize(np.ones(4, np.float32), offset="0.5")
    with pytest.raises(ValueError, match=r"nested_absmax has 1 entries; 300 codes need ceil\(300/256\) = 2"):
        dq.dequantize_absmax(np.zeros(300, np.uint8), np.ones(1, np.float32), np.float32(0))
    with pytest.raises(TypeError, match="codes must be a uint8"):
        dq.dequantize_absmax(np.zeros(3, np.int16), np.ones(1, np.float32), np.float32(0))
