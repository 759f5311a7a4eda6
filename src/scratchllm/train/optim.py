"""AdamW with weight-decay parameter groups, and learning-rate schedules as pure functions of the step.

What it does: `build_optimizer` puts every trainable tensor with >= 2 dims (matmul weights, embeddings)
in a group with weight decay and every other tensor (biases, norm gains) in a group without, and uses
PyTorch's fused AdamW where the device supports it. `lr_at` gives the learning rate of a step:
linear warmup, then cosine (or linear) decay to a floor, or a constant.
What it does not do: step the optimizer or own any state; the Trainer sets `group["lr"]` each step from
`lr_at`, so resuming needs only the step number.

    opt = build_optimizer(model, lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95))
    for step in range(max_steps):
        lr = lr_at(step, max_lr=6e-4, warmup_steps=100, max_steps=max_steps, min_lr=6e-5)
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("cosine", "linear", "constant")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: tensors with >= 2 dims decay, the rest (biases, norm weights) do not.

    A tied embedding/lm_head weight appears once (named_parameters de-duplicates shared tensors).
    Example: Linear(4, 3) -> weight (3, 4) decays, bias (3,) does not.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, weight_decay)`; fused by default when every parameter lives on
    CUDA or CPU (both have a fused kernel in torch >= 2.4), which is faster and deterministic."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        devices = {p.device.type for g in groups for p in g["params"]}
        fused = bool(devices) and devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def lr_at(step: int, *, max_lr: float, warmup_steps: int, max_steps: int, schedule: str = "cosine",
          min_lr: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Warmup: steps 0..warmup_steps-1 ramp linearly, lr = max_lr * (step + 1) / warmup_steps.
    Then, with p = (step - warmup_steps) / (max_steps - warmup_steps) clipped to [0, 1]:
      cosine:   min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2
      linear:   max_lr - (max_lr - min_lr) * p
      constant: max_lr
    Example: max_lr=1, warmup_steps=2, max_steps=6, min_lr=0, cosine, steps 0..6 give
    0.5, 1, 1, 0.854, 0.5, 0.146, 0 (p = 0, .25, .5, .75, 1 after warmup); see tests/test_optim.py.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {SCHEDULES}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    decay_steps = max(max_steps - warmup_steps, 1)
    p = min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)
    if schedule == "linear":
        return max_lr - (max_lr - min_lr) * p
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
