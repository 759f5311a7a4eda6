"""Learning-rate schedules against hand-computed values, AdamW decay groups, and the objectives' math."""

import math

import pytest
import torch
from trainer_helpers import TinyLM

from scratchllm.common import IGNORE_INDEX
from scratchllm.train.objectives import next_token_objective, token_cross_entropy_sum
from scratchllm.train.optim import build_optimizer, lr_at, param_groups


def test_cosine_schedule_hand_values():
    # max_lr 1, warmup 2, max_steps 6, floor 0: warmup 1/2, 2/2; then p = 0, 1/4, 1/2, 3/4, 1
    got = [lr_at(s, max_lr=1.0, warmup_steps=2, max_steps=6, min_lr=0.0) for s in range(8)]
    want = [0.5, 1.0, 1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0, 0.0]
    assert got == pytest.approx(want, abs=1e-12)


def test_cosine_floor_and_linear_and_constant():
    kw = dict(max_lr=6e-4, warmup_steps=10, max_steps=110, min_lr=6e-5)
    assert lr_at(0, **kw) == pytest.approx(6e-5)  # 6e-4 * 1/10
    assert lr_at(60, **kw) == pytest.approx(6e-5 + (6e-4 - 6e-5) * 0.5)  # halfway: cos(pi/2) = 0
    assert lr_at(110, **kw) == pytest.approx(6e-5)
    assert lr_at(500, **kw) == pytest.approx(6e-5)  # past the end: stays at the floor
    assert lr_at(35, schedule="linear", **kw) == pytest.approx(6e-4 - 5.4e-4 * 0.25)
    assert lr_at(35, schedule="constant", **kw) == 6e-4
    assert lr_at(0, max_lr=1.0, warmup_steps=0, max_steps=4) == 1.0  # no warmup starts at the peak
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(0, max_lr=1.0, warmup_steps=0, max_steps=1, schedule="step")


def test_decay_groups_split_by_dimension():
    model = TinyLM()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["fc.weight", "wpe.weight", "wte.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["fc.bias", "ln.bias", "ln.weight"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    assert opt.defaults["fused"] is True  # CPU has a fused AdamW kernel
    assert sum(len(g["params"]) for g in opt.param_groups) == 6  # the tied head is not counted twice


def test_no_decay_tensors_are_untouched_by_weight_decay():
    # With zero gradients, AdamW changes parameters only through decay: p <- p * (1 - lr * wd)
    model = TinyLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, lr=0.5, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.5 * 0.1 if p.dim() >= 2 else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor)


def test_cross_entropy_sum_hand_values():
    # uniform logits over 4 classes: each valid target costs log 4; the ignored one costs nothing
    logits = torch.zeros(1, 3, 4)
    targets = torch.tensor([[1, IGNORE_INDEX, 3]])
    loss, count = token_cross_entropy_sum(logits, targets)
    assert count.item() == 2 and loss.item() == pytest.approx(2 * math.log(4))
    # probabilities (1/4, 3/4) for target 1: -log(3/4)
    loss, _ = token_cross_entropy_sum(torch.tensor([[[0.0, math.log(3)]]]), torch.tensor([[1]]))
    assert loss.item() == pytest.approx(-math.log(0.75))


def test_next_token_objective_returns_sum_and_valid_count():
    model = TinyLM()
    x = torch.randint(0, 32, (2, 8))
    y = x.clone()
    y[0, :5] = IGNORE_INDEX
    loss_sum, metrics = next_token_objective(model, (x, y))
    _, mean = model(x, targets=y)
    assert metrics["count"].item() == 11
    assert loss_sum.item() == pytest.approx(mean.item() * 11, rel=1e-6)
