"""
Inference for model.py's GPT: a key/value cache, left-padded batches (an attention mask), a prefix
shared by every prompt computed once, and the probability of whole continuations (label words of
several tokens). GPT.generate, GPT.continuation_logprobs and GPT.prefix_cache are these functions, so
a batch generates exactly what its prompts generate one at a time; BatchedDecoder runs many prompts
through them in batches, as generate.py's ModelSampler does.
"""

import torch
import torch.nn.functional as F
from tqdm import tqdm


def _attention_mask(key_mask, T):
    """(B, 1, T, S) bool for the last T of S positions: causal, and never onto padding."""
    S = key_mask.size(1)
    qpos = torch.arange(S - T, S, device=key_mask.device)[:, None]
    kpos = torch.arange(S, device=key_mask.device)[None, :]
    mask = (kpos <= qpos) & key_mask[:, None, :]
    # a padding position has no real key before it; letting it see itself avoids a softmax over
    # nothing (NaN), and its output is never seen by a real position
    return (mask | (kpos == qpos))[:, None]


def _next_logits(model, x, key_mask, padded, past=None):
    """Logits (B, vocab) after the last of x's positions, and the new cache; key_mask covers cache + x."""
    T = x.size(1)
    pos = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, -T:]  # left padding: real tokens count from 0
    mask = _attention_mask(key_mask, T) if padded else None
    h, past = model.hidden_states(x, pos, mask, past, start=T - 1)
    # (vocab, C) @ (C, B), transposed: on CPU 1.7x as fast as F.linear for a batch of 32 rows
    return (model.lm_head.weight @ h[:, -1, :].T).T.float(), past


def _after_token(model, token, key_mask, padded, past):
    """(logits, key mask, cache) once every row has one more token (B, 1): a new token is never padding."""
    key_mask = torch.cat((key_mask, torch.ones_like(token, dtype=torch.bool)), dim=1)
    logits, past = _next_logits(model, token, key_mask, padded, past)
    return logits, key_mask, past


@torch.no_grad()
def prefix_cache(model, ids):
    """
    Keys and values of token ids that begin every prompt (an instruction, few-shot examples), for
    generate and continuation_logprobs: the prefix is computed once instead of once per row.
    """
    idx = torch.as_tensor(ids, dtype=torch.long, device=model.lm_head.weight.device)[None]
    assert 0 < idx.size(1) < model.config.block_size, "a prefix must be shorter than the block size"
    return model.hidden_states(idx, start=idx.size(1) - 1)[1]


def _continue(idx, attention_mask, prefix):
    """(key mask over prefix + idx, cache of every row) for rows of idx that follow prefix."""
    key_mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if prefix is None:
        return key_mask, None
    B, P = idx.size(0), prefix[0][0].size(2)
    key_mask = torch.cat((key_mask.new_ones(B, P), key_mask), dim=1)
    return key_mask, [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix]


@torch.no_grad()
def continuation_logprobs(model, idx, continuations, attention_mask=None, prefix=None):
    """
    (B, K) log-probability of each of K continuations (lists of token ids, such as the label words)
    after each (left-padded) row of idx: the rows once, then each continuation token by token from
    their cache. The rows continue prefix (from prefix_cache) if given.
    """
    key_mask, past = _continue(idx, attention_mask, prefix)
    padded = not bool(key_mask.all())
    logits, past = _next_logits(model, idx, key_mask, padded, past)
    after_rows = logits.log_softmax(dim=-1)
    out = []
    for ids in continuations:
        logprob, cache, mask = after_rows[:, ids[0]], past, key_mask
        for prev, token in zip(ids, ids[1:]):
            logits, mask, cache = _after_token(model, idx.new_full((idx.size(0), 1), prev), mask, padded, cache)
            logprob = logprob + logits.log_softmax(dim=-1)[:, token]
        out.append(logprob)
    return torch.stack(out, dim=1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, attention_mask=None, generator=None,
             prefix=None):
    """
    Continue each row of idx (B, T) by max_new_tokens tokens. Rows may be left-padded: then
    attention_mask (B, T) is 1 on real tokens and 0 on padding. temperature=0 is greedy decoding.
    With prefix (from prefix_cache) the rows continue that prefix, which is not part of idx or
    of what is returned. Prompts longer than block_size - max_new_tokens keep their last tokens.
    """
    keep = model.config.block_size - max_new_tokens - (0 if prefix is None else prefix[0][0].size(2))
    assert keep > 0, "max_new_tokens and the prefix leave no room for a prompt in the block size"
    idx = idx[:, -keep:]
    if attention_mask is not None:
        attention_mask = attention_mask[:, -keep:]
    key_mask, past = _continue(idx, attention_mask, prefix)
    padded = not bool(key_mask.all())  # new tokens are never padding: decided once
    logits, past = _next_logits(model, idx, key_mask, padded, past)
    out = idx
    for i in range(max_new_tokens):
        idx_next = sample(logits, temperature, top_k, generator)
        out = torch.cat((out, idx_next), dim=1)
        if i + 1 < max_new_tokens:
            logits, key_mask, past = _after_token(model, idx_next, key_mask, padded, past)
    return out


