"""Checkpoints on disk: Hugging Face model folders (single or sharded safetensors) and PEFT adapters.

The only module that knows key strings. A base tensor ``<module>.weight`` is adapted by the adapter
tensors ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` (Linear, Conv1D),
``.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding, no ``.weight``), ``.lora_magnitude_vector``
(DoRA) and ``.lora_B.bias`` (``lora_bias``); ``modules_to_save`` appear as full tensors under the
module's own name. PEFT 0.21 strips the adapter name ("default") when saving; we strip it on reading
too, in case a file kept it.

Only safetensors and JSON are read: nothing is ever unpickled. Shard names from an index are plain
file names inside the checkpoint folder. Not here: the math (``minilora.lora``), the NF4 layout
(``minilora.nf4_checkpoint``), the merge pipeline (``minilora.merge``).
"""
import json
import os
from dataclasses import dataclass, field

import numpy as np

from minilora.adapter_config import check_adapter_config
from minilora.errors import InputError
from minilora.safetensors_io import SafetensorsReader
from minilora.safetensors_write import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Files of a model folder that a merge copies unchanged (config.json is copied too, see merge).
EXTRA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja", ".md", ".py")  # .py: trust_remote_code
EXTRA_NAMES = ("LICENSE", "NOTICE", "COPYING")  # the licence terms travel with the weights
# (Subfolders are not copied: e.g. Meta's original/ holds the unmerged weights in another format.)
LORA_PARTS = {  # adapter key suffix -> role
    "lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "bias",
    "lora_embedding_A": "A", "lora_embedding_B": "B", "lora_magnitude_vector": "magnitude",
}


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON ({e})", path) from None


def _check_shard_name(index_path, name):
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise InputError(f"shard name {name!r} is not a plain file name inside the checkpoint folder",
                         index_path)
    if os.sep in name or "/" in name or "\\" in name or ".." in name:
        raise InputError(f"shard name {name!r} points outside the checkpoint folder", index_path)


class Checkpoint:
    """A model checkpoint: a ``.safetensors`` file, or a folder holding ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``. Tensors are read lazily, one at a time."""

    def __init__(self, path):
        self.path = os.path.abspath(str(path))
        self.index_metadata = None
        if os.path.isfile(self.path):
            self.folder, self.index = None, None
            shard_files = [self.path]
        elif os.path.isdir(self.path):
            self.folder = self.path
            shard_files, self.index = self._find_shards()
        else:
            raise InputError("no such file or folder", self.path)
        self.readers = {}
        self.shard_of = {}
        try:
            for shard in shard_files:
                reader = SafetensorsReader(shard)
                self.readers[os.path.basename(shard)] = reader
                for name in reader.keys():
                    if name in self.shard_of:
                        raise InputError(f"tensor also appears in {self.shard_of[name]}", shard, name)
                    self.shard_of[name] = os.path.basename(shard)
            self._check_index()
        except BaseException:
            self.close()
            raise
        self.config = self._read_config()

    def _find_shards(self):
        index = os.path.join(self.folder, INDEX_NAME)
        if os.path.isfile(index):
            content = read_json(index)
            if not isinstance(content, dict):
                raise InputError("index is not a JSON object", index)
            weight_map = content.get("weight_map")
            self.index_metadata = content.get("metadata") if isinstance(content.get("metadata"), dict) else {}
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError("index has no weight_map", index)
            names = []
            for shard in weight_map.values():
                _check_shard_name(index, shard)
                if shard not in names:
                    names.append(shard)
            missing = [n for n in names if not os.path.isfile(os.path.join(self.folder, n))]
            if missing:
                raise InputError(f"shard {missing[0]} named by the index is missing", index)
            return [os.path.join(self.folder, n) for n in names], weight_map
        single = os.path.join(self.folder, SINGLE_NAME)
        if os.path.isfile(single):
            return [single], None
        found = sorted(f for f in os.listdir(self.folder) if f.endswith(".safetensors"))
        if len(found) == 1 and found[0] != ADAPTER_WEIGHTS:
            return [os.path.join(self.folder, found[0])], None
        raise InputError(f"no {SINGLE_NAME} or {INDEX_NAME} in this folder", self.folder)

    def _check_index(self):
        if self.index is None:
            return
        for name, shard in self.index.items():
            if self.shard_of.get(name) != shard:
                where = self.shard_of.get(name, "no shard")
                raise InputError(f"the index puts this tensor in {shard} but it is in {where}",
                                 os.path.join(self.folder, INDEX_NAME), name)

    def _read_config(self):
        folder = self.folder or os.path.dirname(self.path)
        path = os.path.join(folder, "config.json")
        return read_json(path) if os.path.isfile(path) else None

    def keys(self):
        return list(self.shard_of)

    def __contains__(self, name):
        return name in self.shard_of

    def reader(self, name):
        if name not in self.shard_of:
            raise InputError("no such tensor in the checkpoint", self.path, name)
        return self.readers[self.shard_of[name]]

    def info(self, name):
        return self.reader(name).info(name)

    def get(self, name):
        return self.reader(name).get(name)

    def extra_files(self):
        """Non-weight files of a model folder (config, tokenizer, generation config) to carry along."""
        if self.folder is None:
            return []
        return sorted(f for f in os.listdir(self.folder) if (f.endswith(EXTRA_SUFFIXES) or f in EXTRA_NAMES)
                      and f != INDEX_NAME and os.path.isfile(os.path.join(self.folder, f)))

    def close(self):
        for reader in self.readers.values():
            reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class LoraModule:
    """The tensors of one adapted module: A (R, K), B (N, R), optional DoRA magnitude and lora bias."""
    name: str
    kind: str = "linear"          # "linear" or "embedding"
    A: object = None
    B: object = None
    magnitude: object = None
    bias: object = None


