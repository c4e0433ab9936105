"""The public checks of minilora.testing catch what they should and say where."""
import numpy as np
import pytest
from hypothesis import given, settings

from minilora import lora, nf4, strategies as st_ml, testing


def test_assert_nf4_equal_reports_block_element_codes_and_value():
    x = np.random.default_rng(0).standard_normal(130).astype(np.float32)
    packed, _ = nf4.quantize_nf4(x)
    testing.assert_nf4_equal(packed, packed.copy(), x)
    bad = packed.copy()
    bad[40, 0] ^= 0x10                                   # element 80: high nibble of byte 40
    with pytest.raises(AssertionError, match=r"element 80 \(block 1, offset 16\).*input value"):
        testing.assert_nf4_equal(bad, packed, x)


def test_assert_matmul_close_accepts_float32_and_rejects_a_wrong_element():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 4097)).astype(np.float32)
    w = rng.standard_normal((7, 4097)).astype(np.float32)
    out = x @ w.T                                        # float32 BLAS: inside the bound
    testing.assert_matmul_close(out, x, w)
    out[3, 2] += 2 * testing.matmul_bound(x, w)[3, 2]
    with pytest.raises(AssertionError, match=r"worst at \(3, 2\)"):
        testing.assert_matmul_close(out, x, w)
    with pytest.raises(AssertionError, match="outside"):
        testing.assert_matmul_close(np.full((5, 7), np.nan, np.float32), x, w)


def test_assert_lora_close_forward_and_gradients_in_float32():
    rng = np.random.default_rng(2)
    M, K, N, R, s = 6, 65, 33, 4, 2.0
    x, W = rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32)
    A, B = rng.standard_normal((R, K)).astype(np.float32), rng.standard_normal((N, R)).astype(np.float32)
    g = rng.standard_normal((M, N)).astype(np.float32)
    y = x @ W.T + np.float32(s) * ((x @ A.T) @ B.T)      # a float32 "kernel"
    testing.assert_lora_close(y, x, W, A, B, s)
    h, gB = x @ A.T, g @ B
    testing.assert_lora_close(np.float32(s) * (g.T @ h), x, W, A, B, s, "grad_B", g)
    testing.assert_lora_close(np.float32(s) * (gB.T @ x), x, W, A, B, s, "grad_A", g)
    testing.assert_lora_close(g @ W + np.float32(s) * (gB @ A), x, W, A, B, s, "grad_x", g)
    with pytest.raises(AssertionError, match="LoRA forward"):
        testing.assert_lora_close(y + np.float32(0.01), x, W, A, B, s)
    with pytest.raises(AssertionError, match="grad_A"):
        testing.assert_lora_close(np.float32(s / 2) * (gB.T @ x), x, W, A, B, s, "grad_A", g)


@settings(max_examples=40, deadline=None)
@given(st_ml.nf4_inputs())
def test_strategies_make_valid_adversarial_inputs(case):
    x, blocksize = case
    assert x.dtype == np.float32 and 1 <= x.size and blocksize in (32, 64, 128, 256)
    packed, absmax = nf4.quantize_nf4(x, blocksize)
    assert packed.shape == ((x.size + 1) // 2, 1) and absmax.shape == (-(-x.size // blocksize),)
    testing.assert_nf4_equal(packed, packed, x, blocksize)


def test_gamma():
    assert testing.gamma(1) == pytest.approx(2.0 ** -24, rel=1e-6)
    with pytest.raises(ValueError):
        testing.gamma(2**24)
    assert lora.scaling(4, 4) == 1.0