def sample(logits, temperature=1.0, top_k=None, generator=None):
    """The next token (B, 1) from logits (B, vocab): the likeliest at temperature 0, else drawn from the top_k."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


def left_pad(prompts, pad_id):
    """(B, T) token ids of prompts (lists of ids) padded on the left, and the (B, T) mask of real tokens."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, T - len(p):] = 1
    return idx, mask


class BatchedDecoder:
    """
    The continuations of many prompts (token id lists) by a model: in batches of similar lengths (little
    padding), left-padded, the prompts' common start computed once; greedy (temperature 0) or sampled from
    the top_k. With answers, [(token ids, text)] of the label words, a continuation is instead the text of
    the likelier answer (score mode).
    """

    def __init__(self, model, enc, ctx, device, max_new_tokens, temperature=0.0, top_k=0, batch_size=32,
                 generator=None, answers=None):
        self.model, self.enc, self.ctx, self.device, self.generator = model, enc, ctx, device, generator
        self.max_new_tokens, self.temperature, self.top_k, self.batch_size = max_new_tokens, temperature, top_k, batch_size
        self.answers = answers

    def generations(self, prompts, progress=False):
        """The continuation of each prompt, in their order; the results do not depend on the batching."""
        prefix = self.shared_prefix(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out, bs = [None] * len(prompts), self.batch_size
        for s in tqdm(range(0, len(order), bs), desc='evaluating', unit='batch', disable=not progress):
            part = order[s:s + bs]
            for i, text in zip(part, self.continuations([prompts[i] for i in part], prefix)):
                out[i] = text
        return out

    def left_pad(self, prompts):
        idx, mask = left_pad(prompts, self.enc.eot_token)
        return idx.to(self.device), mask.to(self.device)

    def continuations(self, prompts, prefix=()):
        """
        Decoded continuation of each prompt, cut at end-of-text. prefix: (ids, cache) of model.prefix_cache,
        for prompts that all begin with those ids and go on past them.
        """
        ids, cache = prefix or ((), None)
        idx, mask = self.left_pad([p[len(ids):] for p in prompts])
        with self.ctx:
            if self.answers:
                logprobs = self.model.continuation_logprobs(idx, [a for a, _ in self.answers], mask, cache)
                return [self.answers[int(i)][1] for i in logprobs.argmax(dim=-1)]
            out = self.model.generate(idx, self.max_new_tokens, self.temperature, self.top_k, mask, self.generator,
                                      cache)
        return [self.decode(row) for row in out[:, -self.max_new_tokens:].tolist()]

    def decode(self, row):
        """Generated token ids as text, up to the first end-of-text."""
        return self.enc.decode(row[:row.index(self.enc.eot_token)] if self.enc.eot_token in row else row)

    def shared_prefix(self, prompts):
        """(ids, cache) of the longest start that every prompt shares and goes on past, or ()."""
        if not prompts:
            return ()
        head, n = prompts[0], min(len(p) for p in prompts) - 1
        for p in prompts:
            n = next((i for i in range(n) if p[i] != head[i]), n)
        if not n:
            return ()
        with self.ctx:
            return head[:n], self.model.prefix_cache(head[:n])
