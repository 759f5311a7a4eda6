"""Token arrays -> (x, y) batches: the book's sliding windows, resumable samplers for pretraining (the
book's shuffled fixed windows counted in epochs, or random windows), and deterministic validation
batches. `y` is `x` shifted left by one token.

- `SlidingWindowDataset(tokens, block_size, stride)`: the book's GPTDatasetV1, a torch Dataset for
  `DataLoader` (window i starts at i*stride).
- `SlidingWindowSampler(arrays, block_size, batch_size, stride, seed, rank, world_size)`: the same
  windows cut from each array (never across two), as the book's `DataLoader(shuffle=True,
  drop_last=True)` gives them: a new order each epoch (generator seeded by (seed, epoch)), dealt
  round-robin to ranks, `batches_per_epoch` batches per rank and epoch, `epoch` counting them.
- `RandomWindowSampler(arrays, block_size, batch_size, seed, rank, world_size)`: each epoch cuts every
  shard into non-overlapping windows of `block_size` tokens (at a random offset drawn per epoch),
  shuffles all windows with a generator seeded by (seed, epoch), and deals them out round-robin:
  rank r takes windows r, r+W, r+2W, ... So ranks never share a window within an epoch, and together
  they see exactly what one process would. `state_dict()` is two integers (epoch, position) plus
  checks; after `load_state_dict` the next batches are bit-identical to the uninterrupted run's.
- `eval_batches(arrays, block_size, batch_size)`: non-overlapping windows from the start of each
  array, in order, for validation loss.

Batches are int64 `(B, T)`; on CUDA they are pinned and copied with `non_blocking=True`.
Nothing here reads files: pass `open_shards(dir).train` (memory-mapped) or any 1-D arrays.

    >>> s = RandomWindowSampler(open_shards("shards").train, block_size=256, batch_size=8)  # doctest: +SKIP
    >>> x, y = s.next_batch()                                                              # doctest: +SKIP
    >>> s = SlidingWindowSampler([train_ids], 256, batch_size=2, stride=256)              # doctest: +SKIP
    >>> max_steps = 10 * s.batches_per_epoch                                               # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from scratchllm.common import ScratchError

STATE_VERSION = 1


def _to_device(rows: np.ndarray, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) int64 rows -> x, y (B, T) on `device` (pinned + non-blocking on CUDA)."""
    buf = torch.from_numpy(rows)
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each
    if str(device).startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    if str(device) != "cpu":
        return x.to(device), y.to(device)
    return x, y


class SlidingWindowDataset(Dataset):
    """The book's input/target windows over one token sequence.

    Item i is (tokens[i*stride : i*stride+T], tokens[i*stride+1 : i*stride+T+1]) as int64 tensors,
    for every start in range(0, len(tokens) - block_size, stride), as in the book's GPTDatasetV1.

    >>> ds = SlidingWindowDataset([1, 2, 3, 4, 5], block_size=2, stride=2)
    >>> len(ds), ds[1]
    (2, (tensor([3, 4]), tensor([4, 5])))
    """

    def __init__(self, tokens, block_size: int, stride: int):
        if block_size < 1 or stride < 1:
            raise ScratchError(f"block_size and stride must be >= 1, got {block_size} and {stride}")
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.numpy()
        self.tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens, dtype=np.int64)
        if self.tokens.ndim != 1:
            raise ScratchError(f"tokens must be 1-D, got shape {self.tokens.shape}")
        self.block_size, self.stride = block_size, stride
        self.starts = range(0, len(self.tokens) - block_size, stride)
        if len(self.starts) == 0:
            raise ScratchError(f"{len(self.tokens)} tokens are too few for one window of block_size "
                               f"{block_size} (need at least {block_size + 1})")

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[i]
        chunk = torch.from_numpy(np.asarray(self.tokens[start:start + self.block_size + 1], dtype=np.int64))
        return chunk[:-1], chunk[1:]


def _check_layout(block_size: int, batch_size: int, rank: int, world_size: int, lengths: np.ndarray) -> None:
    """The checks both samplers make: positive sizes, a valid rank, and one array with a full window
    (block_size + 1 tokens: the inputs plus the last target)."""
    if block_size < 1 or batch_size < 1:
        raise ScratchError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
    if not 0 <= rank < world_size:
        raise ScratchError(f"rank {rank} is not in [0, world_size={world_size})")
    longest = int(lengths.max(initial=0))
    if longest < block_size + 1:
        raise ScratchError(f"the token arrays ({int(lengths.sum())} tokens, longest {longest}) are too short "
                           f"for one window of block_size {block_size}: an array needs at least "
                           f"{block_size + 1} tokens; use a smaller block_size or more text")


def _gather(arrays: list, windows: list[tuple[int, int]], block_size: int, device: str):
    """[(array index, start), ...] -> x, y (len(windows), block_size) on `device`."""
    rows = np.empty((len(windows), block_size + 1), dtype=np.int64)  # (B, T+1)
    for b, (i, start) in enumerate(windows):
        rows[b] = arrays[i][start:start + block_size + 1]
    return _to_device(rows, device)


