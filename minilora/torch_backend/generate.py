"""Text generation with a KV cache: greedy (temperature 0) or sampled (temperature, top-k).

The prompt is run once, filling the cache; then each new token costs one forward pass of length 1 that
attends to the cached keys and values. Not here: beam search, top-p, repetition penalties, padded
batches of unequal prompt lengths, tokenisation.
"""
import torch

from minilora.torch_backend.model import KVCache


def sample_next(logits, temperature=0.0, top_k=None, generator=None):
    """The next token of each row of ``logits (B, V)``: argmax if ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest logits. -> (B, 1) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(model, ids, max_new_tokens, temperature=0.0, top_k=None, generator=None, eos_token_id=None):
    """Continue ``ids`` ((T,) or (B, T) int64) by ``max_new_tokens`` tokens -> (B, T + max_new_tokens).

    Rows that produced ``eos_token_id`` are padded with it; generation stops early once every row has.
    ``generator`` (a ``torch.Generator`` on the model's device) makes sampling reproducible.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    device = model.model.embed_tokens.weight.device
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    ids = ids[None] if ids.dim() == 1 else ids  # (B, T)
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"ids must be (T,) or (B, T) with T >= 1, got shape {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config.num_hidden_layers)
        logits = model(ids, cache)[:, -1]  # (B, V)
        out, done = [ids], torch.zeros(ids.shape[0], 1, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, generator)  # (B, 1)
            if eos_token_id is not None:
                token = token.masked_fill(done, eos_token_id)
                done = done | (token == eos_token_id)
            out.append(token)
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            logits = model(token, cache)[:, -1]  # (B, V)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1)  # (B, T + new)
