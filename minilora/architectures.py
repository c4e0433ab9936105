"""What a checkpoint's tensors are, where the file alone cannot tell, from transformers 5.23's model code:
which 2-D weights are GPT-2-style ``Conv1D`` layers, stored ``(in_features, out_features)`` = ``(K, N)``
instead of ``nn.Linear``'s ``(N, K)``; which are embeddings, MoE experts or routers, layers kept in float or
built from Linear subclasses (transformers quantises none of them); which output layers are tied to the
input embedding.

Transformers 5.x builds ``Conv1D`` (``transformers.pytorch_utils.Conv1D``) only in the model types below,
for the module names listed (checked against the transformers 5.23 sources); every other 2-D layer weight of
its models is ``nn.Linear`` (or an embedding). Other models use these names
for ``nn.Linear`` (``gpt_bigcode``'s ``c_attn`` / ``c_proj`` / ``c_fc`` are Linear), so the model type decides.
"""
import re

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


# Leaf names of nn.Embedding modules in transformers (T5's relative_attention_bias sits inside the blocks).
EMBEDDINGS = ("embed_tokens", "embed_positions", "word_embeddings", "position_embeddings", "token_type_embeddings",
              "wte", "wpe", "shared", "relative_attention_bias", "global_relative_attention_bias", "embed_in")
EXPERT_RE = re.compile(r"\.experts\.\d+\.")  # one expert's weights in a MoE layer: experts.3.w1, experts.3.up_proj
ROUTERS = ("gate", "router")
# Linear layers that transformers 5.23 never converts to Linear4bit: the model class's _keep_in_fp32_modules
# (matched like llm_int8_skip_modules), by config.json model_type. Entries that name no Linear (norms,
# query_tokens) are left out.
KEEP_FLOAT = {
    **dict.fromkeys(("t5", "mt5", "umt5", "udop", "pop2piano"), ("wo",)),
    "blip-2": ("qformer",),
    **dict.fromkeys(("deepseek_v32", "glm_moe_dsa", "mistral_large4", "axk2"), ("indexer.weights_proj",)),
    "deepseek_v4": ("self_attn.compressor.kv_proj", "self_attn.compressor.gate_proj",
                    "self_attn.compressor.indexer.kv_proj", "self_attn.compressor.indexer.gate_proj",
                    "self_attn.compressor.indexer.scorer.weights_proj"),
}
# Output layers that transformers ties to the input embedding (then absent from the checkpoint) -> the tensor
# that shows the model has that head (None: assume it). transformers skips them by default, but not once
# llm_int8_skip_modules is set.
TIED_OUTPUTS = {"lm_head": None, "cls.predictions.decoder": "cls.predictions.bias",   # BERT-family MLM
                "lm_head.decoder": "lm_head.bias", "generator_lm_head": "generator_lm_head.bias",  # RoBERTa, ELECTRA
                "proj_out": "model.decoder.embed_tokens.weight",                                   # Whisper
                "vocab_projector": "vocab_projector.bias"}                                          # DistilBERT
# Layers built from a subclass of nn.Linear, which transformers 5.23 does not convert (it converts modules of
# type nn.Linear exactly, integrations/bitsandbytes.py): by model_type, the leaf names of such layers.
LINEAR_SUBCLASSES = {"falcon": ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")}


# Input embeddings that transformers ties to the output layer of a language-model head (tie_word_embeddings).
# Output layers that transformers 5 loads under another name (GPT-NeoX's embed_out is lm_head once loaded):
# when the stored one is quantised, the loaded name must not be in llm_int8_skip_modules.
LOADED_AS = {"embed_out": "lm_head"}
TIED_INPUT_EMBEDDINGS = ("embed_tokens", "wte", "shared", "word_embeddings", "embed_in")
LM_HEAD_CLASSES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM", "WithLMHead")