@dataclass
class Adapter:
    """A PEFT LoRA adapter: its config and its modules (all small enough to hold in memory)."""
    path: str
    config: dict
    modules: dict = field(default_factory=dict)     # module name -> LoraModule
    full_tensors: dict = field(default_factory=dict)  # base key -> array that replaces the base tensor
    saved_base: set = field(default_factory=set)    # keys of full_tensors that are copies of the base
    # (PEFT saves an adapted embedding's base weights beside its LoRA); the others are modules_to_save

    @property
    def r(self):
        return self.config.get("r", 8)

    @property
    def alpha(self):
        return self.config.get("lora_alpha", 8)


def _adapter_paths(path):
    path = os.path.abspath(str(path))
    if os.path.isdir(path):
        return os.path.join(path, ADAPTER_WEIGHTS), os.path.join(path, ADAPTER_CONFIG)
    if os.path.isfile(path):
        return path, os.path.join(os.path.dirname(path), ADAPTER_CONFIG)
    raise InputError("no such adapter file or folder", path)


def _module_key(key):
    """``base_model.model.<module>.<part>`` → (module, role, is_embedding), or (base key, None, saved_base)
    for a full tensor."""
    stripped = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    # Full tensors: modules_to_save, and the base weights PEFT saves beside an adapted embedding
    # (save_embedding_layers) under "<module>.base_layer.weight"; both replace the base tensor.
    saved_base = ".base_layer." in stripped
    stripped = stripped.replace(".modules_to_save.default.", ".").replace(".base_layer.", ".")
    for part, role in LORA_PARTS.items():
        head, _, tail = part.partition(".")
        for infix in ("", ".default"):
            suffix = f".{head}{infix}" + (f".{tail}" if tail else "")
            if stripped.endswith(suffix):
                return stripped[: -len(suffix)], role, head.startswith("lora_embedding")
    return stripped, None, saved_base


