"""Training objectives: `(model, batch) -> (loss_sum, metrics)` functions the Trainer runs.

The contract every stage follows: an objective returns the SUM of its per-item losses over the
micro-batch and `metrics["count"]`, the number of items that sum covers (valid targets for language
modelling). The Trainer adds up sums and counts over all micro-batches (and ranks) of an optimizer
step and divides once, so a step's loss is the mean over all of the step's valid targets however the
step is split into micro-batches. Other metrics are sums as well (the Trainer reports them / count).
What it does not do: any optimizer or device work; batches arrive already on the model's device.

    loss_sum, metrics = next_token_objective(model, (x, y))   # x, y: (B, T) int64
    loss = loss_sum / metrics["count"]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from scratchllm.common import IGNORE_INDEX


def token_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i -log softmax(logits_i)[targets_i] over targets != IGNORE_INDEX, and how many there were.

    logits (B, T, V), targets (B, T) -> (scalar fp32 sum, scalar int64 count). Computed in fp32.
    Example: logits all zero over V=4 and one valid target -> (log 4, 1).
    """
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)),  # (B*T, V)
                           targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (targets != IGNORE_INDEX).sum()


def next_token_objective(model, batch) -> tuple[torch.Tensor, dict]:
    """Pretraining: predict token t+1 from tokens <= t. `batch` is (idx, targets), both (B, T) int64,
    targets already shifted by one (the data loaders do that). The model computes the loss itself
    (`model(idx, targets=..., reduction="sum")`), which lets it chunk the lm_head + cross-entropy."""
    idx, targets = batch
    _, loss_sum = model(idx, targets=targets, reduction="sum")
    return loss_sum, {"count": (targets != IGNORE_INDEX).sum()}


def perplexity(metrics: dict) -> dict:
    """exp(mean loss): the language-modelling view of a per-token loss (capped so it stays finite).
    A `derived_metrics` hook of the Trainer: it sees the reduced metrics and adds {"ppl": ...}."""
    return {"ppl": math.exp(min(metrics["loss"], 50.0))}


def classification_objective(model, batch) -> tuple[torch.Tensor, dict]:
    """Classification: cross-entropy of the class logits, summed over the batch, and the number of
    correct argmax predictions (the Trainer reports it per item: accuracy). `batch` is a dict of
    "idx" (B, T), "attention_mask" (B, T) and "labels" (B,). Example: logits all zero over 2 classes
    for 3 items -> (3 log 2, {"count": 3, ...})."""
    logits = model(batch["idx"], attention_mask=batch["attention_mask"])  # (B, num_classes)
    labels = batch["labels"]
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, {"count": labels.numel(), "tokens": batch["attention_mask"].sum(),
                  "accuracy": (logits.argmax(-1) == labels).sum()}


def masked_lm_objective(model, batch) -> tuple[torch.Tensor, dict]:
    """Fine-tuning on chosen tokens (SFT): next-token cross-entropy summed over the targets that are not
    IGNORE_INDEX (the assistant's answers), counted in "count"; "tokens" counts every real input token.
    `batch` is data/collate.collate_lm's: "idx" and "targets" (B, T), "tokens" (the real ones), and
    "attention_mask" (B, T) for packed rows (1, 2, ... = the examples of a row, 0 = padding). Example:
    a model whose logits are all zero over V=4 with two trained targets -> (2 log 4, {"count": 2, ...})."""
    idx, targets = batch["idx"], batch["targets"]
    _, loss_sum = model(idx, targets=targets, reduction="sum", attention_mask=batch.get("attention_mask"))
    return loss_sum, {"count": (targets != IGNORE_INDEX).sum(), "tokens": batch["tokens"]}