def _locate(cum: np.ndarray, w: int) -> tuple[int, int]:
    """Global window id -> (array index, window index inside that array), given the cumulative window
    counts `cum` = [0, n0, n0 + n1, ...]. Example: cum [0, 3, 5], w 4 -> (1, 1)."""
    i = int(np.searchsorted(cum, w, side="right")) - 1
    return i, w - int(cum[i])


def _check_state(state: dict, mine: dict, keys: tuple[str, ...]) -> None:
    """Refuse a sampler state taken with other data or settings, naming the first field that differs."""
    if state.get("version") != STATE_VERSION:
        raise ScratchError(f"sampler state version {state.get('version')!r} is not {STATE_VERSION}")
    kind = state.get("sampler", "random")  # states written before SlidingWindowSampler have no "sampler"
    if kind != mine["sampler"]:
        raise ScratchError(f"cannot resume the data sampler: the saved state is from a {kind}-window "
                           f"sampler, this run uses {mine['sampler']} windows")
    for key in keys:
        if state.get(key) != mine[key]:
            show = (lambda v: f"{len(v)} arrays, {sum(v)} tokens") if key == "lengths" else repr
            raise ScratchError(f"cannot resume the data sampler: saved {key} {show(state.get(key))} differs "
                               f"from this run's {show(mine[key])}; resume with the same data and settings")