def load_adapter(path):
    """Read a PEFT adapter folder, or a bare adapter ``.safetensors`` with its config beside it."""
    weights, config_path = _adapter_paths(path)
    if not os.path.isfile(config_path):
        raise InputError(f"no {ADAPTER_CONFIG} next to the adapter weights", config_path)
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise InputError("adapter config is not a JSON object", config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"peft_type {config.get('peft_type')!r} is not LORA", config_path)
    check_adapter_config(config, config_path)
    if not os.path.isfile(weights):
        raise InputError("adapter weights are missing", weights)
    adapter = Adapter(path=weights, config=config)
    with SafetensorsReader(weights) as f:
        for key in f.keys():
            module, role, is_embedding = _module_key(key)
            if role is not None and ".base_layer." in key:
                raise InputError(f"LoRA on several parameters of one module ({key.split('.base_layer.')[0]}; PEFT "
                                 f"target_parameters, e.g. MoE experts) is not supported", weights, key)
            if role is None:
                adapter.full_tensors[module] = f.get(key)
                if is_embedding:  # (for a full tensor: a saved copy of the base weights)
                    adapter.saved_base.add(module)
                continue
            m = adapter.modules.setdefault(module, LoraModule(module))
            if is_embedding:
                m.kind = "embedding"
            setattr(m, role, f.get(key))
    for m in adapter.modules.values():
        if m.A is None or m.B is None:
            raise InputError("module has only one of lora_A / lora_B", weights, m.name)
        if m.A.ndim > 2 or m.B.ndim > 2:
            raise InputError(f"lora_A {m.A.shape} / lora_B {m.B.shape} are convolution kernels: LoRA on Conv layers "
                             f"is not supported", weights, m.name)
        if m.A.ndim != 2 or m.B.ndim != 2 or m.A.shape[0] != m.B.shape[1]:
            raise InputError(f"lora_A {m.A.shape} and lora_B {m.B.shape} do not share a rank",
                             weights, m.name)
    if not adapter.modules:
        raise InputError("adapter holds no LoRA tensors", weights)
    dora = bool(config.get("use_dora", False))
    for m in adapter.modules.values():  # PEFT merges by the flag: a missing or extra magnitude is a broken adapter
        if dora and m.magnitude is None:
            raise InputError("use_dora is true but the module has no lora_magnitude_vector", weights, m.name)
        if not dora and m.magnitude is not None:
            raise InputError("the module has a lora_magnitude_vector (DoRA) but use_dora is false in the config",
                             weights, m.name)
    return adapter


def adapter_key(module, role, kind="linear"):
    """The PEFT file key of one adapter tensor (inverse of the reading rule)."""
    part = {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias",
            "magnitude": "lora_magnitude_vector"}[role]
    if kind == "embedding" and role in ("A", "B"):
        part = f"lora_embedding_{role}"
    return f"{PEFT_PREFIX}{module}.{part}"


def save_adapter(folder, config, modules, full_tensors=None):
    """Write a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained`` loads. ``modules`` is an iterable of ``LoraModule``."""
    os.makedirs(folder, exist_ok=True)
    tensors = {}
    for m in modules:
        for role in ("A", "B", "bias", "magnitude"):
            value = getattr(m, role)
            if value is not None:
                tensors[adapter_key(m.name, role, m.kind)] = value
    for key, value in (full_tensors or {}).items():
        tensors[PEFT_PREFIX + key] = value
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_json(os.path.join(folder, ADAPTER_CONFIG), config)


