"""Variable-length examples -> padded batches: padding with a mask, and a resumable shuffled sampler.

What it does: `pad_rows` pads token-id rows to the longest one on the tokenizer's padding side and
returns the attention mask (1 = token, 0 = padding). `ExampleBatches` deals the indices of N examples
into batches: a new order each epoch (a generator seeded by (seed, epoch)), the last incomplete global
batch dropped (the book's `DataLoader(shuffle=True, drop_last=True)`), rank r of W taking items
r, r+W, ... of each global batch of `batch_size * W`; a `collate(indices)` function turns the chosen
indices into a batch. `state_dict()` is (epoch, position) plus checks, so a resumed run continues with
the very next batch. `in_order(n, batch_size, collate)` gives every example once, in order, for evaluation.
For language-model fine-tuning (SFT): `lm_pair(ids, mask, max_length)` turns a rendered example and its
loss mask into (inputs, targets) shifted by one, IGNORE_INDEX on every target the mask excludes,
truncated to max_length (saying whether a trained target was cut, or None when none is left);
`collate_lm(pairs, pad_id)` pads them into a batch (targets padded with IGNORE_INDEX), and with
`packed=True` each row concatenates several examples, numbered 1, 2, ... in its attention mask so that
attention never crosses from one into another (GPT.hidden_states); `pack(lengths, max_length)` groups
examples into such rows (first-fit by decreasing length).
What it does not do: read files or tokenize (data/labelled.py, data/instructions.py, the stages do).

    >>> pad_rows([[5, 6, 7], [8]], pad_id=0)
    (tensor([[5, 6, 7], [8, 0, 0]]), tensor([[1, 1, 1], [1, 0, 0]]))
    >>> batches = ExampleBatches(1045, 8, collate=lambda ix: [rows[i] for i in ix], seed=1)
    >>> batches.batches_per_epoch, batches.next_batch()          # 130, the first shuffled batch
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from scratchllm.common import IGNORE_INDEX, ScratchError

STATE_VERSION = 1


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(idx, attention_mask), both (B, T) int64 with T the longest row; `side` is "right" or "left"."""
    if side not in ("left", "right"):
        raise ScratchError(f"padding side {side!r}: expected 'left' or 'right'")
    T = max((len(r) for r in rows), default=0)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if not r:
            continue
        cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        idx[i, cols] = torch.as_tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return idx, mask


