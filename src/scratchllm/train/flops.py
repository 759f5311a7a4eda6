"""FLOP counts and hardware ceilings for throughput reporting (MFU = achieved / peak FLOP/s).

What it does: `gpt_train_flops_per_token(cfg)` counts the matmul FLOPs of one training token (forward +
backward = 3x forward): 6 * (non-embedding matmul params + lm_head) + 12 * n_layer * block_size * n_embd
for attention scores and values (the PaLM appendix B formula). `matmul_peak_flops(device, dtype)`
measures the ceiling by timing large square matmuls (the best of a few runs), so MFU is relative to
what this machine really does, not a datasheet.
What it does not do: count element-wise work (norms, GELU, softmax), which the formula ignores.

    peak = matmul_peak_flops("cpu", torch.bfloat16)
    mfu = tokens_per_s * gpt_train_flops_per_token(cfg) / peak
"""

from __future__ import annotations

import functools
import time

import torch


def gpt_train_flops_per_token(cfg) -> float:
    """6N + 12 L T d, with N the matmul weights (attention, MLP, lm_head) of a GPT ModelConfig."""
    d, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    kv = cfg.kv_heads * cfg.head_dim
    attn = d * (d + 2 * kv) + d * d  # c_attn (q, k, v) + c_proj
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.hidden_dim
    n_matmul = L * (attn + mlp) + d * cfg.vocab_size  # + lm_head
    return 6.0 * n_matmul + 12.0 * L * T * d


@functools.lru_cache(maxsize=8)
def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int | None = None,
                      repeats: int = 3) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul in `dtype` on `device` (2 n^3 FLOPs each);
    n defaults to 1024 on CPU (a few ms per run) and 8192 on GPUs. Cached per process."""
    n = n or (8192 if device.startswith("cuda") else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
