"""loaders.py: the book's sliding windows (checked against the book's own loop and its printed first
batch), rank-sharded random windows (disjoint; together equal to one process), bit-exact resume, and
the sliding-window sampler (the dataset's windows, a permutation per epoch, the book's 9 batches per
epoch on the-verdict, ranks together equal to one process, bit-exact resume)."""

import io

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from scratchllm.common import ScratchError
from scratchllm.data.loaders import (
    RandomWindowSampler,
    SlidingWindowDataset,
    SlidingWindowSampler,
    eval_batches,
)


@pytest.fixture(scope="module")
def verdict_ids(shared_data, gpt2_tiktoken):
    return gpt2_tiktoken.encode((shared_data / "the-verdict.txt").read_text())


def test_sliding_windows_match_the_book(verdict_ids):
    ds = SlidingWindowDataset(verdict_ids, block_size=4, stride=1)
    x, y = ds[0]  # the book, ch02: tensor([[40, 367, 2885, 1464]]) / tensor([[367, 2885, 1464, 1807]])
    assert x.tolist() == [40, 367, 2885, 1464] and y.tolist() == [367, 2885, 1464, 1807]
    for block_size, stride in [(4, 1), (256, 128), (256, 256), (7, 3)]:
        ds = SlidingWindowDataset(np.array(verdict_ids, dtype=np.uint16), block_size, stride)
        book = [(verdict_ids[i:i + block_size], verdict_ids[i + 1:i + block_size + 1])
                for i in range(0, len(verdict_ids) - block_size, stride)]  # GPTDatasetV1's loop
        assert len(ds) == len(book)
        for i in (0, len(book) // 2, len(book) - 1):
            assert (ds[i][0].tolist(), ds[i][1].tolist()) == book[i]
    xb, yb = next(iter(DataLoader(SlidingWindowDataset(verdict_ids, 4, 4), batch_size=8)))
    assert xb.shape == yb.shape == (8, 4) and xb.dtype == torch.int64
    assert torch.equal(xb[:, 1:], yb[:, :-1])


def test_sliding_window_too_short():
    with pytest.raises(ScratchError, match="3 tokens are too few for one window of block_size 3"):
        SlidingWindowDataset([1, 2, 3], block_size=3, stride=1)


def arrays():
    """Three 'shards' whose token value is its global position, so a window is named by x[0]."""
    lengths = [1000, 37, 523]
    starts = np.cumsum([0] + lengths[:-1])
    return [np.arange(s, s + n, dtype=np.uint32) for s, n in zip(starts, lengths)]


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_batches_are_shifted_windows_of_the_data():
    s = RandomWindowSampler(arrays(), block_size=16, batch_size=4, seed=1)
    for x, y in take(s, 30):
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y, x + 1)  # contiguous windows of consecutive positions, y = x shifted
    a = [x.tolist() for x, _ in take(RandomWindowSampler(arrays(), 16, 4, seed=1), 5)]
    b = [x.tolist() for x, _ in take(RandomWindowSampler(arrays(), 16, 4, seed=1), 5)]
    c = [x.tolist() for x, _ in take(RandomWindowSampler(arrays(), 16, 4, seed=2), 5)]
    assert a == b and a != c
    it = iter(RandomWindowSampler(arrays(), 16, 4, seed=1))
    assert [next(it)[0].tolist() for _ in range(5)] == a


