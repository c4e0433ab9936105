"""Training data: formats, loss masks, packing, and one clear error per malformed input."""
import json
import os

import numpy as np
import pytest

from minilora.data import load_tokenizer, pack, read_examples, tokenize_example
from minilora.errors import InputError

pytest.importorskip("tokenizers")
MODEL = os.path.join(os.path.dirname(__file__), "data", "models", "tiny-llama")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MODEL)


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(path)


def test_formats_and_loss_masks(tmp_path, tok):
    tokenizer, eos, template = tok
    path = _write(tmp_path, "d.jsonl", [
        {"text": "the quick brown fox"},
        {"instruction": "repeat", "input": "abc", "output": "abc abc"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "again"}, {"role": "assistant", "content": "bye"}]},
    ])
    text, alpaca, chat = [tokenize_example(e, tokenizer, eos, template) for e in read_examples(path)]
    assert text[1].all() and text[0][-1] == eos                          # every text token counts
    ids, mask = alpaca
    response = tokenizer.decode(ids[mask][:-1].tolist())
    assert response.replace(" ", "") == "abcabc" and not mask[:-3].all()  # only the response counts
    ids, mask = chat
    assert mask.any() and not mask.all()
    spoken = tokenizer.decode(ids[mask][:-1].tolist()).replace(" ", "")
    assert "hello" in spoken and "bye" in spoken and "again" not in spoken and "hi" not in spoken.replace("hello", "")


def test_plain_text_and_packing(tmp_path, tok):
    tokenizer, eos, _ = tok
    (tmp_path / "t.txt").write_text("first paragraph here\n\nsecond one\n")
    examples = [tokenize_example(e, tokenizer, eos) for e in read_examples(str(tmp_path / "t.txt"))]
    assert len(examples) == 2
    ids, mask = pack(examples * 7, 16)
    total = sum(len(e[0]) for e in examples) * 7
    assert ids.shape[1] == 17 and mask.shape == (ids.shape[0], 16)
    assert ids.shape[0] == -(-(total - 1) // 16)
    flat = np.concatenate([e[0] for e in examples] * 7)
    np.testing.assert_array_equal(ids[0], flat[:17])
    np.testing.assert_array_equal(ids[1, 0], flat[16])                     # windows overlap by one token
    assert not mask[-1, -1] or total - 1 == ids.shape[0] * 16              # the padded tail is masked


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', "{not json"], "line 2: not valid JSON"),
    (['{"prompt": "x"}'], "line 1: expected 'text'"),
    (['{"messages": [{"role": "user", "content": "x"}]}'], "line 1: a chat example needs at least one assistant"),
    (['[1, 2]'], "line 1: expected a JSON object"),
    ([""], "no examples"),
])
def test_malformed_data_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message) as e:
        read_examples(str(path))
    assert str(path) in str(e.value)


def test_missing_tokenizer_and_empty_text(tmp_path):
    with pytest.raises(InputError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(InputError, match="empty"):
        read_examples(str(tmp_path / "e.txt"))
