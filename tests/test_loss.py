"""linear_cross_entropy(reduction="none"): the per-row loss -log p(target) equals
F.cross_entropy(reduction="none") on explicit logits, values and gradients for a random upstream
gradient, with ignored rows and chunks that do not divide the rows; GPT.forward returns it as (B, T)."""

import pytest
import torch
import torch.nn.functional as F

from scratchllm.common import IGNORE_INDEX, ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.loss import linear_cross_entropy


def inputs(seed=0, N=50, C=16, V=37):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, requires_grad=True)
    w = torch.randn(V, C, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::7] = IGNORE_INDEX
    return x, w, t, g


@pytest.mark.parametrize("chunk_rows", [16, 1024])  # 16 does not divide 50; 1024 is one chunk
def test_per_row_loss_and_grads_equal_torch(chunk_rows):
    x, w, t, g = inputs()
    ref = F.cross_entropy(x @ w.T, t, ignore_index=IGNORE_INDEX, reduction="none")  # (N,), 0 where ignored
    upstream = torch.randn(50, generator=g)  # an arbitrary d out / d per_row
    ref_grads = torch.autograd.grad((upstream * ref).sum(), (x, w))
    per_row = linear_cross_entropy(x, w, t, reduction="none", chunk_rows=chunk_rows)
    assert per_row.shape == (50,) and per_row.dtype == torch.float32
    assert torch.all(per_row[::7] == 0.0)
    assert torch.allclose(per_row, ref, atol=1e-5)
    grads = torch.autograd.grad((upstream * per_row).sum(), (x, w))
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-5)  # fp32 sums in another order
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x, w, t, reduction="none", chunk_rows=chunk_rows), ref,
                              atol=1e-5)


def test_per_row_loss_by_hand_and_consistent_with_sum():
    # two classes, logits [0, log 3]: p = [1/4, 3/4]
    x = torch.tensor([[1.0], [1.0], [1.0]])
    w = torch.tensor([[0.0], [torch.log(torch.tensor(3.0)).item()]])
    t = torch.tensor([0, IGNORE_INDEX, 1])
    per_row = linear_cross_entropy(x, w, t, reduction="none")
    expected = torch.tensor([torch.log(torch.tensor(4.0)), 0.0, torch.log(torch.tensor(4 / 3))])
    assert torch.allclose(per_row, expected, atol=1e-6)
    x, w, t, _ = inputs(seed=1)
    total = linear_cross_entropy(x, w, t, reduction="sum", chunk_rows=16)
    per_row = linear_cross_entropy(x, w, t, reduction="none", chunk_rows=16)
    assert torch.allclose(per_row.sum(), total, atol=1e-4)
    with pytest.raises(ScratchError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="max")


def test_per_row_loss_under_bf16_autocast_is_close_to_fp32():
    x, w, t, g = inputs(seed=2)
    ref = F.cross_entropy(x @ w.T, t, ignore_index=IGNORE_INDEX, reduction="none")
    upstream = torch.randn(50, generator=g)
    ref_gx, = torch.autograd.grad((upstream * ref).sum(), (x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_row = linear_cross_entropy(x, w, t, reduction="none", chunk_rows=16)
    gx, = torch.autograd.grad((upstream * per_row).sum(), (x,))
    assert per_row.dtype == torch.float32 and gx.dtype == torch.float32
    assert (per_row - ref).abs().max().item() <= 0.05 * ref.abs().max().item()
    assert (gx - ref_gx).abs().max().item() <= 0.05 * ref_gx.abs().max().item()


def test_gpt_forward_reduction_none_gives_per_token_loss():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=50, block_size=16)).eval()
    idx = torch.randint(0, 50, (2, 16))
    targets = torch.randint(0, 50, (2, 16))
    targets[1, :10] = IGNORE_INDEX
    none, per_token = model(idx, targets=targets, reduction="none")
    assert none is None and per_token.shape == (2, 16)
    logits = model(idx)  # (2, 16, 50)
    ref = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view(2, 16)
    assert torch.allclose(per_token, ref, atol=1e-5)
    # the gradient through the per-token loss reaches the model like the reference's does
    upstream = torch.randn(2, 16)
    (upstream * per_token).sum().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(idx)
    ref = F.cross_entropy(logits.view(-1, 50), targets.view(-1), ignore_index=IGNORE_INDEX, reduction="none")
    (upstream.view(-1) * ref).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(ours[n], p.grad, rtol=1e-4, atol=1e-5), n
