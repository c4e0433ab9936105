"""Make tests/data/{models,adapters,expected}: tiny checkpoints with the real Hugging Face layouts,
PEFT adapters for them, and PEFT's merged results, for the checkpoint and CLI tests.

Run from the repository root with torch, transformers, peft and tokenizers installed (development only):

    python tests/data/make_tiny_models.py

Everything is seeded; weights are random (no training). Layout and versions: tests/data/README.md.
"""
import json
import shutil
from pathlib import Path

import peft
import tokenizers
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DATA = Path(__file__).resolve().parent
MODELS, ADAPTERS, EXPECTED = DATA / "models", DATA / "adapters", DATA / "expected"
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2,  # GQA: k_proj / v_proj are (16, 32)
             max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
             pad_token_id=0, rms_norm_eps=1e-6)
BERT = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)

# adapter name -> (base model folder, LoraConfig kwargs)
ADAPTER_CASES = {
    "llama-lora": ("tiny-llama", dict(r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)),
    "llama-rslora": ("tiny-llama", dict(r=8, lora_alpha=16, use_rslora=True, target_modules=LLAMA_LINEAR)),
    "llama-dora": ("tiny-llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj",
                                                                                        "down_proj"])),
    "llama-patterns": ("tiny-llama", dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                             "o_proj"],
                                          rank_pattern={"layers.1.self_attn.q_proj": 4, "v_proj": 2},
                                          alpha_pattern={"o_proj": 4, "layers.0.self_attn.k_proj": 32})),
    "llama-embed": ("tiny-llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "bert-lora": ("tiny-bert", dict(r=4, lora_alpha=8, target_modules=["query", "value"])),
}

CORPUS = ["the quick brown fox jumps over the lazy dog",
          "low rank adaptation merges a small update into a large weight",
          "a tiny tokenizer for tests of minilora, not for language modelling",
          "0 1 2 3 4 5 6 7 8 9 , . ! ? ' \" ( ) - : ;"] * 4


def fresh(path):
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_tokenizer(path):
    """A ~250-token BPE over a tiny corpus: enough for an end-to-end tokenise -> forward test."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=LLAMA["vocab_size"], show_progress=False,
                                                        special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    assert tok.get_vocab_size() <= LLAMA["vocab_size"]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.save_pretrained(path)


def make_models():
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    llama.save_pretrained(fresh(MODELS / "tiny-llama"))
    save_tokenizer(MODELS / "tiny-llama")
    llama.save_pretrained(fresh(MODELS / "tiny-llama-sharded"), max_shard_size="40KB")
    llama.to(torch.bfloat16).save_pretrained(fresh(MODELS / "tiny-llama-bf16"))
    torch.manual_seed(1)
    BertModel(BertConfig(**BERT), add_pooling_layer=False).eval().save_pretrained(fresh(MODELS / "tiny-bert"))
    shards = sorted(p.name for p in (MODELS / "tiny-llama-sharded").glob("*.safetensors"))
    assert len(shards) >= 3, shards


def load_base(folder, dtype=torch.float32):
    if "llama" in folder:
        return LlamaForCausalLM.from_pretrained(MODELS / folder, dtype=dtype).eval()
    return BertModel.from_pretrained(MODELS / folder, dtype=dtype, add_pooling_layer=False).eval()


def make_adapters():
    for seed, (name, (base_folder, cfg)) in enumerate(ADAPTER_CASES.items(), start=10):
        torch.manual_seed(seed)
        model = get_peft_model(load_base(base_folder), LoraConfig(init_lora_weights=False, **cfg))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # B non-zero but of a size comparable to the 0.02-std base weights
            for pname, p in model.named_parameters():
                if "lora_B" in pname or "lora_embedding_B" in pname:
                    p.mul_(0.1 if "lora_B" in pname else 0.005)
                elif "lora_magnitude_vector" in pname:  # as if trained: m / n != 1
                    p.mul_(0.8 + 0.4 * torch.rand(p.shape, generator=g))
        model.peft_config["default"].base_model_name_or_path = f"tests/data/models/{base_folder}"
        model.save_pretrained(fresh(ADAPTERS / name))
        (ADAPTERS / name / "README.md").unlink()  # PEFT's model-card template, not data
        cfg_path = ADAPTERS / name / "adapter_config.json"  # PEFT writes target_modules from a set
        saved = json.loads(cfg_path.read_text())
        saved["target_modules"] = sorted(saved["target_modules"])
        cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


# (adapter, base folder, base dtype, expected folder): PEFT's merge_and_unload of each
MERGES = [(name, base, torch.float32, f"{name}-merged") for name, (base, _) in ADAPTER_CASES.items()]
MERGES.append(("llama-lora", "tiny-llama-bf16", torch.bfloat16, "llama-lora-bf16-merged"))


def make_expected():
    for adapter, base_folder, dtype, out in MERGES:
        model = PeftModel.from_pretrained(load_base(base_folder, dtype), ADAPTERS / adapter)
        merged = model.merge_and_unload()
        merged.save_pretrained(fresh(EXPECTED / out))
        for extra in ("generation_config.json",):  # keep expected/ to the weights and the config
            (EXPECTED / out / extra).unlink(missing_ok=True)


def main():
    torch.set_num_threads(1)  # one deterministic accumulation order
    make_models()
    make_adapters()
    make_expected()
    versions = {"peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__}
    merges = [{"adapter": f"adapters/{a}", "base": f"models/{b}", "expected": f"expected/{e}", "dtype": str(d)[6:]}
              for a, b, d, e in MERGES]
    manifest = {"generated_by": "tests/data/make_tiny_models.py", "versions": versions, "merges": merges}
    (DATA / "fixtures.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print("wrote", MODELS, ADAPTERS, EXPECTED, versions)


if __name__ == "__main__":
    main()
