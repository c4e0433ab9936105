"""Training options, and the resumable training checkpoint — without pickle.

A checkpoint (``OUT/checkpoint/``) holds everything a resumed run needs to continue bit for bit on
CPU: the adapter parameters, the optimizer state (AdamW moments and step counts, SGD momentum), the
torch RNG state (dropout), the step counter (which fixes the learning rate and the data position) and
the options that must not change (``state.json``). Tensors go to ``state.safetensors`` through ``minilora.safetensors_io``;
scalars to JSON. The folder is replaced atomically, so a run killed mid-save keeps the previous one.
"""
import dataclasses
import json
import os

import numpy as np
import torch

from minilora.errors import InputError
from minilora.output import staged_folder
from minilora.safetensors_io import load_file
from minilora.safetensors_write import save_file


@dataclasses.dataclass
class TrainOptions:
    rank: int = 8
    alpha: float = None            # default 2 × rank (the heuristic of Raschka's experiments)
    targets: str = None            # None: every Linear of the blocks
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    qlora: bool = False
    double_quant: bool = True
    optimizer: str = "adamw"
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    epochs: int = 1
    max_steps: int = None
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    dtype: str = None              # base weights: float32 on CPU, bfloat16 (autocast) on CUDA
    max_length: int = 256
    eval_split: float = 0.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    device: str = None
    compile: bool = None           # torch.compile each decoder block; None: on CUDA yes, on the CPU no

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2 * self.rank
        checks = [(self.rank > 0, "--rank must be positive"), (self.lr > 0, "--lr must be positive"),
                  (self.batch_size > 0 and self.grad_accum > 0, "--batch-size and --grad-accum must be positive"),
                  (0 <= self.dropout < 1, "--dropout must be in [0, 1)"),
                  (0 <= self.eval_split < 1, "--eval-split must be in [0, 1)"),
                  (self.max_length >= 2, "--max-length must be at least 2"),
                  (self.optimizer in ("adamw", "sgd"), "--optimizer must be adamw or sgd"),
                  (self.scheduler in ("cosine", "linear", "constant"), "--scheduler must be cosine, linear or constant"),
                  (self.max_steps is None or self.max_steps > 0, "--max-steps must be positive"),
                  (self.epochs > 0, "--epochs must be positive")]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


# Options whose change makes a checkpoint incompatible (the rest, e.g. --save-every, may change).
FROZEN = ("rank", "alpha", "targets", "dropout", "rslora", "dora", "qlora", "double_quant", "optimizer",
          "lr", "scheduler", "warmup", "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum",
          "max_grad_norm", "dtype", "max_length", "eval_split", "seed")


def _optimizer_tensors(optimizer):
    tensors, scalars = {}, {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt/{index}/{key}"] = value.detach().cpu().contiguous().numpy()
            else:
                scalars[f"{index}/{key}"] = float(value)
    return tensors, scalars


def save_checkpoint(folder, step, params, optimizer, options, fingerprint, log_rows):
    """Write the resumable state into ``folder`` (replaced atomically)."""
    tensors = {f"param/{i}": p.detach().cpu().contiguous().numpy() for i, p in enumerate(params)}
    opt_tensors, opt_scalars = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng/torch"] = torch.get_rng_state().numpy()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state().numpy()
    state = {"step": step, "optimizer_scalars": opt_scalars,
             "options": {k: getattr(options, k) for k in FROZEN}, "fingerprint": fingerprint,
             "n_params": len(params), "log": log_rows}
    with staged_folder(folder) as stage:
        save_file(tensors, os.path.join(stage, "state.safetensors"))
        with open(os.path.join(stage, "state.json"), "w", encoding="utf-8") as f:
            json.dump(state, f)


def load_checkpoint(folder, params, optimizer, options, fingerprint):
    """Restore the state saved by ``save_checkpoint``; returns ``(step, log_rows)``. Refuses a
    checkpoint from other options, another model or other data."""
    path = os.path.join(folder, "state.json")
    if not os.path.isfile(path):
        raise InputError("--resume: no training checkpoint here (state.json missing)", folder)
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    for key in FROZEN:
        saved, now = state["options"].get(key), getattr(options, key)
        if saved != now:
            raise InputError(f"--resume: checkpoint was made with {key}={saved!r}, this run has {now!r}", folder)
    for key, value in fingerprint.items():
        if state["fingerprint"].get(key) != value:
            raise InputError(f"--resume: checkpoint was made for another {key}", folder)
    if state["n_params"] != len(params):
        raise InputError(f"--resume: checkpoint has {state['n_params']} parameters, the model {len(params)}", folder)
    tensors = load_file(os.path.join(folder, "state.safetensors"))
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = torch.from_numpy(tensors[f"param/{i}"])
            if saved.shape != p.shape:
                raise InputError(f"--resume: parameter {i} has shape {tuple(saved.shape)}, expected {tuple(p.shape)}", folder)
            p.copy_(saved)
    opt_state = optimizer.state_dict()
    restored = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, index, name = key.split("/", 2)
            restored.setdefault(int(index), {})[name] = torch.from_numpy(value).to(params[0].device)
    for key, value in state["optimizer_scalars"].items():
        index, name = key.split("/", 1)
        restored.setdefault(int(index), {})[name] = torch.tensor(value)
    opt_state["state"] = restored
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(torch.from_numpy(np.asarray(tensors["rng/torch"])))
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.asarray(tensors["rng/cuda"])))
    return state["step"], state["log"]
