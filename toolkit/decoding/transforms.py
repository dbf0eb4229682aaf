"""Pure logit transforms, written in the style of gpt-fast's generate.py.

Each takes a float tensor of logits shaped [..., vocab] and returns a new one; a filtered-out
token gets -inf, so softmax gives it probability exactly 0. Applied in the order
`prepare_logits` uses (the same order as transformers' processors): repetition penalty,
temperature, top-k, top-p, min-p. Every filter keeps at least the most likely token.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: positive logits are divided by `penalty`, negative
    ones multiplied (so both move down). `seen` holds token ids, [n] or [rows, n] (CTRL paper,
    Keskar et al. 2019)."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    out = logits.clone()
    idx = seen.long()
    if idx.dim() < logits.dim():  # one history shared by every row
        idx = idx.expand(*logits.shape[:-1], idx.shape[-1])
    picked = out.gather(-1, idx)
    out.scatter_(-1, idx, torch.where(picked < 0, picked * penalty, picked / penalty))
    return out


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Divide by the temperature: t < 1 sharpens the distribution, t > 1 flattens it."""
    if t <= 0:
        raise ValueError("temperature must be > 0 (temperature 0 is greedy: take the argmax)")
    return logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept too); k = 0 keeps all."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    pivot = torch.topk(logits, k).values[..., -1:]
    return logits.masked_fill(logits < pivot, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability mass reaches p.

    A token is dropped when the tokens less likely than it, itself included, hold at most 1 - p of
    the mass, so the token that crosses p is kept and the top token always is. Written as
    transformers' TopPLogitsWarper computes it (ascending sort, cumulative sum): among tokens tied at
    the cut, which ones stay depends on the sort, and this keeps the same ones."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    mass_up_to = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = mass_up_to <= 1 - p
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop tokens whose probability is below p x the top token's probability (Nguyen et al.
    2024): the cut adapts, strict when the model is confident and loose when it is not."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def prepare_logits(logits: torch.Tensor, seen: torch.Tensor, *, temperature_: float = 1.0, top_k_: int = 0,
                   top_p_: float = 1.0, min_p_: float = 0.0, repetition_penalty_: float = 1.0) -> torch.Tensor:
    """All sampling transforms in their standard order."""
    logits = repetition_penalty(logits, seen, repetition_penalty_)
    logits = temperature(logits, temperature_)
    logits = top_k(logits, top_k_)
    logits = top_p(logits, top_p_)
    return min_p(logits, min_p_)


def probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 (a -inf logit becomes probability 0)."""
    return torch.softmax(logits.float(), dim=-1)


def sample(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token per row from `probabilities` with an explicit generator.

    argmax(p / E) with E ~ Exp(1) is an exact draw from p (the exponential race, as gpt-fast
    does), and it needs no cumulative sum; same generator state -> same token."""
    noise = torch.empty_like(probabilities).exponential_(1.0, generator=generator)
    return torch.argmax(probabilities / noise, dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token per row."""
    return torch.argmax(logits, dim=-1)
