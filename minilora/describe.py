"""What a checkpoint or an adapter holds, as a plain dict (``minilora inspect`` prints it).

Checkpoint: shards, tensors with dtype and shape, parameter and byte totals per dtype, the model
type from ``config.json``. Adapter: its config, and per module the rank, alpha, scale, shapes and
extras (DoRA magnitude, lora bias), the base modules it targets and its trainable parameter count.
"""
import os
from collections import Counter

import numpy as np

from minilora import lora
from minilora.checkpoint import ADAPTER_CONFIG, Checkpoint, load_adapter
from minilora.nf4_checkpoint import quantized_weights, read_state


def is_adapter(path):
    path = os.path.abspath(str(path))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)) and (
        os.path.isdir(path) or os.path.basename(path).startswith("adapter"))


def describe(path):
    return describe_adapter(path) if is_adapter(path) else describe_checkpoint(path)


def describe_checkpoint(path):
    """Parameters count model parameters: a 4-bit weight counts its quant state's shape (not its packed
    bytes), its absmax / maps / state JSON count none; bytes count what is on disk."""
    with Checkpoint(path) as ckpt:
        tensors, params, nbytes = [], Counter(), Counter()
        quantized = quantized_weights(ckpt.keys())
        states = {k: read_state(ckpt, k) for k in quantized}
        for name in ckpt.keys():
            dtype, shape, size = ckpt.info(name)
            tensors.append({"name": name, "dtype": str(dtype), "shape": list(shape),
                            "shard": ckpt.shard_of[name]})
            owner = name.rsplit(".weight.", 1)[0] + ".weight" if ".weight." in name else None
            if name in states:
                kind = f"{states[name].quant_type} (4-bit)"
                params[kind] += int(np.prod(states[name].shape, dtype=np.int64))
                nbytes[kind] += size
                continue
            if owner in states:  # absmax, nested statistics, maps, quant-state JSON: storage, not parameters
                nbytes[f"{states[owner].quant_type} (4-bit)"] += size
                continue
            params[str(dtype)] += int(np.prod(shape, dtype=np.int64))
            nbytes[str(dtype)] += size
        config = ckpt.config or {}
        return {"kind": "checkpoint", "path": ckpt.path, "shards": list(ckpt.readers),
                "quantized": {k: _state_summary(s) for k, s in states.items()},
                "model_type": config.get("model_type"), "architectures": config.get("architectures"),
                "tensors": tensors, "parameters": sum(params.values()), "bytes": sum(nbytes.values()),
                "by_dtype": {d: {"parameters": params[d], "bytes": nbytes[d]} for d in nbytes}}


def _state_summary(state):
    return {"quant_type": state.quant_type, "blocksize": state.blocksize, "shape": list(state.shape),
            "dtype": str(state.dtype), "double_quant": state.nested_codes is not None}


def describe_adapter(path):
    adapter = load_adapter(path)
    cfg = adapter.config
    modules, trainable = [], 0
    for name, m in sorted(adapter.modules.items()):
        r, alpha = lora.module_rank_alpha(name, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                                          cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
        count = m.A.size + m.B.size + sum(t.size for t in (m.magnitude, m.bias) if t is not None)
        trainable += count
        modules.append({"module": name, "kind": m.kind, "rank": int(m.A.shape[0]), "config_rank": r,
                        "alpha": alpha, "scale": lora.scaling(alpha, r, bool(cfg.get("use_rslora"))),
                        "A": list(m.A.shape), "B": list(m.B.shape), "dtype": str(m.A.dtype),
                        "dora": m.magnitude is not None, "bias": m.bias is not None,
                        "parameters": int(count)})
    trainable += sum(t.size for k, t in adapter.full_tensors.items() if k not in adapter.saved_base)
    keep = ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules",
            "rank_pattern", "alpha_pattern", "modules_to_save", "base_model_name_or_path", "task_type")
    return {"kind": "adapter", "path": adapter.path, "config": {k: cfg.get(k) for k in keep},
            "modules": modules, "targets": sorted({m["module"].rsplit(".", 1)[-1] for m in modules}),
            "full_tensors": sorted(set(adapter.full_tensors) - adapter.saved_base),
            "saved_base_tensors": sorted(adapter.saved_base), "parameters": int(trainable)}
