"""The LoRA merge kernel (``csrc/lora_merge.c``), wrapped like ``minilora.native``: ``W' = W + s·B A`` in C,
the bits of ``minilora.lora.merge_weight``, plus the statistics a streaming merge needs."""
import numpy as np

from minilora import native


def merge_weight_stats(W, A, B, s, fan_in_fan_out=False, *, variant="auto", num_threads=None, out=None):
    """``minilora.lora.merge_weight`` in C, bit for bit, plus statistics: returns ``(W', max_abs_delta,
    nonfinite, first_nonfinite)`` and raises nothing for NaN / inf (the caller decides). W float32 /
    bfloat16 / float16 (N, K) (Conv1D / Embedding layouts: (K, N) with ``fan_in_fan_out``).
    ``out``: where W' goes (W's shape and dtype, C-contiguous); ``out=W`` merges in place (each element
    is read before it is written), for a caller that owns W's buffer. Default: a new array."""
    fn = native._kernel("lora_merge", variant)
    if not isinstance(W, np.ndarray) or W.dtype not in native._OUT_CODES:
        raise TypeError(f"W must be a float32/bfloat16/float16 ndarray, got {getattr(W, 'dtype', type(W).__name__)}")
    A, B = _f32_matrix(A, "A"), _f32_matrix(B, "B")
    if W.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"need W 2-D, A (R, K) and B (N, R) with the same R, got W {W.shape}, A {A.shape}, B {B.shape}")
    if fan_in_fan_out:  # W (K, N): the same products in the same order with A' = Bᵀ, B' = Aᵀ
        A, B = np.ascontiguousarray(B.T), np.ascontiguousarray(A.T)  # (R, N), (K, R)
    N, K = W.shape
    if A.shape[1] != K or B.shape[0] != N:
        layout = "W (K, N)" if fan_in_fan_out else "W (N, K)"
        raise ValueError(f"LoRA shapes do not fit: {layout} = {W.shape}, A {A.shape}, B {B.shape}")
    W = np.ascontiguousarray(W)
    if out is None:
        out = np.empty_like(W)  # W's shape and dtype
    elif not (isinstance(out, np.ndarray) and out.dtype == W.dtype and out.shape == W.shape
              and out.flags.c_contiguous and out.flags.writeable):
        raise ValueError(f"out must be a writable C-contiguous {W.dtype} array of shape {W.shape}")
    elif out is not W and np.shares_memory(out, W):
        raise ValueError("out overlaps W without being W")
    for name, factor in (("A", A), ("B", B)):  # read while out is written: no overlap at all
        if np.shares_memory(out, factor):
            raise ValueError(f"out overlaps {name}")
    stats = native.ffi.new("float *"), native.ffi.new("int64_t *"), native.ffi.new("int64_t *")
    floats = native._workspace_size("minilora_lora_merge_scratch_floats", K, A.shape[0])
    scratch = np.empty(floats, dtype=np.float32)  # A in panels
    ptr = native._ptr
    status = fn(ptr("uint8_t", W.view(np.uint8)), native._OUT_CODES[W.dtype], ptr("float", A), ptr("float", B),
                N, K, A.shape[0], float(np.float32(s)), ptr("uint8_t", out.view(np.uint8)), *stats,
                native._threads(num_threads), ptr("float", scratch), scratch.size)
    native._check(status, "lora_merge")
    return out, float(stats[0][0]), int(stats[1][0]), int(stats[2][0])


def _f32_matrix(a, name):
    a = np.asarray(a)
    if a.ndim != 2 or a.dtype.kind != "f" and a.dtype.name != "bfloat16":
        raise ValueError(f"{name} must be a 2-D float array, got {a.dtype} {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def merge_weight(W, A, B, s, fan_in_fan_out=False, *, variant="auto", num_threads=None):
    """``minilora.lora.merge_weight`` in C: the same bits, the same ValueError for NaN / inf."""
    out, _, bad, first = merge_weight_stats(W, A, B, s, fan_in_fan_out, variant=variant, num_threads=num_threads)
    if bad:
        index = tuple(int(i) for i in np.unravel_index(first, W.shape))
        raise ValueError(f"merge produced {bad} NaN/inf values (first at index {index}) from finite base "
                         f"weights; the adapter or --scale is too large for {out.dtype}")
    return out


def unmerge_weight(W_merged, A, B, s, fan_in_fan_out=False, *, variant="auto", num_threads=None):
    """``minilora.lora.unmerge_weight`` in C: ``round(W' − ΔW)``, the same bits."""
    out, _, bad, first = merge_weight_stats(W_merged, A, B, -np.float32(s), fan_in_fan_out, variant=variant,
                                            num_threads=num_threads)
    if bad:
        index = tuple(int(i) for i in np.unravel_index(first, W_merged.shape))
        raise ValueError(f"unmerge produced {bad} NaN/inf values (first at index {index}) from finite base weights")
    return out
