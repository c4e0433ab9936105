"""Training data: read plain text, JSONL ``text``, Alpaca and chat ``messages`` files, tokenise with
the model's ``tokenizer.json`` (the ``tokenizers`` library), mask the loss, pack into fixed windows.

Each example becomes ``(ids, mask)``: int64 token ids and a bool mask of the tokens that count in the
loss — all of them for text, the response for Alpaca (``### Response:`` onwards), the assistant turns
for chat (rendered with the model's own chat template when it has one). Packing concatenates examples
(each ended by EOS) and cuts windows of ``max_length + 1`` tokens, so every window is one training row
of inputs ``w[:-1]`` and targets ``w[1:]``. A malformed line is an ``InputError`` naming file and line.
NumPy only; no torch here.
"""
import json
import os

import numpy as np

from minilora.errors import InputError

ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
FALLBACK_CHAT = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}" \
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"


def load_tokenizer(model_dir):
    """``(tokenizer, eos_id, chat_template)`` from a model folder's tokenizer.json / tokenizer_config.json."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("training needs the tokenizers library: pip install tokenizers") from None
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise InputError("no tokenizer.json in the model folder (training needs the model's tokenizer)", model_dir)
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the tokenizers library raises plain Exception on a bad file
        raise InputError(f"cannot read tokenizer ({str(e).splitlines()[0]})", path) from None
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    cfg = json.load(open(cfg_path, encoding="utf-8")) if os.path.isfile(cfg_path) else {}
    eos = cfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_id = tok.token_to_id(eos) if eos else None
    if eos_id is None:
        model_cfg = os.path.join(model_dir, "config.json")
        eos_id = json.load(open(model_cfg)).get("eos_token_id") if os.path.isfile(model_cfg) else None
        eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    return tok, eos_id, cfg.get("chat_template")


def read_examples(path):
    """A list of dicts: ``{"text"}``, ``{"instruction", "input", "output"}`` or ``{"messages"}``."""
    if not os.path.isfile(path):
        raise InputError("no such data file", path)
    with open(path, encoding="utf-8") as f:
        if not path.endswith((".jsonl", ".json")):
            text = f.read()
            if not text.strip():
                raise InputError("data file is empty", path)
            return [{"text": t} for t in text.split("\n\n") if t.strip()]
        out = []
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"line {n}: not valid JSON ({e.msg})", path) from None
            out.append(_check_example(ex, path, n))
    if not out:
        raise InputError("data file has no examples", path)
    return out


def _check_example(ex, path, n):
    if not isinstance(ex, dict):
        raise InputError(f"line {n}: expected a JSON object", path)
    if isinstance(ex.get("text"), str):
        return {"text": ex["text"]}
    if isinstance(ex.get("instruction"), str) and isinstance(ex.get("output"), str):
        return {"instruction": ex["instruction"], "input": str(ex.get("input") or ""), "output": ex["output"]}
    msgs = ex.get("messages")
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in msgs):
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputError(f"line {n}: a chat example needs at least one assistant turn", path)
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    raise InputError(f"line {n}: expected 'text', 'instruction'+'output', or 'messages' "
                     f"[{{role, content}}, ...]; got keys {sorted(ex)}", path)


def _encode_spans(tok, text, spans):
    """Token ids of ``text`` and the mask of tokens whose characters fall inside ``spans``."""
    enc = tok.encode(text, add_special_tokens=False)
    ids = np.array(enc.ids, dtype=np.int64)  # (T,)
    mask = np.zeros(len(ids), dtype=bool)  # (T,)
    for i, (start, end) in enumerate(enc.offsets):
        mask[i] = any(s <= start and end <= e and end > start for s, e in spans)
    return ids, mask


def _render_chat(template, messages, add_generation_prompt):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="", eos_token="")


def tokenize_example(ex, tok, eos_id, chat_template=None):
    """``(ids, mask)`` of one example, EOS appended (and counted in the loss)."""
    if "text" in ex:
        ids, mask = _encode_spans(tok, ex["text"], [(0, len(ex["text"]))])
    elif "instruction" in ex:
        prompt = ALPACA.format(
            ctx=", paired with an input that provides further context" if ex["input"] else "",
            instruction=ex["instruction"], input=f"### Input:\n{ex['input']}\n\n" if ex["input"] else "")
        text = prompt + ex["output"]
        ids, mask = _encode_spans(tok, text, [(len(prompt), len(text))])
    else:
        template = chat_template or FALLBACK_CHAT
        spans, msgs = [], ex["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":  # the assistant turn is what the prefix does not contain
                before = _render_chat(template, msgs[:i], True)
                after = _render_chat(template, msgs[: i + 1], False)
                spans.append((len(before), len(after)))
        text = _render_chat(template, msgs, False)
        ids, mask = _encode_spans(tok, text, spans)
    if eos_id is not None:
        ids, mask = np.append(ids, eos_id), np.append(mask, True)  # (T+1,)
    return ids, mask


def pack(examples, max_length):
    """Concatenate ``(ids, mask)`` pairs and cut rows of ``max_length + 1`` tokens: ``(R, L+1)`` ids
    and the loss mask of the targets ``(R, L)``. The last partial row is padded with masked tokens."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = np.concatenate([e[0] for e in examples])  # (T,)
    mask = np.concatenate([e[1] for e in examples])  # (T,)
    if not mask.any():
        raise ValueError("no token of the data counts in the loss")
    rows = -(-(len(ids) - 1) // max_length)
    total = rows * max_length + 1
    ids = np.pad(ids, (0, total - len(ids)))  # (R*L+1,)
    mask = np.pad(mask, (0, total - len(mask)))  # (R*L+1,)
    starts = np.arange(rows) * max_length  # (R,)
    idx = starts[:, None] + np.arange(max_length + 1)  # (R, L+1)
    return ids[idx], mask[idx][:, 1:]  # (R, L+1), (R, L)