class RandomWindowSampler:
    """Seeded random windows over token arrays, rank-sharded for DDP, resumable bit-exactly."""

    def __init__(self, arrays: Sequence, block_size: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str = "cpu"):
        self.arrays = list(arrays)
        self.lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        _check_layout(block_size, batch_size, rank, world_size, self.lengths)
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.epoch, self.pos = 0, rank  # pos: index (in this epoch's shuffled order) of our next window
        self._plan_epoch, self._plan = -1, None

    @property
    def batches_per_epoch(self) -> int:
        """About how many batches each rank draws per epoch (the count at offset 0; an epoch's random
        offset can cut one window fewer per array). What `--epochs` turns into steps."""
        windows = int(np.maximum(0, (self.lengths - 1) // self.block_size).sum())
        return max(1, windows // (self.batch_size * self.world_size))

    def _plan_for(self, epoch: int):
        """(offset, cumulative window counts per array, shuffled window ids) of one epoch, cached."""
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.block_size))
            per = np.maximum(0, (self.lengths - 1 - offset) // self.block_size)
            if per.sum() == 0:  # shards so short that the offset leaves no window
                offset, per = 0, np.maximum(0, (self.lengths - 1) // self.block_size)
            cum = np.concatenate([[0], np.cumsum(per)])
            self._plan = (offset, cum, rng.permutation(int(cum[-1])))
            self._plan_epoch = epoch
        return self._plan

    def _next_window(self) -> tuple[int, int]:
        offset, cum, perm = self._plan_for(self.epoch)
        while self.pos >= len(perm):  # roll into the next epoch, keeping our place in the round-robin
            self.pos -= len(perm)
            self.epoch += 1
            offset, cum, perm = self._plan_for(self.epoch)
        shard, k = _locate(cum, int(perm[self.pos]))
        self.pos += self.world_size
        return shard, offset + k * self.block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), int64 (B, T) each."""
        windows = [self._next_window() for _ in range(self.batch_size)]
        return _gather(self.arrays, windows, self.block_size, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain ints and strings (safe for `torch.load(weights_only=True)`)."""
        return {"version": STATE_VERSION, "sampler": "random", "epoch": self.epoch, "pos": self.pos,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "block_size": self.block_size, "lengths": [int(n) for n in self.lengths]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. The data, seed, block size and ranks must match."""
        _check_state(state, self.state_dict(), ("seed", "rank", "world_size", "block_size", "lengths"))
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class SlidingWindowSampler:
    """The book's windows (SlidingWindowDataset's, per array) in a new seeded order every epoch,
    rank-sharded, counted in epochs, resumable bit-exactly.

    Window ids 0..N-1 run over the arrays in order (array a's windows start at 0, stride, 2*stride,
    ... while start + block_size + 1 <= len(a)). Epoch e shuffles them with
    `np.random.default_rng([seed, e])`; rank r takes shuffled positions r, r+W, r+2W, ... and cuts
    them into batches of `batch_size`. So W ranks with batch B see, step by step, exactly the
    windows one process with batch W*B sees. drop_last=True (the book's training loader) keeps the
    first `batches_per_epoch * B * W` positions; drop_last=False keeps all N, wraps round to the
    start of the order until each rank has as many (at most W-1 repeats), and ends each epoch with
    a smaller batch when B does not divide that. `epoch` is the number of finished epochs (the epoch
    the next batch comes from) and `pos` how many batches of it this rank has drawn.

    >>> s = SlidingWindowSampler([np.arange(10)], block_size=2, batch_size=2, stride=2)
    >>> s.batches_per_epoch, sorted(int(v) for _ in range(2) for v in s.next_batch()[0][:, 0]), s.epoch
    (2, [0, 2, 4, 6], 1)
    """

    def __init__(self, arrays: Sequence, block_size: int, batch_size: int, stride: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, device: str = "cpu", drop_last: bool = True):
        self.arrays = list(arrays)
        self.lengths = np.array([len(a) for a in self.arrays], dtype=np.int64)
        if stride < 1:
            raise ScratchError(f"stride must be >= 1, got {stride}")
        _check_layout(block_size, batch_size, rank, world_size, self.lengths)
        self.block_size, self.batch_size, self.stride = block_size, batch_size, stride
        self.drop_last = drop_last
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        # windows per array: len(range(0, n - block_size, stride))
        per = np.maximum(0, (self.lengths - block_size + stride - 1) // stride)
        self.cum = np.concatenate([[0], np.cumsum(per)])  # window ids of array a: cum[a] .. cum[a+1]-1
        self.n_windows = int(self.cum[-1])
        if drop_last and self.n_windows < batch_size * world_size:
            raise ScratchError(f"{self.n_windows} windows ({int(self.lengths.sum())} tokens, block_size "
                               f"{block_size}, stride {stride}) are fewer than one batch of {batch_size} x "
                               f"{world_size} process(es); lower batch_size, stride or block_size, use more "
                               f"text, or keep the last partial batch (drop_last=False)")
        self.epoch, self.pos = 0, 0
        self._order_epoch, self._order = -1, None

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank draws per epoch (the same on every rank)."""
        per_step = self.batch_size * self.world_size
        return self.n_windows // per_step if self.drop_last else -(-self.n_windows // per_step)

    def _rank_order(self, epoch: int) -> np.ndarray:
        """This rank's window ids of one epoch, in the order it draws them (cached)."""
        if self._order_epoch != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            W = self.world_size
            if self.drop_last:
                perm = perm[:self.batches_per_epoch * self.batch_size * W]
            else:  # wrap round so every rank has the same count
                perm = perm[np.arange(-(-self.n_windows // W) * W) % self.n_windows]
            self._order, self._order_epoch = perm[self.rank::W], epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), int64 (B, T) each (the last of an epoch smaller with drop_last=False)."""
        B = self.batch_size
        ids = self._rank_order(self.epoch)[self.pos * B:(self.pos + 1) * B]
        self.pos += 1
        if self.pos == self.batches_per_epoch:
            self.epoch, self.pos = self.epoch + 1, 0
        windows = [(a, k * self.stride) for a, k in (_locate(self.cum, int(w)) for w in ids)]
        return _gather(self.arrays, windows, self.block_size, self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """Plain ints, bools and strings (safe for `torch.load(weights_only=True)`)."""
        return {"version": STATE_VERSION, "sampler": "sliding", "epoch": self.epoch, "pos": self.pos,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "block_size": self.block_size, "stride": self.stride, "batch_size": self.batch_size,
                "drop_last": self.drop_last, "lengths": [int(n) for n in self.lengths]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. The data and every setting but the device must match."""
        _check_state(state, self.state_dict(), ("seed", "rank", "world_size", "block_size", "stride",
                                                "batch_size", "drop_last", "lengths"))
        epoch, pos = int(state["epoch"]), int(state["pos"])
        if epoch < 0 or not 0 <= pos < self.batches_per_epoch:
            raise ScratchError(f"sampler state epoch {epoch}, batch {pos} is outside an epoch of "
                               f"{self.batches_per_epoch} batches")
        self.epoch, self.pos = epoch, pos


def eval_batches(arrays: Sequence, block_size: int, batch_size: int, max_batches: int | None = None,
                 device: str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches: windows at 0, T, 2T, ... of each array in order, B per batch
    (the last batch may be smaller), at most `max_batches` batches.

    >>> [x.tolist() for x, _ in eval_batches([np.arange(7)], block_size=3, batch_size=1)]
    [[[0, 1, 2]], [[3, 4, 5]]]
    """
    if block_size < 1 or batch_size < 1:
        raise ScratchError(f"block_size and batch_size must be >= 1, got {block_size} and {batch_size}")
    total = sum(max(0, (len(a) - 1) // block_size) for a in arrays)
    if total == 0:
        n = sum(len(a) for a in arrays)
        raise ScratchError(f"the validation tokens ({n}) are too few for one window of block_size "
                           f"{block_size}; use a larger --val-fraction or a smaller block_size")
    if max_batches is not None and max_batches <= 0:
        return
    rows, made = [], 0
    for a in arrays:
        for start in range(0, len(a) - block_size, block_size):
            rows.append(np.asarray(a[start:start + block_size + 1], dtype=np.int64))
            if len(rows) == batch_size:
                yield _to_device(np.stack(rows), device)  # (B, T+1) -> (B, T) x2
                rows, made = [], made + 1
                if max_batches is not None and made >= max_batches:
                    return
    if rows:
        yield _to_device(np.stack(rows), device)
