"""KV cache tests: cached forward (prefill + one token at a time) == uncached forward, with and without
left padding, for learned and rotary positions, both attention implementations; errors when full."""

import pytest
import torch

from scratchllm.common import ScratchError
from scratchllm.model import GPT, KVCache, ModelConfig

LLAMA_STYLE = dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, bias=False)
CASES = [({}, "sdpa"), ({}, "naive"), (LLAMA_STYLE, "sdpa"), (LLAMA_STYLE, "naive")]
IDS = ["gpt2-sdpa", "gpt2-naive", "llama-sdpa", "llama-naive"]


def make_model(switches, attention, block_size=32):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=64, block_size=block_size, attention=attention, **switches)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so position / mask mistakes show in the logits
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("switches, attention", CASES, ids=IDS)
@torch.no_grad()
def test_prefill_then_steps_equal_full_forward(switches, attention):
    model = make_model(switches, attention)
    idx = torch.randint(0, 64, (2, 20))
    full = model(idx)
    cache = KVCache(model.config, batch_size=2, max_len=32)
    parts = [model(idx[:, :7], kv_cache=cache)]  # prefill 7 tokens
    assert cache.pos == 7
    parts.append(model(idx[:, 7:10], kv_cache=cache))  # a chunk of 3 after a prefill
    for t in range(10, 20):
        parts.append(model(idx[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 20
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5
    cache.reset()
    assert cache.pos == 0 and (model(idx, kv_cache=cache) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("switches, attention", CASES, ids=IDS)
@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(switches, attention):
    model = make_model(switches, attention)
    lengths = [9, 5, 1]
    rows = [torch.randint(0, 64, (n + 6,)) for n in lengths]  # prompt + 6 continuation tokens
    T = max(lengths)
    pad = torch.tensor([T - n for n in lengths])
    prompts = torch.stack([torch.cat([torch.full((T - n,), 63), r[:n]]) for r, n in zip(rows, lengths)])
    cache = KVCache(model.config, batch_size=3, max_len=T + 6)
    cache.set_left_padding(pad)
    out = model(prompts, kv_cache=cache)  # (3, T, V)
    steps = [model(torch.stack([r[n + s] for r, n in zip(rows, lengths)])[:, None], kv_cache=cache)
             for s in range(6)]
    for b, (r, n) in enumerate(zip(rows, lengths)):
        alone = model(r[None])  # (1, n + 6, V)
        assert (out[b, T - n:] - alone[0, :n]).abs().max().item() <= 1e-5
        stepped = torch.cat([s[b] for s in steps])  # (6, V)
        assert (stepped - alone[0, n:]).abs().max().item() <= 1e-5
        assert torch.isfinite(out[b]).all()  # pad rows attend to themselves: no NaN from an empty softmax


@torch.no_grad()
def test_left_padding_allows_a_short_row_to_go_past_the_batch_width_with_learned_positions():
    model = make_model({}, "sdpa", block_size=8)
    cache = KVCache(model.config, batch_size=2, max_len=10)
    cache.set_left_padding(torch.tensor([0, 2]))
    model(torch.randint(0, 64, (2, 8)), kv_cache=cache)  # row 0 fills positions 0..7
    with pytest.raises(ScratchError, match="block_size"):
        model(torch.randint(0, 64, (2, 1)), kv_cache=cache)  # row 0 would need position 8


@torch.no_grad()
def test_cache_errors():
    model = make_model({}, "sdpa")
    cache = KVCache(model.config, batch_size=1, max_len=4)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ScratchError, match="KV cache is full"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ScratchError, match="batch size"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=KVCache(model.config, batch_size=1, max_len=4))
    with pytest.raises(ScratchError, match="dtype"):
        model(torch.zeros(1, 1, dtype=torch.long),
              kv_cache=KVCache(model.config, batch_size=1, max_len=4, dtype=torch.bfloat16))
    with pytest.raises(ScratchError, match="does not fit"):
        other = ModelConfig.from_preset("tiny", n_layer=2)
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=KVCache(other, batch_size=1, max_len=4))
    with pytest.raises(ScratchError, match="shape"):
        KVCache(model.config, batch_size=2, max_len=4).set_left_padding(torch.tensor([1]))
    with pytest.raises(ScratchError, match="pad lengths"):
        KVCache(model.config, batch_size=1, max_len=4).set_left_padding(torch.tensor([4]))


@torch.no_grad()
def test_bf16_cache_works_with_a_bf16_model():
    model = make_model({}, "sdpa").to(torch.bfloat16)
    idx = torch.randint(0, 64, (1, 6))
    cache = KVCache(model.config, batch_size=1, max_len=8, dtype=torch.bfloat16)
    out = torch.cat([model(idx[:, :5], kv_cache=cache), model(idx[:, 5:], kv_cache=cache)], dim=1)
    assert (out.float() - model(idx).float()).abs().max().item() < 0.1
