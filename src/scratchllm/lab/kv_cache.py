"""Claim 8: with a KV cache, decoding one token costs about the same at any context length; without
it, every step recomputes the whole sequence, so a step's cost grows with the context.

Measures: the package's GPT (GPT-2 small's width, 4 blocks, random weights), batch 1: the time of one
decode step at context lengths from 64 to 1024 tokens, with the Engine's KVCache (the prompt cached,
one new token fed) and without (the whole sequence fed again, as the book's first generate loop does).
Best of a few runs each.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from scratchllm.lab.core import Result
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.kv_cache import KVCache

NAME = "kv-cache"
CLAIM = "A KV cache makes each decode step cost about the same at any context length; without it the cost grows."


def best(fn, repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


@torch.inference_mode()
def step_times(model: GPT, T: int, repeats: int) -> tuple[float, float]:
    """(seconds of one cached decode step after a T-token prompt, seconds of one uncached step at T)."""
    idx = torch.randint(0, model.config.vocab_size, (1, T))
    nxt = idx[:, -1:]

    def cached():
        cache = KVCache(model.config, 1, T + 1)
        model(idx, kv_cache=cache)  # the prompt, once (not timed below)
        return cache

    def one_cached_step(cache=None):
        cache.pos = T  # rewind to just after the prompt: every timed step feeds position T
        model(nxt, kv_cache=cache)

    cache = cached()
    with_cache = best(lambda: one_cached_step(cache), repeats)
    without = best(lambda: model(torch.cat([idx, nxt], dim=1)), repeats)
    return with_cache, without


def run(quick: bool, out: Path) -> Result:
    lengths = [64, 256, 512] if quick else [64, 128, 256, 512, 1024]
    repeats = 3 if quick else 10
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=1025, vocab_size=50304, n_layer=4, n_head=12, n_embd=768)).eval()
    rows = []
    for T in lengths:
        c, u = step_times(model, T, repeats)
        rows.append({"context": T, "cached ms/token": c * 1e3, "uncached ms/token": u * 1e3, "speed-up": u / c})
    grow_c = rows[-1]["cached ms/token"] / rows[0]["cached ms/token"]
    grow_u = rows[-1]["uncached ms/token"] / rows[0]["uncached ms/token"]
    verdict = "holds" if grow_u > 2 * grow_c else "does not hold here"
    why = (f"From {lengths[0]} to {lengths[-1]} tokens of context a cached step's time grows {grow_c:.2f}x (it still "
           f"attends over every cached key) and an uncached step's {grow_u:.1f}x; at {lengths[-1]} tokens the cache "
           f"makes a step {rows[-1]['speed-up']:.0f}x faster.")

    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(lengths, [r["cached ms/token"] for r in rows], "o-", label="KV cache")
        ax.plot(lengths, [r["uncached ms/token"] for r in rows], "o-", label="no cache (recompute)")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.set_yscale("log")
        ax.legend()

    return Result(NAME, CLAIM, {"model": "GPT 4 blocks x 768 (12 heads), vocab 50304, random weights, fp32",
                                "lengths": lengths, "repeats": repeats, "batch": 1}, rows, verdict, why, plot)
