"""Claim 7: naive attention materialises the (T x T) score matrix, so its time and memory grow as T^2;
`scaled_dot_product_attention` (flash-style kernels) does not keep that matrix.

Measures: one causal self-attention layer of the package (`CausalSelfAttention` with
attention="naive" and "sdpa"), forward pass, batch 1, 4 heads x 64 dims, at sequence lengths from 128
up to 4096: the best of a few wall-clock times, and the peak memory, read as the growth of the
process's peak RSS in a fresh subprocess per (implementation, length) (CPU tensors are not tracked
by torch's allocator statistics).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from scratchllm.lab.core import Result

NAME = "attention"
CLAIM = ("Naive attention's time and memory grow as T^2 with the sequence length; scaled_dot_product_attention's "
         "memory does not (flash attention never stores the T x T scores).")

PROBE = r"""
import json, resource, sys, time, torch
from scratchllm.model import ModelConfig
from scratchllm.model.gpt import CausalSelfAttention
impl, T, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cfg = ModelConfig(block_size=T, vocab_size=256, n_layer=1, n_head=4, n_embd=256, attention=impl)
layer = CausalSelfAttention(cfg, 0).eval()
x = torch.randn(1, T, 256)
with torch.inference_mode():
    layer(x[:, :16])  # warm up the kernels on a short input
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter(); layer(x); best = min(best, time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": best, "peak_mib": (peak - base) / 1024}))
"""


def probe(impl: str, T: int, repeats: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, impl, str(T), str(repeats)], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"attention probe {impl} T={T} failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    """The exponent k of y ~ x^k, a least-squares line through the log-log points."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-3)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run(quick: bool, out: Path) -> Result:
    lengths = [128, 512, 1024, 2048] if quick else [128, 256, 512, 1024, 2048, 4096]
    repeats = 2 if quick else 5
    rows = []
    for T in lengths:
        for impl in ("naive", "sdpa"):
            m = probe(impl, T, repeats)
            rows.append({"T": T, "attention": impl, "ms": m["seconds"] * 1e3, "peak MiB": m["peak_mib"],
                         "scores MiB (4 x T^2 x 4 B)": 4 * T * T * 4 / 2**20})
    series = {impl: [r for r in rows if r["attention"] == impl] for impl in ("naive", "sdpa")}
    k_time = {i: slope(lengths, [r["ms"] for r in s]) for i, s in series.items()}
    k_mem = {i: slope(lengths, [r["peak MiB"] for r in s]) for i, s in series.items()}
    last = {i: s[-1] for i, s in series.items()}
    scores = last["naive"]["scores MiB (4 x T^2 x 4 B)"]
    holds = last["naive"]["peak MiB"] >= scores and last["sdpa"]["peak MiB"] < scores / 2
    verdict = "holds" if holds else "depends"
    why = (f"Over T={lengths[0]}..{lengths[-1]} (log-log fit): naive time grows as T^{k_time['naive']:.1f} and its peak "
           f"memory as T^{k_mem['naive']:.1f}, {last['naive']['peak MiB']:.0f} MiB at T={lengths[-1]} where the scores "
           f"alone are {scores:.0f} MiB; sdpa time as T^{k_time['sdpa']:.1f}, memory as T^{k_mem['sdpa']:.1f} "
           f"({last['sdpa']['peak MiB']:.0f} MiB). Both still do T^2 work; only naive stores the scores.")

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for impl, s in series.items():
            ax1.loglog([r["T"] for r in s], [r["ms"] for r in s], "o-", label=impl)
            ax2.loglog([r["T"] for r in s], [max(r["peak MiB"], 0.1) for r in s], "o-", label=impl)
        ax1.set_xlabel("sequence length T"); ax1.set_ylabel("forward ms"); ax1.legend()  # noqa: E702
        ax2.set_xlabel("sequence length T"); ax2.set_ylabel("peak memory growth (MiB)"); ax2.legend()  # noqa: E702

    return Result(NAME, CLAIM, {"layer": "CausalSelfAttention, 4 heads x 64, batch 1, fp32", "lengths": lengths,
                                "repeats": repeats}, rows, verdict, why, plot)