class ExampleBatches:
    def __init__(self, n: int, batch_size: int, collate: Callable[[list[int]], object], seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if n < batch_size * world_size:
            raise ScratchError(f"{n} training examples are fewer than one global batch (batch size {batch_size} x "
                               f"{world_size} process(es)): use more data or a smaller --batch-size")
        self.n, self.batch_size, self.collate = n, batch_size, collate
        self.seed, self.rank, self.world = seed, rank, world_size
        self._epoch, self.pos = 0, 0  # the epoch being dealt, batches taken from it
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    @property
    def epoch(self) -> float:
        """Epochs done so far, fractional: 1.0 right after the first epoch's last batch."""
        return self._epoch + self.pos / self.batches_per_epoch

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._order_epoch = torch.randperm(self.n, generator=g).tolist(), epoch
        return self._order

    def next_batch(self):
        if self.pos >= self.batches_per_epoch:
            self._epoch, self.pos = self._epoch + 1, 0
        g = self.batch_size * self.world
        start = self.pos * g
        chosen = self._order_for(self._epoch)[start:start + g][self.rank::self.world]  # this rank's share
        self.pos += 1
        return self.collate(chosen)

    def __iter__(self) -> Iterator:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self._epoch, "pos": self.pos, "n": self.n,
                "batch_size": self.batch_size, "world_size": self.world, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ScratchError(f"cannot resume the example order: state version {state.get('version')!r}, this "
                               f"scratchllm writes {STATE_VERSION}")
        for key in ("n", "batch_size", "world_size", "seed"):
            if state.get(key) != getattr(self, {"world_size": "world"}.get(key, key)):
                raise ScratchError(f"cannot resume the example order: the saved {key} is {state.get(key)!r}, now "
                                   f"{getattr(self, {'world_size': 'world'}.get(key, key))!r} (the data or the "
                                   "settings changed)")
        self._epoch, self.pos = state["epoch"], state["pos"]


def in_order(n: int, batch_size: int, collate: Callable[[list[int]], object]) -> Iterator:
    """Every example once, in order, in batches of `batch_size` (the last one may be smaller)."""
    for start in range(0, n, batch_size):
        yield collate(list(range(start, min(start + batch_size, n))))


# --------------------------------------------------------------------------------------------- LM examples
def lm_pair(ids: Sequence[int], mask: Sequence[int], max_length: int) -> tuple[list[int], list[int], bool] | None:
    """(inputs, targets, cut) of one example: inputs = ids[:-1], targets = ids[1:] with IGNORE_INDEX where
    mask[1:] is 0, both cut to max_length; `cut` says a trained target was cut off. None when no trained
    target is left (nothing to learn from the example).

    >>> lm_pair([5, 6, 7, 8], [0, 0, 1, 1], max_length=8)
    ([5, 6, 7], [-100, 7, 8], False)
    """
    targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    cut = any(t != IGNORE_INDEX for t in targets[max_length:])
    inputs, targets = list(ids[:-1])[:max_length], targets[:max_length]
    if all(t == IGNORE_INDEX for t in targets):
        return None
    return inputs, targets, cut


def pack(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Indices of examples grouped into rows of at most max_length tokens: first-fit, longest first
    (each row's examples in index order)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_length:
            raise ScratchError(f"example {i} has {lengths[i]} tokens, more than the row length {max_length}")
        j = next((j for j, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            rows.append([i])
            room.append(max_length - lengths[i])
        else:
            rows[j].append(i)
            room[j] -= lengths[i]
    return [sorted(r) for r in rows]


def collate_lm(rows: Sequence[Sequence[tuple[list[int], list[int]]]], pad_id: int) -> dict:
    """A batch {"idx", "targets", "tokens"(, "attention_mask")} of rows, each a list of (inputs, targets)
    examples put end to end (one example per row without packing). Rows are right-padded to the longest
    (targets with IGNORE_INDEX); "tokens" counts the real ones. The attention mask numbers each row's
    examples 1, 2, ... (0 = padding); it is left out when no row holds two examples: under plain causal
    attention a right-padded row's real tokens never see its padding (which comes after them) and
    count positions from 0, so the mask would change nothing that is trained on, and a masked
    attention kernel is several times slower on the CPU."""
    flat = [[t for inputs, _ in row for t in inputs] for row in rows]
    idx, real = pad_rows(flat, pad_id, "right")  # (B, T)
    targets = torch.full_like(idx, IGNORE_INDEX)
    segments = torch.zeros_like(idx)
    for b, row in enumerate(rows):
        at = 0
        for k, (inputs, tgt) in enumerate(row):
            targets[b, at:at + len(tgt)] = torch.as_tensor(tgt, dtype=torch.long)
            segments[b, at:at + len(inputs)] = k + 1
            at += len(inputs)
    batch = {"idx": idx, "targets": targets, "tokens": real.sum()}
    if any(len(row) > 1 for row in rows):
        batch["attention_mask"] = segments
    return batch


def collate_pairs(pairs: Sequence[tuple[list[int], list[int], list[int], list[int]]], pad_id: int) -> dict:
    """A batch of preference pairs, each (chosen ids, chosen mask, rejected ids, rejected mask): the B
    chosen rows, then the B rejected rows, right-padded to the longest into "idx" (2B, T) with the
    response mask "mask" (2B, T) (1 on the answer's tokens) and "attention_mask" (2B, T) (1 on real
    tokens); "tokens" counts the real tokens."""
    rows = [p[0] for p in pairs] + [p[2] for p in pairs]
    idx, real = pad_rows(rows, pad_id, "right")  # (2B, T)
    mask = torch.zeros_like(idx)
    for b, m in enumerate([p[1] for p in pairs] + [p[3] for p in pairs]):
        mask[b, :len(m)] = torch.as_tensor(m, dtype=torch.long)
    return {"idx": idx, "mask": mask, "attention_mask": real, "tokens": real.sum()}
