"""Padded batches without a KV cache: with attention_mask (and positions derived from it), every real
token of a left- or right-padded batch gets the hidden states, logits, per-token loss and gradients its
row computes alone, for learned and rotary positions (GPT-2 and Llama-style switches) and both attention
implementations; padding positions stay finite; explicit positions; shape and cache errors."""

import pytest
import torch

from scratchllm.common import IGNORE_INDEX, ScratchError
from scratchllm.model import GPT, KVCache, ModelConfig

LLAMA_STYLE = dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2, bias=False)
CASES = [({}, "sdpa"), ({}, "naive"), (LLAMA_STYLE, "sdpa"), (LLAMA_STYLE, "naive")]
IDS = ["gpt2-sdpa", "gpt2-naive", "llama-sdpa", "llama-naive"]
LENGTHS = [7, 3, 5, 1]
PAD_ID = 63


def make_model(switches, attention):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=64, block_size=16, n_layer=2, attention=attention,
                                  **switches)
    model = GPT(cfg).eval()
    with torch.no_grad():  # larger weights than the init, so position / mask mistakes show in the outputs
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def padded_batch(side: str, seed: int = 0):
    """Rows of LENGTHS padded to one length on `side`: (rows, idx (B, T), mask (B, T), spans of the real
    tokens). E.g. side="left", rows [a b c], [d] -> idx [[a b c], [P P d]], mask [[1 1 1], [0 0 1]]."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, PAD_ID, (n,), generator=g) for n in LENGTHS]
    T = max(LENGTHS)
    idx = torch.full((len(rows), T), PAD_ID)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    spans = []
    for b, r in enumerate(rows):
        start = T - len(r) if side == "left" else 0
        idx[b, start:start + len(r)] = r
        mask[b, start:start + len(r)] = 1
        spans.append(slice(start, start + len(r)))
    return rows, idx, mask, spans


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("switches, attention", CASES, ids=IDS)
@torch.no_grad()
def test_padded_batch_equals_each_row_alone(switches, attention, side):
    model = make_model(switches, attention)
    rows, idx, mask, spans = padded_batch(side)
    hidden = model.hidden_states(idx, attention_mask=mask)  # (B, T, n_embd)
    logits = model(idx, attention_mask=mask)  # (B, T, V)
    assert torch.isfinite(hidden).all() and torch.isfinite(logits).all()  # padding rows too
    for b, (r, span) in enumerate(zip(rows, spans)):
        alone_h = model.hidden_states(r[None])[0]  # (n, n_embd)
        alone_logits = model(r[None])[0]  # (n, V)
        assert (hidden[b, span] - alone_h).abs().max().item() <= 1e-5, b
        assert (logits[b, span] - alone_logits).abs().max().item() <= 1e-5, b


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("switches, attention", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_padded_loss_and_grads_equal_unpadded_sums(switches, attention, side):
    model = make_model(switches, attention)
    rows, idx, mask, spans = padded_batch(side, seed=1)
    # next-token targets inside each row; padding and each row's last token are ignored
    targets = torch.full_like(idx, IGNORE_INDEX)
    for b, (r, span) in enumerate(zip(rows, spans)):
        targets[b, span.start:span.stop - 1] = r[1:]
    _, padded_sum = model(idx, targets=targets, attention_mask=mask, reduction="sum")
    padded_sum.backward()
    padded_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone_sum = 0.0
    for r in rows:
        _, s = model(r[None, :-1], targets=r[None, 1:], reduction="sum")
        s.backward()  # grads accumulate over the rows
        alone_sum = alone_sum + s.detach()
    assert abs(padded_sum.item() - alone_sum.item()) <= 1e-4
    for n, p in model.named_parameters():
        assert torch.allclose(padded_grads[n], p.grad, rtol=1e-4, atol=1e-5), n
    with torch.no_grad():  # per token: the same values at the same tokens, 0 on padding
        _, per_token = model(idx, targets=targets, attention_mask=mask, reduction="none")  # (B, T)
        assert torch.all(per_token[targets == IGNORE_INDEX] == 0)
        for b, (r, span) in enumerate(zip(rows, spans)):
            _, alone = model(r[None, :-1], targets=r[None, 1:], reduction="none")  # (1, n - 1)
            assert torch.allclose(per_token[b, span.start:span.stop - 1], alone[0], atol=1e-5)


@torch.no_grad()
def test_explicit_positions_and_mask_defaults():
    model = make_model(LLAMA_STYLE, "sdpa")
    rows, idx, mask, spans = padded_batch("left")
    derived = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0.. from each row's first real token
    assert derived[3].tolist() == [0] * 7 and derived[1].tolist() == [0, 0, 0, 0, 0, 1, 2]
    by_mask = model(idx, attention_mask=mask)
    assert torch.equal(model(idx, attention_mask=mask, positions=derived), by_mask)
    # positions (T,) without a mask are the default arange; shifted rope positions give other logits
    plain = model(idx)
    assert torch.equal(model(idx, positions=torch.arange(7)), plain)
    assert not torch.allclose(model(idx, positions=torch.arange(7) + 3), plain)
    # an all-ones mask is plain causal attention
    assert (model(idx, attention_mask=torch.ones_like(idx)) - plain).abs().max().item() <= 1e-5


def test_padding_arguments_are_checked():
    model = make_model({}, "sdpa")  # learned positions, block_size 16
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ScratchError, match="attention_mask has shape"):
        model(idx, attention_mask=torch.ones(2, 4))
    with pytest.raises(ScratchError, match="positions has shape"):
        model(idx, positions=torch.arange(4))
    with pytest.raises(ScratchError, match="block_size"):
        model(idx, positions=torch.arange(5) + 12)  # reaches position 16
    with pytest.raises(ScratchError, match="kv_cache"):
        model(idx, kv_cache=KVCache(model.config, 2, 8), attention_mask=torch.ones(2, 5))
    # a left-padded row longer than block_size is fine when its real tokens fit
    long_idx = torch.zeros(1, 20, dtype=torch.long)
    long_mask = torch.cat([torch.zeros(1, 4), torch.ones(1, 16)], dim=1)
    assert model(long_idx, attention_mask=long_mask).shape == (1, 20, 64)
