"""minilora.torch_backend.nf4 against the NumPy reference (minilora.nf4, minilora.double_quant): bit for bit.

Every comparison is on bit patterns (NaNs by position). Inputs: the edge-case inputs of the committed
bitsandbytes vectors (tests/data/nf4/; NaN, inf, subnormal, all-zero and tail blocks) and Hypothesis
arrays. The CUDA variants run when a GPU is present and skip with a reason otherwise.
"""
import json
import pathlib
import warnings

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from minilora import double_quant as ref_dq  # noqa: E402
from minilora import nf4 as ref  # noqa: E402
from minilora.tables import ALLOWED_BLOCKSIZES, NESTED_BLOCKSIZE, NF4_MID  # noqa: E402
from minilora.torch_backend import nf4 as tnf4  # noqa: E402
from minilora.torch_backend import nf4_triton  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "nf4"
META = json.loads((DATA / "meta.json").read_text())
VEC = np.load(DATA / "vectors.npz")
NF4_CASES = [c for c in META["cases"] if c.get("kind") != "nested" and c["quant_type"] == "nf4"]
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
T_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
UINT = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}
TAIL_SIZES = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 255, 257]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the CUDA variant needs a GPU"))]


def to_torch(a, device):
    """numpy (incl. ml_dtypes.bfloat16) -> torch on device, bit for bit."""
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).to(device)
    return torch.from_numpy(a).to(device)


def to_numpy(t):
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def assert_same_bits(ref_a, out_a, what):
    out_a = to_numpy(out_a) if isinstance(out_a, torch.Tensor) else np.asarray(out_a)
    ref_a = np.asarray(ref_a)
    assert ref_a.shape == out_a.shape and ref_a.dtype == out_a.dtype, \
        f"{what}: {ref_a.shape} {ref_a.dtype} != {out_a.shape} {out_a.dtype}"
    if ref_a.dtype.kind in "ui":
        np.testing.assert_array_equal(ref_a, out_a, err_msg=what)
        return
    ref_nan, out_nan = np.isnan(ref_a.astype(np.float32)), np.isnan(out_a.astype(np.float32))
    np.testing.assert_array_equal(ref_nan, out_nan, err_msg=f"{what}: NaN positions differ")
    ub = UINT[ref_a.dtype.name]
    bad = np.flatnonzero(ref_a.view(ub)[~ref_nan] != out_a.view(ub)[~out_nan])
    assert bad.size == 0, f"{what}: {bad.size} elements differ, first at {bad[:5]}"


def check_quantize(x, blocksize, device, double_quant=False):
    """Quantise and dequantise ``x`` with both backends and compare every byte."""
    ref_state = ref.quantize(x, blocksize, double_quant)
    out_state = tnf4.quantize(to_torch(x, device), blocksize, double_quant)
    assert_same_bits(ref_state.packed, out_state.packed, "packed")
    if double_quant:
        assert_same_bits(ref_state.nested_codes, out_state.nested_codes, "nested codes")
        assert_same_bits(ref_state.nested_absmax, out_state.nested_absmax, "nested absmax")
        assert np.float32(ref_state.offset).view(np.uint32) == np.float32(out_state.offset).view(np.uint32)
    else:
        assert_same_bits(ref_state.absmax, out_state.absmax, "absmax")
    for name in ("float32", "float16", "bfloat16"):
        want = ref.dequantize(ref_state, NP_DTYPES[name])
        assert_same_bits(want, tnf4.dequantize(out_state, T_DTYPES[name]), f"dequantised {name}")
        if nf4_triton.available(out_state.packed):  # CUDA: the Triton kernel of NF4Linear.dequantize too
            assert_same_bits(want, nf4_triton.dequantize(out_state, T_DTYPES[name]), f"Triton dequantised {name}")
    return ref_state, out_state


# ---------------------------------------------------------------- edge cases of the bitsandbytes vectors
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", NF4_CASES, ids=[c["name"] for c in NF4_CASES])
def test_quantize_equals_reference_on_vector_inputs(case, device):
    x = VEC[f"{case['name']}__x"].view(NP_DTYPES[case["dtype"]]).reshape(case["shape"])
    check_quantize(x, case["blocksize"], device, case["double_quant"])


@pytest.mark.parametrize("device", DEVICES)
def test_values_on_decision_bounds_take_the_lower_code(device):
    x = np.concatenate([[1.0], NF4_MID, -NF4_MID, [0.0] * 17]).astype(np.float32)  # absmax 1: v == x
    ref_state, _ = check_quantize(x, 64, device)
    codes = ref.unpack_nibbles(ref_state.packed, x.size)
    np.testing.assert_array_equal(codes[1:16], np.arange(15))  # MID[i] gets code i, not i+1


