"""What a checkpoint's tensors are, where the file alone cannot tell: which 2-D weights are GPT-2-style
``Conv1D`` layers, stored ``(in_features, out_features)`` = ``(K, N)`` instead of ``nn.Linear``'s ``(N, K)``.

Transformers 5.x builds ``Conv1D`` (``transformers.pytorch_utils.Conv1D``) only in the model types below,
for the module names listed (checked against the transformers 5.23 sources); every other 2-D layer weight of
its models is ``nn.Linear`` (or an embedding). Other models use these names
for ``nn.Linear`` (``gpt_bigcode``'s ``c_attn`` / ``c_proj`` / ``c_fc`` are Linear), so the model type decides.
"""

CONV1D_MODULES = {  # model_type (config.json) -> leaf module names that are Conv1D
    "gpt2": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "decision_transformer": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "imagegpt": {"c_attn", "q_attn", "c_proj", "c_fc"},
    "openai-gpt": {"c_attn", "c_proj", "c_fc"},
    "clvp": {"c_fc", "c_proj"},
}


def model_type(config):
    """``config.json``'s model_type, or None without a config."""
    return config.get("model_type") if isinstance(config, dict) else None


def knows_layout(config):
    """True if ``is_conv1d`` is authoritative for this model: a model type of transformers itself (a config
    with ``model_type`` and no ``auto_map``); remote code (``auto_map``) may build Conv1D anywhere."""
    return model_type(config) is not None and "auto_map" not in config


def is_conv1d(config, module):
    """True if ``module`` (e.g. ``transformer.h.0.attn.c_proj``) is a Conv1D layer of this model."""
    return module.rsplit(".", 1)[-1] in CONV1D_MODULES.get(model_type(config), ())
