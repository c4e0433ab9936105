"""Compare two tensors, checkpoints, adapters or 4-bit folders, tensor by tensor, streamed.

Per tensor: max |a − b|, max relative error, max ULP distance (same dtype), the share of bit-identical
elements, and for two 4-bit weights the number of NF4 / FP4 codes that differ. ``b`` is the reference:
an element is within tolerance when ``|a − b| ≤ atol + rtol·|b|`` (NaN only matches NaN), or, with
``bound="matmul"``, when ``|a − b| ≤ γ_K·(|x| |w|ᵀ)`` for given ``x`` and ``w``. A 4-bit weight
compared with a float one is dequantised first (bit-exact with bitsandbytes).
"""
import os

import numpy as np

from minilora import architectures, lora, native, nf4, testing
from minilora.checkpoint import Checkpoint, load_adapter
from minilora.describe import is_adapter
from minilora.dtypes import is_float
from minilora.errors import InputError
from minilora.nf4_checkpoint import is_aux_key, quantized_weights, read_state
from minilora.safetensors_io import load_file


class Source:
    """Named tensors from one path, read one at a time; 4-bit weights come as ``QuantState``."""

    def __init__(self, path, delta=False):
        self.path, self._ckpt, self._tensors, self.quantized = str(path), None, None, {}
        if self.path.endswith(".npy"):
            try:
                self._tensors = {"tensor": np.load(self.path, allow_pickle=False)}
            except ValueError as e:
                raise InputError(f"not a plain .npy array ({e})", self.path) from None
        elif is_adapter(self.path):
            adapter = load_adapter(self.path)
            if delta:  # compare what the adapter does, s·B A, not its factors
                cfg = adapter.config
                self._tensors = {}
                for name, m in adapter.modules.items():
                    r, alpha = lora.module_rank_alpha(name, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                                                      cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
                    s = lora.scaling(alpha, r, bool(cfg.get("use_rslora")))
                    self._tensors[f"{name}.delta"] = lora.delta_weight(m.A, m.B, s)
            else:
                self._tensors = load_file(adapter.path)
        else:
            self._ckpt = Checkpoint(self.path)
            self.quantized = quantized_weights(self._ckpt.keys())

    def keys(self):
        if self._tensors is not None:
            return list(self._tensors)
        return [k for k in self._ckpt.keys() if not (is_aux_key(k) and self._owner(k) in self.quantized)]

    @staticmethod
    def _owner(key):
        return key.rsplit(".weight.", 1)[0] + ".weight"

    def get(self, name):
        if self._tensors is not None:
            return self._tensors[name]
        if name in self.quantized:
            return read_state(self._ckpt, name)
        return self._ckpt.get(name)

    def float_layout(self, name, x):
        """``x`` as a float array in the model's own layout: bitsandbytes stores a GPT-2 Conv1D weight
        ``(N, K)``, the float checkpoint ``(K, N)`` (``minilora.architectures``)."""
        if not isinstance(x, nf4.QuantState):
            return x
        x = _as_float(x)
        if self._ckpt is not None and architectures.is_conv1d(self._ckpt.config, name[: -len(".weight")]):
            x = np.ascontiguousarray(x.T)
        return x

    def close(self):
        if self._ckpt is not None:
            self._ckpt.close()



def _as_float(x):
    return native.for_quant_type(x.quant_type).dequantize(x) if isinstance(x, nf4.QuantState) else x


def ulp_distance(a, b):
    """Max distance in units in the last place between same-dtype float arrays (NaN pairs: 0)."""
    bits = {2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize]
    ia, ib = (v.view(bits).astype(np.int64) for v in (a, b))
    top = np.int64(1) << (8 * a.dtype.itemsize - 1)
    oa, ob = (np.where(i < 0, -top - i, i) for i in (ia, ib))  # monotone integer order of floats
    both_nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
    d = np.where(both_nan, 0, np.abs(oa - ob))
    return int(d.max()) if d.size else 0


CHUNK = 1 << 18  # elements compared at a time: about a dozen float64 temporaries of 2 MB each


def compare(name, a, b, rtol=0.0, atol=0.0, bound=None):
    """One row of the report for tensor ``name`` (``a`` compared with the reference ``b``). Memory: the two
    tensors plus O(CHUNK) (the comparison runs over slices of the flattened tensors)."""
    row = {"name": name}
    if isinstance(a, nf4.QuantState) and isinstance(b, nf4.QuantState) and a.shape == b.shape:
        n = int(np.prod(a.shape))
        ca, cb = nf4.unpack_nibbles(a.packed, n), nf4.unpack_nibbles(b.packed, n)
        row["code_mismatches"] = int(np.count_nonzero(ca != cb))
    a, b = _as_float(a), _as_float(b)
    row.update(dtype=[str(a.dtype), str(b.dtype)], shape=[list(a.shape), list(b.shape)])
    if a.shape != b.shape:
        row.update(within=False, problem="shapes differ")
        return row
    if not (_numeric(a.dtype) and _numeric(b.dtype)):
        row.update(within=False, problem="not numeric")
        return row
    fa, fb = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    fbound = None if bound is None else np.broadcast_to(bound, a.shape).reshape(-1)
    ulps = a.dtype == b.dtype and is_float(a.dtype)
    max_abs = max_rel = 0.0
    identical = outside = max_ulp = 0
    for i in range(0, fa.size, CHUNK):
        ca, cb = fa[i:i + CHUNK], fb[i:i + CHUNK]
        allowed = None if fbound is None else fbound[i:i + CHUNK]
        abs_err, rel_err, same, out = _chunk_errors(ca, cb, rtol, atol, allowed)
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
        identical, outside = identical + same, outside + out
        if ulps:
            max_ulp = max(max_ulp, ulp_distance(ca, cb))
    row.update(max_abs_error=max_abs, max_rel_error=max_rel,
               identical_fraction=identical / fa.size if fa.size else 1.0,
               max_ulp=max_ulp if ulps else None, outside=outside)
    row["within"] = row["outside"] == 0
    return row


def _chunk_errors(a, b, rtol, atol, bound):
    """``(max abs error, max relative error, identical count, count outside the tolerance)`` of two
    same-shape 1-D slices; a NaN against a number, or unequal infinities, count as an infinite error."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same_nan = np.isnan(a64) & np.isnan(b64)
    err = np.where(same_nan, 0.0, np.abs(a64 - b64))
    err = np.where(np.isnan(err) | (np.isinf(a64) & (a64 != b64)), np.inf, err)  # NaN vs number
    with np.errstate(divide="ignore", invalid="ignore"):  # relative to a non-zero reference only (NF4 code 7 is 0)
        rel = np.where(b64 != 0, err / np.abs(b64), 0.0)
    identical = (a.view(f"u{a.itemsize}") == b.view(f"u{b.itemsize}")) if a.dtype == b.dtype else (a64 == b64) | same_nan
    allowed = (atol + rtol * np.abs(b64)) if bound is None else bound
    if not err.size:
        return 0.0, 0.0, 0, 0
    return (float(err.max()), float(np.nan_to_num(np.where(err == 0, 0, rel), nan=np.inf).max()),
            int(np.count_nonzero(identical)),
            int(np.count_nonzero(~(err <= allowed) & ~same_nan)))  # (a NaN in b makes rtol's allowance NaN)


def _numeric(dtype):
    return dtype.kind in "fiub" or is_float(dtype)


def _load_single(path):
    src = Source(path)
    try:
        keys = src.keys()
        if len(keys) != 1:
            raise InputError(f"--x / --w must hold exactly one tensor, found {len(keys)}", path)
        return _float_operand(np.asarray(_as_float(src.get(keys[0]))), path, keys[0])
    finally:
        src.close()


def _float_operand(a, path, name):
    """``a`` if it holds floats; integer arrays (e.g. ``minilora.vectors``' bit patterns) are refused."""
    if not is_float(a.dtype):
        raise InputError(f"holds {a.dtype} values, not floats: --bound matmul compares float values (bit patterns "
                         f"such as minilora.vectors' uint32 fields must be viewed as float32 first)", path, name)
    return a


def diff(path_a, path_b, rtol=0.0, atol=0.0, bound=None, x=None, w=None, delta=False, names=None):
    """Compare ``path_a`` with the reference ``path_b``; return a report with ``ok``."""
    if bound not in (None, "matmul"):
        raise InputError(f"--bound must be 'matmul', got {bound!r}")
    for what, value in (("rtol", rtol), ("atol", atol)):
        if not (np.isfinite(value) and value >= 0):
            raise InputError(f"--{what} must be a finite number >= 0, got {value}")
    if bound is None and (x is not None or w is not None):
        raise InputError("--x and --w are the inputs of --bound matmul; give --bound matmul or leave them out")
    matmul = None
    if bound == "matmul":
        if x is None or w is None:
            raise InputError("--bound matmul needs --x and --w (the inputs of y = x wᵀ)")
        xs, ws = _load_single(x), _load_single(w)
        if xs.ndim != 2 or ws.ndim != 2 or xs.shape[1] != ws.shape[1]:
            raise InputError(f"--x {xs.shape} and --w {ws.shape} must be (M, K) and (N, K) of y = x wᵀ", x)
        matmul = testing.matmul_bound(xs, ws)
    for p in (path_a, path_b):
        if not os.path.exists(p):
            raise InputError("no such file or folder", p)
    a, b = Source(path_a, delta), Source(path_b, delta)
    try:
        ka, kb = a.keys(), b.keys()
        only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
        unknown = sorted(set(names or ()) - (set(ka) & set(kb)))
        if unknown:
            raise InputError(f"--tensor {unknown[0]} is not in both inputs", path_a)
        rows = []
        in_b = set(kb)
        for name in [k for k in ka if k in in_b]:
            if names and name not in names:
                continue
            ta, tb = a.get(name), b.get(name)
            if isinstance(ta, nf4.QuantState) != isinstance(tb, nf4.QuantState):  # 4-bit vs float
                ta, tb = a.float_layout(name, ta), b.float_layout(name, tb)
            limit = None
            if matmul is not None:
                got, ref = (_float_operand(np.asarray(_as_float(t)), p, name) for t, p in ((ta, path_a), (tb, path_b)))
                if got.shape != matmul.shape or ref.shape != matmul.shape:
                    raise InputError(f"{got.shape} / {ref.shape} do not match the (M, N) = {matmul.shape} of "
                                     f"y = x wᵀ with --x {xs.shape}, --w {ws.shape}", path_a, name)
                limit = matmul + testing._output_rounding(got, ref.astype(np.float64))
            rows.append(compare(name, ta, tb, rtol, atol, limit))
    finally:
        a.close()
        b.close()
    ok = not only_a and not only_b and all(r["within"] for r in rows)
    return {"a": str(path_a), "b": str(path_b), "rtol": rtol, "atol": atol, "bound": bound,
            "ok": ok, "only_in_a": only_a, "only_in_b": only_b, "tensors": rows,
            "totals": {"compared": len(rows), "outside": sum(1 for r in rows if not r["within"]),
                       "bit_identical": sum(1 for r in rows if r.get("identical_fraction") == 1.0)}}