@pytest.mark.parametrize("device", DEVICES)
def test_special_blocks(device):
    nan_block = np.full(64, 0.5, np.float32)
    nan_block[3] = np.nan
    inf_block = np.linspace(-1, 1, 64, dtype=np.float32)
    inf_block[10] = np.inf
    sub = (np.arange(64, dtype=np.float32) - 32) * np.float32(1e-40)  # subnormal only
    x = np.concatenate([np.zeros(64, np.float32), nan_block, inf_block, sub, np.zeros(5, np.float32)])
    check_quantize(x, 64, device)
    check_quantize(x, 64, device, double_quant=True)


@pytest.mark.parametrize("device", DEVICES)
def test_nested_lut_equals_reference(device):
    np.testing.assert_array_equal(ref_dq._nested_lut(), to_numpy(tnf4._nested_lut(torch.device(device))))


# ---------------------------------------------------------------- properties
finite_or_special = st.sampled_from([0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e-40, 65504.0])


@st.composite
def arrays(draw):
    n = draw(st.one_of(st.sampled_from(TAIL_SIZES), st.integers(1, 600)))
    dtype = draw(st.sampled_from(sorted(NP_DTYPES)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4, size=n)  # mixed magnitudes
    for _ in range(draw(st.integers(0, 3))):
        x[draw(st.integers(0, n - 1))] = draw(finite_or_special)
    if draw(st.booleans()) and n > 64:
        x[:64] = 0.0  # an all-zero block
    return x.astype(NP_DTYPES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None)
@given(x=arrays(), blocksize=st.sampled_from([32, 64, 128, 256]), double_quant=st.booleans())
def test_quantize_dequantize_bit_exact(device, x, blocksize, double_quant):
    check_quantize(x, blocksize, device, double_quant)


@st.composite
def absmax_arrays(draw):
    n = draw(st.one_of(st.sampled_from([1, 2, 255, 256, 257, 511, 513]), st.integers(1, 1100)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = np.abs(rng.standard_normal(n)) * 10.0 ** draw(st.integers(-4, 3))
    for _ in range(draw(st.integers(0, 2))):
        a[draw(st.integers(0, n - 1))] = draw(st.sampled_from([0.0, np.nan, 1e-38]))
    if draw(st.booleans()):
        a[: min(n, NESTED_BLOCKSIZE)] = a[0]  # a constant nested block: a2 may be 0
    return a.astype(np.float32)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None)
@given(absmax=absmax_arrays(), explicit_offset=st.booleans())
def test_double_quantize_bit_exact(device, absmax, explicit_offset):
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN absmax has no median: the offset is NaN
        offset = np.float32(np.nanmedian(absmax)) if explicit_offset else None
    ref_codes, ref_a2, ref_off = ref_dq.double_quantize(absmax, offset)
    out_codes, out_a2, out_off = tnf4.double_quantize(to_torch(absmax, device), offset)
    assert_same_bits(ref_codes, out_codes, "codes")
    assert_same_bits(ref_a2, out_a2, "nested absmax")
    assert_same_bits(np.array([ref_off]), np.array([out_off], np.float32), "offset")
    assert_same_bits(ref_dq.dequantize_absmax(ref_codes, ref_a2, ref_off),
                     tnf4.dequantize_absmax(out_codes, out_a2, out_off), "dequantised absmax")


@pytest.mark.parametrize("device", DEVICES)
def test_quant_state_round_trips_through_numpy(device):
    x = np.random.default_rng(0).standard_normal((24, 40)).astype(ml_dtypes.bfloat16)  # (N, K)
    for dq in (False, True):
        out = tnf4.quantize(to_torch(x, device), 64, dq)
        back = tnf4.QuantState.from_numpy(out.to_numpy(), device)
        assert_same_bits(ref.dequantize(out.to_numpy()), tnf4.dequantize(back), f"round trip dq={dq}")
        assert tnf4.dequantize(back).shape == (24, 40) and tnf4.dequantize(back).dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available() or nf4_triton.triton is None,
                    reason="no CUDA device with Triton: the Triton dequantiser needs a GPU")
@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_triton_dequantize_every_blocksize_many_programs(blocksize):
    """Shapes spanning several programs (BLOCK bytes each), odd element counts and every block size, with and
    without double quantisation (more than 256 blocks, so several nested blocks): the same bits as the
    reference for every output dtype."""
    rng = np.random.default_rng(blocksize)
    for n in (2 * nf4_triton.BLOCK * 3 + 1, 256 * blocksize + 3 * blocksize + 7):
        x = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 50.0], size=n)).astype(np.float32)
        x[rng.integers(0, n, 3)] = [np.nan, np.inf, 0.0]
        for dq in (False, True):
            check_quantize(x, blocksize, "cuda", dq)