def write_json(path, obj):
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    tmp = f"{path}.partial"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def prefix_renames(names, disk_modules):
    """``{adapter prefix: checkpoint prefix}`` that maps every name in ``names`` missing from ``disk_modules``
    onto one that is there, or ``{}`` if some missing name has no single such mapping.

    transformers 5 renames some checkpoints' keys when it loads them and writes them back under the old
    names, while PEFT names adapter keys after the loaded modules: a LLaVA-family adapter says
    ``model.language_model.layers.0…`` where the file has ``language_model.model.layers.0…``. For each
    missing name the shortest prefix ``P`` (whole dotted components) is taken for which exactly one ``Q``
    makes ``Q + rest`` exist *for every missing name that starts with P*; where several do (a vision tower
    with the same layer names), only a ``Q`` made of P's own components (plus ``model``) is kept. A rewrite
    keeps P's numbers (``layers.1.`` never becomes ``layers.0.``) and never sends two names to one. Anything
    else (still two candidates, a name no rewrite reaches) leaves the names alone, and the caller reports
    the missing module."""
    disk = set(disk_modules)
    missing = [n for n in names if n not in disk]
    if not missing:
        return {}
    by_rest = {}  # "rest" suffix (whole components) -> prefixes under which it exists on disk
    for module in disk:
        parts = module.split(".")
        for i in range(len(parts)):
            by_rest.setdefault(".".join(parts[i:]), set()).add(".".join(parts[:i]) + "." if i else "")
    renames = {}
    for name in missing:
        if any(name.startswith(p) for p in renames):
            continue
        parts, found = name.split("."), None
        for i in range(len(parts)):
            prefix = ".".join(parts[:i]) + "." if i else ""
            sharing = [n for n in missing if n.startswith(prefix)]
            valid = [q for q in by_rest.get(".".join(parts[i:]), ())
                     if q != prefix and _numbers(q) == _numbers(prefix)
                     and all(q + n[len(prefix):] in disk for n in sharing)]
            if len(valid) > 1:  # a LLaVA text tower and a vision tower both have layers.0.self_attn.q_proj:
                # keep a rewrite that only reorders, drops or adds "model" among the prefix's own components
                own = set(parts[:i]) | {"model"}
                valid = [q for q in valid if set(q.rstrip(".").split(".")) <= own]
            if len(valid) == 1:
                found = (prefix, valid[0])
                break
            if len(valid) > 1:
                return {}  # ambiguous: do not guess
        if found is None:
            return {}
        renames[found[0]] = found[1]
    targets = [_renamed(n, renames) for n in names]
    return renames if len(set(targets)) == len(set(names)) else {}  # never two modules onto one


def _numbers(prefix):
    """The numeric components of a dotted prefix (layer indices), in order: a rename must keep them."""
    return [c for c in prefix.split(".") if c.isdigit()]


def _renamed(name, renames):
    for p, q in renames.items():
        if name.startswith(p):
            return q + name[len(p):]
    return name


def renamed_adapter(adapter, renames):
    """A copy of ``adapter`` with module and full-tensor names rewritten by ``renames`` (``prefix_renames``)."""
    if not renames:
        return adapter

    def rename(name):
        return _renamed(name, renames)
    modules = {}
    for name, m in adapter.modules.items():
        modules[rename(name)] = LoraModule(rename(name), m.kind, m.A, m.B, m.magnitude, m.bias)
    full = {rename(k): v for k, v in adapter.full_tensors.items()}
    return Adapter(adapter.path, adapter.config, modules, full, {rename(k) for k in adapter.saved_base})


def config_with_dtype(config, dtype):
    """A copy of ``config.json``'s dict whose dtype field(s) say ``dtype`` (a float NumPy dtype): transformers
    loads a checkpoint in the dtype its config names, so an output converted with ``--dtype`` must say so.
    ``torch_dtype`` (transformers 4) and ``dtype`` (transformers 5) are both kept up to date where present."""
    name = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}[np.dtype(dtype).name]
    config = dict(config)
    for key in ("torch_dtype", "dtype"):
        if key in config or (key == "torch_dtype" and "dtype" not in config):
            config[key] = name
    return config


def index_metadata(ckpt, total_size):
    """The ``metadata`` of an output index: the input's (e.g. ``total_parameters``) with the new total size."""
    metadata = dict(ckpt.index_metadata or {})
    metadata["total_size"] = int(total_size)
    return metadata
