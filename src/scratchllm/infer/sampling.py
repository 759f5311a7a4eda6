"""Sampling: turn the last position's logits into the next token id.

What it does: small pure functions on `(B, V)` logits, applied in this order by `sample`:
repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw (or argmax when temperature is 0).
Filters set removed logits to -inf, so the survivors keep their relative probabilities. Draws use an
explicit `torch.Generator`, so a seed reproduces the samples exactly.
What it does not do: run the model or know about tokens as text (see engine.py and detok.py).

    >>> params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95)
    >>> gen = make_generator(seed=0)
    >>> next_ids = sample(logits, params, gen)          # logits (B, V) -> ids (B,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from scratchllm.common import ScratchError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax); < 1 sharpens, > 1 flattens the distribution
    top_k: int | None = None  # keep only the k most likely tokens (None or 0 = off)
    top_p: float | None = None  # keep the smallest set whose probability reaches top_p (None or 1 = off)
    min_p: float | None = None  # keep tokens with prob >= min_p * (top token's prob) (None or 0 = off)
    repetition_penalty: float | None = None  # > 1 discourages tokens already seen (CTRL), None or 1 = off

    def __post_init__(self):
        def bad(field, value, want):
            raise ScratchError(f"sampling parameter {field}={value!r} is out of range: {want}")

        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "use a number >= 0 (0 = greedy)")
        k = self.top_k
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
            bad("top_k", k, "use an integer >= 0 (0 or None = off)")
        p = self.top_p
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            bad("top_p", p, "use a number in (0, 1] (1 or None = off)")
        m = self.min_p
        if m is not None and not (isinstance(m, (int, float)) and 0 <= m <= 1):
            bad("min_p", m, "use a number in [0, 1] (0 or None = off)")
        r = self.repetition_penalty
        if r is not None and not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            bad("repetition_penalty", r, "use a number > 0 (1 or None = off; > 1 penalises repeats)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(seed: int | None = None, device="cpu") -> torch.Generator:
    """A torch.Generator on `device`, seeded with `seed` (None = a fresh random seed)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: for tokens already seen, divide a positive logit by `penalty` and
    multiply a negative one by it (both lower the token's probability when penalty > 1).

    logits (B, V) float, seen (B, V) bool.
    >>> apply_repetition_penalty(torch.tensor([[2.0, -1.0, 3.0]]), torch.tensor([[True, True, False]]), 2.0)
    tensor([[ 1., -2.,  3.]])
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), the rest become -inf.

    >>> top_k_filter(torch.tensor([[1.0, 3.0, 2.0, 0.0]]), 2)
    tensor([[-inf, 3., 2., -inf]])
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to >= p.

    A token is dropped when the tokens ranked above it already reach p; the top token is always kept.
    >>> top_p_filter(torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None], 0.7).exp()
    tensor([[0.5000, 0.3000, 0.0000, 0.0000]])
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_above = torch.cumsum(probs, dim=-1) - probs  # (B, V) probability of the tokens ranked higher
    drop_sorted = mass_above >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times the most likely token's probability.

    In log space: logit >= max_logit + log(min_p), so no softmax is needed.
    >>> min_p_filter(torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None], 0.3).exp()
    tensor([[0.5000, 0.3000, 0.1500, 0.0000]])
    """
    if min_p <= 0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply every enabled transform of `params` to logits (B, V); returns float32 logits whose softmax
    is the distribution `sample` draws from (temperature 0 is treated as 1 here)."""
    logits = logits.float()
    if params.repetition_penalty not in (None, 1) and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature not in (0, 1):
        logits = logits / params.temperature
    if params.top_k:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p:
        logits = min_p_filter(logits, params.min_p)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): argmax when params.temperature == 0 (after the
    repetition penalty), else one draw per row from the processed distribution."""
    if params.greedy:
        if params.repetition_penalty not in (None, 1) and seen is not None:
            logits = apply_repetition_penalty(logits.float(), seen, params.repetition_penalty)
        return logits.argmax(dim=-1)
    probs = torch.softmax(process_logits(logits, params, seen), dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)