def test_triton_switch_off(monkeypatch):
    """``MINILORA_NO_TRITON=1`` (read at import into ``USE_TRITON``) sends NF4Linear back to the torch transcription."""
    t = torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(nf4_triton, "USE_TRITON", False)
    assert not nf4_triton.available(t)
    monkeypatch.setattr(nf4_triton, "USE_TRITON", True)
    assert nf4_triton.available(t) == (torch.cuda.is_available() and nf4_triton.triton is not None)


# ---------------------------------------------------------------- errors: the same exception types
def test_bad_inputs_raise_like_the_reference():
    for bad_bs in (63, 0, 8192):
        with pytest.raises(ValueError):
            ref.quantize_nf4(np.zeros(4, np.float32), bad_bs)
        with pytest.raises(ValueError):
            tnf4.quantize_nf4(torch.zeros(4), bad_bs)
    with pytest.raises(TypeError):
        tnf4.quantize_nf4(np.zeros(4, np.float32))
    with pytest.raises(TypeError):
        tnf4.quantize_nf4(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError):
        tnf4.quantize_nf4(torch.zeros(0))
    with pytest.raises(ValueError):
        tnf4.quantize(torch.zeros(4), quant_type="fp4")
    assert ALLOWED_BLOCKSIZES[0] == 32


_X8 = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
_P8, _A8 = ref.quantize_nf4(_X8, 64)


@pytest.mark.parametrize("packed, absmax, shape, blocksize", [
    (_P8[:-1], _A8, (8, 64), 64), (_P8, np.append(_A8, _A8), (8, 64), 64),
    (_P8, _A8.astype(np.float64), (8, 64), 64), (_P8.view(np.int8), _A8, (8, 64), 64),
    (_P8, _A8, (-8, -64), 64), (_P8[:0], _A8[:0], (0, 64), 64), (_P8, _A8, "ab", 64),
    (_P8, _A8, (8.0, 64), 64), (_P8, _A8, (2**32, 2**32), 64), (_P8, _A8, (8, 64), 48),
], ids=["packed-short", "absmax-long", "absmax-f64", "packed-int8", "negative-shape", "zero-shape",
        "str-shape", "float-shape", "huge-shape", "blocksize-48"])
def test_dequantize_checks_the_state_like_the_reference(packed, absmax, shape, blocksize):
    """The torch dequantiser validates its arguments with the reference's rule: the same exception type
    (it used to accept a float shape, return an empty tensor for (0, 64) and wrap a huge shape around)."""
    with pytest.raises(Exception) as want:
        ref.dequantize_nf4(packed, absmax, shape, np.float32, blocksize)
    with pytest.raises(want.type):
        tnf4.dequantize_nf4(torch.from_numpy(np.ascontiguousarray(packed)), torch.from_numpy(absmax), shape,
                            torch.float32, blocksize)


# ---------------------------------------------------------------- cases that tell near-identical formulas apart
def _division_sensitive_pair(true_division_on_bound):
    """``[am, x]`` such that one of ``x / am`` and ``x * (1 / am)`` lands exactly on a decision bound and the
    other one ulp above it, so the two formulas give different codes (found by a seeded search)."""
    rng = np.random.default_rng(7)
    for am in (rng.uniform(0.5, 4.0, 20000)).astype(np.float32):
        for mid in NF4_MID:
            x = np.float32(mid * am)
            by_div, by_recip = np.float32(x / am), np.float32(x * (np.float32(1) / am))
            on, off = (by_div, by_recip) if true_division_on_bound else (by_recip, by_div)
            if on == mid and off > mid:
                return np.array([am, x], np.float32)
    raise AssertionError("no division-sensitive pair found")


@pytest.mark.parametrize("device", DEVICES)
def test_tail_block_divides_full_blocks_multiply_by_the_reciprocal(device):
    tail = _division_sensitive_pair(true_division_on_bound=True)
    full = np.zeros(64, np.float32)
    full[:2] = _division_sensitive_pair(true_division_on_bound=False)
    x = np.concatenate([full, tail])  # a full block, then the 2-element tail
    ref_state, _ = check_quantize(x, 64, device)
    codes = ref.unpack_nibbles(ref_state.packed, 66)
    v_recip = np.float32(tail[1] * (np.float32(1) / tail[0]))
    v_div = np.float32(full[1] / full[0])
    assert ref.nf4_codes(np.array([v_recip]))[0] != codes[65], "the tail case must tell the formulas apart"
    assert ref.nf4_codes(np.array([v_div]))[0] != codes[1], "the full-block case must tell the formulas apart"
