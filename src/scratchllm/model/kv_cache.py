"""KVCache: preallocated keys and values of every layer, so decoding one token costs one token.

What it does: owns two tensors `(n_layer, B, n_kv_head, max_len, head_dim)` filled left to right,
the number of positions filled (`pos`), and optional per-row left padding for batched prompts of
different lengths. It builds the positions and the attention mask the model needs for the next chunk.
What it does not do: run the model or sample (see gpt.py and infer/engine.py).

    cache = KVCache(model.config, batch_size=2, max_len=64)
    cache.set_left_padding(torch.tensor([0, 3]))   # row 1's prompt is 3 tokens shorter
    logits = model(prompt_ids, kv_cache=cache)     # prefill: (2, T, V), cache.pos == T
    logits = model(next_ids, kv_cache=cache)       # one step: (2, 1, V), cache.pos == T + 1

Left padding: row b's first pad_lens[b] columns hold pad tokens. Keys in those columns are masked
out for every query, and row b's positions count from 0 at its first real token, so a padded row
computes exactly what it would alone. (A pad query attends only to itself, which keeps its softmax
finite; its output is meaningless and is never used.)
"""

from __future__ import annotations

import torch

from scratchllm.common import ScratchError
from scratchllm.model.config import ModelConfig


def padded_causal_mask(key_is_real: torch.Tensor, T: int) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, L), True = may attend, for queries at the last T of L columns:
    causal, and keys where key_is_real (B, L) is 0 are hidden. Every query still sees its own column,
    so a padding query's softmax stays finite (its output is meaningless and must not be used).
    Any padding pattern (left, right or both); KVCache.attn_mask uses it for left-padded caches.

        key_is_real [[0, 1, 1]], T=3 -> [[[[1, 0, 0], [0, 1, 0], [0, 1, 1]]]]
    """
    L = key_is_real.shape[1]
    q_col = torch.arange(L - T, L, device=key_is_real.device)[:, None]  # (T, 1) column of each query
    k_col = torch.arange(L, device=key_is_real.device)[None, :]  # (1, L)
    causal = k_col <= q_col  # (T, L)
    visible = key_is_real.bool()[:, None, :] | (k_col == q_col)[None]  # (B, T, L)
    return (causal[None] & visible)[:, None]  # (B, 1, T, L)


def segment_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask (B, 1, T, T), True = may attend, of packed rows: segments (B, T) holds 0 for
    padding and a segment number (1, 2, ...) for each example's tokens; a query sees the earlier keys of
    its own segment only, and itself (so a padding query's softmax stays finite). A 0/1 mask is one
    segment plus padding: the same visibility of real keys as padded_causal_mask.

        segments [[1, 1, 2, 0]] -> [[[[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]]]
    """
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] != 0)  # (B, T, T)
    return (causal & same | torch.eye(T, dtype=torch.bool, device=segments.device))[:, None]  # (B, 1, T, T)


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device="cpu",
                 dtype: torch.dtype = torch.float32):
        if batch_size <= 0 or max_len <= 0:
            raise ScratchError(f"KVCache: batch_size and max_len must be positive, got {batch_size}, {max_len}")
        self.config = config
        self.batch_size, self.max_len = batch_size, max_len
        shape = (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions (columns) filled so far
        self.pad_lens: torch.Tensor | None = None  # (B,) left-padding per row, or None
        self.min_pad = 0  # smallest pad length: the longest row's position is pos - min_pad

    def reset(self) -> None:
        """Forget everything: the next forward starts at position 0 with no padding."""
        self.pos = 0
        self.pad_lens = None
        self.min_pad = 0

    def set_left_padding(self, pad_lens: torch.Tensor) -> None:
        """Declare that row b's first pad_lens[b] columns are padding (call before the prefill)."""
        pad_lens = torch.as_tensor(pad_lens, dtype=torch.long)
        if pad_lens.shape != (self.batch_size,):
            raise ScratchError(f"KVCache.set_left_padding: expected shape ({self.batch_size},), "
                               f"got {tuple(pad_lens.shape)}")
        if (pad_lens < 0).any() or (pad_lens >= self.max_len).any():
            raise ScratchError(f"KVCache.set_left_padding: pad lengths must be in [0, {self.max_len}), "
                               f"got {pad_lens.tolist()}")
        self.pad_lens = pad_lens.to(self.k.device) if bool(pad_lens.any()) else None
        self.min_pad = int(pad_lens.min())

    # ------------------------------------------------------------------ used by the model
    def positions(self, T: int) -> torch.Tensor:
        """Position ids of the next T tokens: (T,) without padding, else (B, T) counted per row."""
        if self.pos + T > self.max_len:
            raise ScratchError(f"KV cache is full: {self.pos} positions filled + {T} new > max_len "
                               f"{self.max_len} (make the cache larger or generate fewer tokens)")
        pos = torch.arange(self.pos, self.pos + T, device=self.k.device)  # (T,)
        if self.pad_lens is None:
            return pos
        return (pos[None, :] - self.pad_lens[:, None]).clamp(min=0)  # (B, T)

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean mask (B, 1, T, pos+T), True = may attend, for the next T queries; None when plain
        causal attention is exact (no padding and either a fresh cache or a single new token)."""
        if self.pad_lens is None and (self.pos == 0 or T == 1):
            return None
        k_pos = torch.arange(self.pos + T, device=self.k.device)[None, :]  # (1, L)
        if self.pad_lens is None:
            return padded_causal_mask(torch.ones_like(k_pos), T).expand(self.batch_size, -1, -1, -1)
        return padded_causal_mask(k_pos >= self.pad_lens[:, None], T)  # (B, 1, T, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_head, T, head_dim) at columns [pos, pos+T) of `layer`; return the
        filled part (B, n_kv_head, pos+T, head_dim) of that layer's keys and values (views, no copy)."""
        if k.dtype != self.k.dtype:
            if self.k.dtype != torch.float32:  # an fp32 cache may serve bf16 activations (Engine on CPUs)
                raise ScratchError(f"KVCache dtype {self.k.dtype} does not match the model's activations "
                                   f"{k.dtype}: create the cache with dtype={k.dtype} (or float32)")
            k, v = k.float(), v.float()
        if k.shape[0] != self.batch_size:
            raise ScratchError(f"KVCache was made for batch size {self.batch_size}, got a batch of {k.shape[0]}")
        T = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        return self.k[layer, :, :, :self.pos + T], self.v[layer, :, :, :self.pos + T]

    def advance(self, T: int) -> None:
        """Mark T more positions as filled (the model calls this once after all layers)."""
        self.pos += T


class SlotKVCache:
    """Keys and values of up to `slots` independent sequences of different lengths, for continuous
    batching (serve/scheduler.py): sequences join and leave between decode steps.

    Row b of the cache holds one sequence with lens[b] positions filled. The model runs on a window of
    rows: `select(start, count)` before a forward. A prefill runs on fresh rows (lens 0) with one
    prompt per row, right-padded to the longest; a decode step runs on rows 0..n-1 with one new token
    each, written at column lens[b], and a mask hides every column past each row's own length, so a
    row computes exactly what it would alone. The capacity (columns) grows by doubling up to max_len;
    `move(src, dst)` copies a row (to keep the live rows packed at the front when one leaves).
    `dtype` may differ from the model's: keys and values are stored in it and attention runs in it
    (fp32 for a bf16 model on a CPU, where PyTorch's bf16 attention measured 4-5x slower than fp32's
    at decode; docs/serve.md).

        cache = SlotKVCache(model.config, slots=8, max_len=1024)
        cache.select(0, 2); model(prompts, kv_cache=cache)     # 2 prompts (2, T), right-padded
        cache.set_length(0, 5); cache.set_length(1, 9)         # their real lengths
        cache.select(0, 2); logits = model(next_ids[:, None], kv_cache=cache)   # (2, 1, V), lens += 1
    """

    min_pad = 0  # positions are per row; the model reads pos - min_pad as the largest position fed

    def __init__(self, config: ModelConfig, slots: int, max_len: int, device="cpu",
                 dtype: torch.dtype = torch.float32, capacity: int = 256):
        if slots <= 0 or max_len <= 0:
            raise ScratchError(f"SlotKVCache: slots and max_len must be positive, got {slots}, {max_len}")
        self.config, self.slots, self.limit = config, slots, max_len
        self.device, self.dtype = device, dtype
        self.lens = torch.zeros(slots, dtype=torch.long)  # filled positions of each row (on the CPU)
        self.start, self.count = 0, 1
        self._alloc(min(capacity, max_len))

    def _alloc(self, cap: int) -> None:
        cfg = self.config
        shape = (cfg.n_layer, self.slots, cfg.kv_heads, cap, cfg.head_dim)
        k = torch.zeros(shape, device=self.device, dtype=self.dtype)
        v = torch.zeros(shape, device=self.device, dtype=self.dtype)
        if hasattr(self, "k"):
            old = self.k.shape[3]
            k[:, :, :, :old], v[:, :, :, :old] = self.k, self.v
        self.k, self.v = k, v

    @property
    def max_len(self) -> int:
        return self.k.shape[3]  # the current capacity: the model checks the cache's shape against it

    def reserve(self, n: int) -> None:
        """Make room for n columns (doubling the capacity, at most to the max_len given at creation)."""
        if n > self.limit:
            raise ScratchError(f"SlotKVCache: {n} positions asked for, more than max_len {self.limit}")
        cap = self.max_len
        while cap < n:
            cap = min(2 * cap, self.limit)
        if cap > self.max_len:
            self._alloc(cap)

    def select(self, start: int, count: int) -> None:
        """Run the next forward on rows [start, start + count)."""
        if not (0 <= start and count > 0 and start + count <= self.slots):
            raise ScratchError(f"SlotKVCache.select: rows [{start}, {start + count}) outside 0..{self.slots}")
        self.start, self.count = start, count

    def set_length(self, row: int, n: int) -> None:
        """Row `row` holds n real positions (after a right-padded prefill: its prompt's length)."""
        self.lens[row] = n

    def move(self, src: int, dst: int) -> None:
        """Copy row src (its keys, values and length) into row dst."""
        n = int(self.lens[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lens[dst] = n

    # ------------------------------------------------------------------ used by the model
    @property
    def pos(self) -> int:
        return int(self._rows().max())  # the longest selected row

    def _rows(self) -> torch.Tensor:
        return self.lens[self.start:self.start + self.count]

    def positions(self, T: int) -> torch.Tensor:
        """(count, T): row b's next T tokens sit at positions lens[b] .. lens[b] + T - 1. Called once per
        forward, before the layers: it also fixes that forward's key length and whether rows differ."""
        lens = self._rows()
        self._L = int(lens.max()) + T
        self._uniform = bool((lens == lens[0]).all())
        self.reserve(self._L)
        return (lens[:, None] + torch.arange(T)[None, :]).to(self.device)

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """(count, 1, T, L), L = pos + T: the query at t of row b sees columns <= lens[b] + t; None when
        plain attention is exact (rows of one length, and one new token or an empty cache)."""
        lens = self._rows()
        if self._uniform and (T == 1 or int(lens[0]) == 0):
            return None
        q = lens[:, None, None] + torch.arange(T)[None, :, None]  # (count, T, 1)
        return (torch.arange(self._L)[None, None, :] <= q)[:, None].to(self.device)  # (count, 1, T, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (count, n_kv_head, T, head_dim) at each row's columns [lens[b], lens[b] + T);
        return the selected rows' first pos + T columns of `layer`."""
        if k.shape[0] != self.count:
            raise ScratchError(f"SlotKVCache has {self.count} rows selected, got a batch of {k.shape[0]}")
        k, v = k.to(self.dtype), v.to(self.dtype)  # a bf16 model may keep its cache in fp32 (see __init__)
        rows = slice(self.start, self.start + self.count)
        T, L = k.shape[2], self._L
        if self._uniform:  # all rows equally long: one slice write
            n = L - T
            self.k[layer, rows, :, n:L], self.v[layer, rows, :, n:L] = k, v
        else:
            r = torch.arange(self.start, self.start + self.count, device=self.k.device)
            for t in range(T):  # one scatter per new column (T is 1 in a decode step)
                c = (self._rows() + t).to(self.k.device)
                self.k[layer, r, :, c], self.v[layer, r, :, c] = k[:, :, t], v[:, :, t]
        return self.k[layer, rows, :, :L], self.v[layer, rows, :, :L]

    def advance(self, T: int) -> None:
        self.lens[self.start:self.start + self.count] += T
