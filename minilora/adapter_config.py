"""What an ``adapter_config.json`` may say: value types checked, and the LoRA variants whose merge is not
``W + s·B A`` (or DoRA) refused by name, before any tensor is read. (``minilora.checkpoint`` reads the file.)"""
import math
import re

from minilora.errors import InputError


# Config fields of LoRA variants whose merge is not W + s·B A (or DoRA): refused, by name.
UNSUPPORTED_FIELDS = {
    "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "use_qalora": "QA-LoRA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
    "layer_replication": "layer replication", "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# init_lora_weights values that change the base weights when the adapter is created: such an adapter belongs
# to that modified base, and merging it into the original model gives wrong weights.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_adapter_config(config, path):
    """Refuse a config whose values have the wrong type, or that names a LoRA variant minilora cannot merge."""
    def bad(message):
        raise InputError(f"adapter config: {message}", path)

    r = config.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        bad(f"r must be a positive integer, got {r!r}")
    if not _is_number(config.get("lora_alpha", 8)):
        bad(f"lora_alpha must be a number, got {config.get('lora_alpha')!r}")
    for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
        if config.get(name) not in (None, True, False):
            bad(f"{name} must be true or false, got {config.get(name)!r}")
    for name, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            bad(f"{name} must be an object, got {pattern!r}")
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                bad(f"{name} key {key!r} is not a regular expression ({e})")
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) if positive_int \
                else _is_number(value)
            if not ok:
                bad(f"{name}[{key!r}] must be a {'positive integer' if positive_int else 'number'}, got {value!r}")
    for name, what in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            bad(f"{name} is set: {what} adapters are not supported (their merge is not W + s·B A)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        bad(f"init_lora_weights={init!r} changed the base weights when the adapter was created, so the adapter "
            f"only fits that modified base; save it with PEFT's path_initial_model_for_weight_conversion "
            f"to get a plain LoRA adapter of the original model")
    modules_to_save = config.get("modules_to_save")
    if modules_to_save is not None and (not isinstance(modules_to_save, list)
                                        or not all(isinstance(m, str) for m in modules_to_save)):
        bad(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