def test_an_epoch_covers_each_window_once():
    T = 16
    s = RandomWindowSampler(arrays(), block_size=T, batch_size=1, seed=3)
    offset, cum, perm = s._plan_for(0)
    firsts = [int(x[0, 0]) for x, _ in take(s, len(perm))]
    assert len(set(firsts)) == len(firsts) == int(cum[-1])
    assert all((f - offset) % T == 0 or f >= 1000 for f in firsts)  # a grid per shard
    assert s.epoch == 0 and s.next_batch() is not None and s.epoch == 1


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_together_equal_one_process(world_size):
    B, n = 3, 25  # 25 batches x 3 x world_size windows: more than one epoch (~96 windows)
    single = [int(v) for x, _ in take(RandomWindowSampler(arrays(), 16, B, seed=7), n * world_size)
              for v in x[:, 0]]
    per_rank = [[int(v) for x, _ in take(RandomWindowSampler(arrays(), 16, B, seed=7, rank=r,
                                                                world_size=world_size), n) for v in x[:, 0]]
                for r in range(world_size)]
    assert sorted(sum(per_rank, [])) == sorted(single)
    epoch_len = len(RandomWindowSampler(arrays(), 16, B, seed=7)._plan_for(0)[2])
    first_epoch = [set(r[:epoch_len // world_size]) for r in per_rank]
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not first_epoch[i] & first_epoch[j]


def test_state_round_trip_gives_identical_batches_across_epochs():
    def run(interrupt_at):
        s = RandomWindowSampler(arrays(), 16, 5, seed=11, rank=1, world_size=2)
        out = [x for x, _ in take(s, interrupt_at)]
        buf = io.BytesIO()
        torch.save({"data": s.state_dict()}, buf)  # as the trainer stores it in train_state.pt
        buf.seek(0)
        state = torch.load(buf, weights_only=True)["data"]
        r = RandomWindowSampler(arrays(), 16, 5, seed=11, rank=1, world_size=2)
        r.load_state_dict(state)
        return out + [x for x, _ in take(r, 40 - interrupt_at)]

    straight = [x for x, _ in take(RandomWindowSampler(arrays(), 16, 5, seed=11, rank=1, world_size=2), 40)]
    for cut in (1, 9, 10, 33):  # epochs hold ~48 windows per rank: cuts before, at and after a boundary
        assert all(torch.equal(a, b) for a, b in zip(run(cut), straight, strict=True))


def test_resume_refuses_other_settings():
    state = RandomWindowSampler(arrays(), 16, 2, seed=1).state_dict()
    with pytest.raises(ScratchError, match="saved seed 1 differs from this run's 2"):
        RandomWindowSampler(arrays(), 16, 2, seed=2).load_state_dict(state)
    with pytest.raises(ScratchError, match="saved lengths 3 arrays, 1560 tokens differs"):
        RandomWindowSampler(arrays()[:2], 16, 2, seed=1).load_state_dict(state)
    with pytest.raises(ScratchError, match="too short for one window of block_size 2000"):
        RandomWindowSampler(arrays(), 2000, 2)
    with pytest.raises(ScratchError, match="rank 2 is not in"):
        RandomWindowSampler(arrays(), 16, 2, rank=2, world_size=2)


def firsts(batches):
    """The first token of every window: with arrays() it names the window."""
    return [int(v) for x, _ in batches for v in x[:, 0]]


def test_sliding_sampler_windows_are_the_datasets_per_array():
    data = arrays()
    for T, stride in [(16, 16), (16, 5), (40, 64)]:
        s = SlidingWindowSampler(data, T, batch_size=3, stride=stride, seed=4, drop_last=False)
        got = sorted((tuple(x.tolist()), tuple(y.tolist())) for bx, by in take(s, s.batches_per_epoch)
                     for x, y in zip(bx, by))
        want = sorted((tuple(x.tolist()), tuple(y.tolist())) for a in data if len(a) > T  # (40: 37 has none)
                      for x, y in SlidingWindowDataset(a, T, stride))  # never across two arrays
        assert got == want and s.n_windows == len(want)
        assert s.epoch == 1 and s.pos == 0
    s = SlidingWindowSampler(data, 16, 4, stride=8)
    x, y = s.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64 and torch.equal(y, x + 1)
    assert list(iter(s).__next__()[0].shape) == [4, 16]


def test_sliding_sampler_the_books_chapter_5_loader(shared_data, gpt2_tiktoken):
    text = (shared_data / "the-verdict.txt").read_text()
    train = gpt2_tiktoken.encode(text[:int(0.9 * len(text))])
    book = DataLoader(SlidingWindowDataset(train, 256, 256), batch_size=2, shuffle=True, drop_last=True)
    s = SlidingWindowSampler([np.array(train, dtype=np.uint16)], 256, 2, stride=256)
    assert s.batches_per_epoch == len(book) == 9
    epoch = [x for x, _ in take(s, 9)]
    windows = {tuple(x.tolist()) for x, _ in SlidingWindowDataset(train, 256, 256)}
    assert all(tuple(row.tolist()) in windows for x in epoch for row in x)


def test_sliding_sampler_each_epoch_is_a_new_permutation():
    s = SlidingWindowSampler(arrays(), 16, batch_size=4, stride=16, seed=5)
    n = s.n_windows  # 62 + 2 + 32 = 96 windows, 24 batches
    assert (n, s.batches_per_epoch) == (96, 24)
    epochs = []
    for e in range(3):
        assert s.epoch == e
        epochs.append(firsts(take(s, s.batches_per_epoch)))
    assert all(sorted(f) == sorted(epochs[0]) and len(set(f)) == n for f in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert firsts(take(SlidingWindowSampler(arrays(), 16, 4, stride=16, seed=5), 24)) == epochs[0]
    assert firsts(take(SlidingWindowSampler(arrays(), 16, 4, stride=16, seed=6), 24)) != epochs[0]
    s = SlidingWindowSampler(arrays(), 16, batch_size=7, stride=16, seed=5)  # 96 = 13 x 7 + 5 dropped
    assert s.batches_per_epoch == 13
    one = firsts(take(s, 13))
    assert len(set(one)) == 91 and s.epoch == 1 and set(firsts(take(s, 13))) != set(one)
    s = SlidingWindowSampler(arrays(), 16, batch_size=7, stride=16, drop_last=False)
    assert s.batches_per_epoch == 14 and [len(x) for x, _ in take(s, 14)][-1] == 5 and s.epoch == 1


@pytest.mark.parametrize("world_size,drop_last", [(2, True), (3, True), (3, False), (4, False)])
def test_sliding_sampler_ranks_together_equal_one_process(world_size, drop_last):
    B = 4  # stride 15: 66 + 2 + 34 = 102 windows, not a multiple of B * world_size
    one = SlidingWindowSampler(arrays(), 16, B * world_size, stride=15, seed=8, drop_last=drop_last)
    ranks = [SlidingWindowSampler(arrays(), 16, B, stride=15, seed=8, rank=r, world_size=world_size,
                                  drop_last=drop_last) for r in range(world_size)]
    assert all(r.batches_per_epoch == one.batches_per_epoch for r in ranks)
    for _ in range(2 * one.batches_per_epoch + 3):  # into the third epoch
        last = one.pos == one.batches_per_epoch - 1
        step = [firsts([r.next_batch()]) for r in ranks]
        assert len({len(f) for f in step}) == 1  # every rank draws as many windows
        want = firsts([one.next_batch()])
        if drop_last or not last or 102 % world_size == 0:
            assert sorted(sum(step, [])) == sorted(want)
        else:  # each rank's short last batch is filled round from the epoch's start: 2 repeats with 4 ranks
            assert set(sum(step, [])) > set(want) and len(sum(step, [])) == len(want) + 2
    assert {r.epoch for r in ranks} == {one.epoch} == {2}


def test_sliding_sampler_resumes_mid_epoch_bit_exactly():
    def make():
        return SlidingWindowSampler(arrays(), 16, 5, stride=11, seed=3, rank=1, world_size=2)

    per_epoch = make().batches_per_epoch  # 136 windows // 10 = 13 batches per rank
    straight = [x for x, _ in take(make(), 3 * per_epoch)]
    for cut in (1, 6, per_epoch, per_epoch + 4, 2 * per_epoch - 1):
        s = make()
        out = [x for x, _ in take(s, cut)]
        buf = io.BytesIO()
        torch.save({"data": s.state_dict()}, buf)  # as the trainer stores it in train_state.pt
        buf.seek(0)
        r = make()
        r.load_state_dict(torch.load(buf, weights_only=True)["data"])
        assert (r.epoch, r.pos) == divmod(cut, per_epoch)
        out += [x for x, _ in take(r, 3 * per_epoch - cut)]
        assert all(torch.equal(a, b) for a, b in zip(out, straight, strict=True))


def test_sliding_sampler_errors():
    with pytest.raises(ScratchError, match=r"\(100 tokens, longest 60\) are too short for one window of "
                                           r"block_size 64: an array needs at least 65 tokens"):
        SlidingWindowSampler([np.arange(60), np.arange(40)], 64, 2, stride=64)
    with pytest.raises(ScratchError, match="3 windows .* fewer than one batch of 2 x 2 process.*drop_last"):
        SlidingWindowSampler([np.arange(49)], 16, 2, stride=16, world_size=2)
    short = SlidingWindowSampler([np.arange(49)], 16, 2, stride=16, world_size=2, drop_last=False)
    assert short.batches_per_epoch == 1
    with pytest.raises(ScratchError, match="stride must be >= 1"):
        SlidingWindowSampler(arrays(), 16, 2, stride=0)
    with pytest.raises(ScratchError, match="rank 2 is not in"):
        SlidingWindowSampler(arrays(), 16, 2, stride=16, rank=2, world_size=2)
    state = SlidingWindowSampler(arrays(), 16, 2, stride=16).state_dict()
    for other, field in [(dict(stride=8), "stride 16 differs from this run's 8"),
                         (dict(batch_size=3), "batch_size 2 differs"), (dict(seed=1), "seed 0 differs"),
                         (dict(world_size=2), "world_size 1 differs"), (dict(block_size=8), "block_size 16"),
                         (dict(drop_last=False), "drop_last True differs")]:
        kw = dict(block_size=16, batch_size=2, stride=16) | other
        with pytest.raises(ScratchError, match=f"cannot resume the data sampler: saved {field}"):
            SlidingWindowSampler(arrays(), **kw).load_state_dict(state)
    with pytest.raises(ScratchError, match="saved lengths 3 arrays, 1560 tokens differs from this run's 2 "):
        SlidingWindowSampler(arrays()[:2], 16, 2, stride=16).load_state_dict(state)
    random_state = RandomWindowSampler(arrays(), 16, 2).state_dict()
    with pytest.raises(ScratchError, match="from a random-window sampler, this run uses sliding windows"):
        SlidingWindowSampler(arrays(), 16, 2, stride=16).load_state_dict(random_state)
    with pytest.raises(ScratchError, match="from a sliding-window sampler, this run uses random windows"):
        RandomWindowSampler(arrays(), 16, 2).load_state_dict(state)
    with pytest.raises(ScratchError, match="batch 48 is outside an epoch of 48 batches"):
        SlidingWindowSampler(arrays(), 16, 2, stride=16).load_state_dict(state | {"pos": 48})


def test_eval_batches_are_deterministic_and_non_overlapping():
    batches = list(eval_batches(arrays(), block_size=16, batch_size=8))
    firsts = [int(v) for x, _ in batches for v in x[:, 0]]
    # windows at 0, 16, ... per array while start + 17 <= length: 62 + 2 + 32
    expected = list(range(0, 1000 - 16, 16)) + list(range(1000, 1037 - 16, 16)) + list(range(1037, 1560 - 16, 16))
    assert firsts == expected and len(firsts) == 96
    assert [x.shape[0] for x, _ in batches] == [8] * 12
    assert all(torch.equal(y, x + 1) for x, y in batches)
    assert len(list(eval_batches(arrays(), 16, 10, max_batches=3))) == 3
    assert [x.shape[0] for x, _ in eval_batches(arrays(), 16, 10)][-1] == 6  # the last one is partial
    with pytest.raises(ScratchError, match="validation tokens \\(10\\) are too few.*--val-fraction"):
        list(eval_batches([np.arange(10)], 16, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_are_on_the_device():
    x, y = RandomWindowSampler(arrays(), 16, 4, device="cuda").next_batch()
    assert x.is_cuda and y.is_cuda and torch.equal(y.cpu(), x.cpu() + 1)
