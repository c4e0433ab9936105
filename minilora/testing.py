"""Public checks for kernel authors: "am I right, and if not, where?" NumPy only.

- ``assert_nf4_equal(out, ref)``: packed NF4 codes equal bit for bit, else the first mismatching
  block, element, both codes and (if given) the input value.
- ``matmul_bound(x, w)`` / ``assert_matmul_close(out, x, w)``: the derived float32 bound
  ``|out − x wᵀ| ≤ γ_K · (|x| @ |w|ᵀ)``, ``γ_K = K·u / (1 − K·u)`` (Higham, *Accuracy and Stability of
  Numerical Algorithms*, §3.1), checked against the float64 product; a failure names the worst element,
  its error and its bound.
- ``assert_lora_close(out, x, W, A, B, s, which)``: a LoRA forward or gradient against
  ``minilora.lora`` with the bound of the matmuls it is made of.

Hypothesis strategies for the same inputs live in ``minilora.strategies`` (it needs hypothesis).
"""
import numpy as np

from minilora import lora
from minilora.nf4 import unpack_nibbles

U_FLOAT32 = 2.0 ** -24
U_BFLOAT16 = 2.0 ** -8
U_FLOAT16 = 2.0 ** -11


def gamma(k, u=U_FLOAT32):
    """``γ_k = k·u / (1 − k·u)``: the relative error bound of a length-``k`` dot product."""
    if k * u >= 1:
        raise ValueError(f"gamma undefined: k·u = {k * u} >= 1 (k={k}, u={u})")
    return k * u / (1 - k * u)


def matmul_bound(x, w, u=U_FLOAT32):
    """Elementwise bound on ``|fl(x @ w.T) − x @ w.T|`` for ``x (M, K)``, ``w (N, K)``: ``γ_K |x||w|ᵀ``."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need x (M, K) and w (N, K) with the same K, got {x.shape} and {w.shape}")
    return gamma(x.shape[1], u) * (np.abs(x) @ np.abs(w).T)  # (M, N)


def _worst(out, ref, bound, what):
    err = np.abs(np.asarray(out, np.float64) - ref)
    bad = ~(err <= bound)  # NaN counts as a failure
    if bad.any():
        ratio = np.where(bad, np.nan_to_num(err / np.maximum(bound, 1e-300), nan=np.inf), 0)
        i = np.unravel_index(int(np.argmax(ratio)), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements outside the derived bound; worst at "
            f"{tuple(int(j) for j in i)}: out={float(np.asarray(out)[i])!r} ref={float(ref[i])!r} "
            f"|error|={float(err[i]):.3e} bound={float(bound[i]):.3e}")


def assert_matmul_close(out, x, w, u=U_FLOAT32):
    """Assert ``out ≈ x @ w.T`` within ``matmul_bound`` (the reference product is float64)."""
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64).T  # (M, N)
    if np.shape(out) != ref.shape:
        raise AssertionError(f"matmul output has shape {np.shape(out)}, expected {ref.shape}")
    _worst(out, ref, matmul_bound(x, w, u) + _output_rounding(out, ref), "matmul")


def _output_rounding(out, ref):
    """The final rounding of the result to ``out``'s dtype (half an ulp, relative)."""
    dtype = np.asarray(out).dtype
    u = {2: U_FLOAT16 if dtype == np.float16 else U_BFLOAT16, 4: U_FLOAT32}.get(dtype.itemsize, 0.0)
    return u * np.abs(ref)


def assert_lora_close(out, x, W, A, B, s, which="forward", grad_y=None, u=U_FLOAT32):
    """Check a LoRA forward (``which="forward"``) or gradient (``"grad_x"``, ``"grad_A"``,
    ``"grad_B"``; pass ``grad_y``) against ``minilora.lora`` within the bound of its matmuls
    accumulated with unit roundoff ``u``."""
    x64, W64, A64, B64 = (np.asarray(a, np.float64) for a in (x, W, A, B))
    h = np.abs(x64) @ np.abs(A64).T  # (M, R) |x||A|ᵀ
    if which == "forward":
        ref = lora.lora_forward(x, W, A, B, s)
        K, R = W64.shape[1], A64.shape[0]
        # x Wᵀ (length K) + s·(x Aᵀ) Bᵀ (length K then R) + the final add and scale.
        bound = gamma(K + 2, u) * (np.abs(x64) @ np.abs(W64).T) + gamma(K + R + 2, u) * abs(s) * (h @ np.abs(B64).T)
    else:
        if grad_y is None:
            raise ValueError("gradient checks need grad_y (M, N)")
        g = np.abs(np.asarray(grad_y, np.float64))
        ref = dict(zip(("grad_x", "grad_A", "grad_B"), lora.lora_backward(x, W, A, B, s, grad_y)))[which]
        M, N, K = g.shape[0], g.shape[1], W64.shape[1]
        gB = g @ np.abs(B64)  # (M, R)
        bound = {"grad_B": gamma(M + K + 1, u) * abs(s) * (g.T @ h),
                 "grad_A": gamma(N + M + 1, u) * abs(s) * (gB.T @ np.abs(x64)),
                 "grad_x": gamma(N + 2, u) * (g @ np.abs(W64)) + gamma(N + B64.shape[1] + 2, u) * abs(s) * (gB @ np.abs(A64))}[which]
    if np.shape(out) != ref.shape:
        raise AssertionError(f"{which} has shape {np.shape(out)}, expected {ref.shape}")
    _worst(out, ref, bound + _output_rounding(out, ref), f"LoRA {which}")


def assert_nf4_equal(out, ref, x=None, blocksize=64):
    """Assert two packed NF4 (or FP4) arrays are identical; on failure name the first mismatching
    block, element, both codes and, when the input ``x`` is given, the input value."""
    out, ref = np.asarray(out), np.asarray(ref)
    if out.dtype != np.uint8 or ref.dtype != np.uint8:
        raise AssertionError(f"packed codes must be uint8, got {out.dtype} and {ref.dtype}")
    if out.size != ref.size:
        raise AssertionError(f"packed sizes differ: {out.size} vs {ref.size} bytes")
    if np.array_equal(out.reshape(-1), ref.reshape(-1)):
        return
    n = 2 * out.size if x is None else int(np.size(x))
    co, cr = unpack_nibbles(out.reshape(-1, 1), n), unpack_nibbles(ref.reshape(-1, 1), n)
    bad = np.flatnonzero(co != cr)
    j = int(bad[0])
    value = "" if x is None else f", input value {float(np.asarray(x).reshape(-1)[j])!r}"
    raise AssertionError(f"NF4 codes differ at {bad.size} of {n} elements; first at element {j} "
                         f"(block {j // blocksize}, offset {j % blocksize}): out code {int(co[j])}, "
                         f"ref code {int(cr[j])}{value}")


def assert_absmax_equal(out, ref):
    """Assert two float32 absmax arrays are identical bit for bit (NaN included)."""
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if out.shape != ref.shape:
        raise AssertionError(f"absmax shapes differ: {out.shape} vs {ref.shape}")
    bad = np.flatnonzero(out.view(np.uint32) != ref.view(np.uint32))
    if bad.size:
        b = int(bad[0])
        raise AssertionError(f"absmax differs in {bad.size} blocks; first block {b}: out {out[b]!r} ref {ref[b]!r}")
