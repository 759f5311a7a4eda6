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


def reward_objective(model, batch, center_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Reward model on preference pairs: the Bradley-Terry loss (losses.bradley_terry_loss) of the scalar
    scores of the B chosen and B rejected rows of `batch` (data/collate.collate_pairs), summed over the
    pairs, with pairwise accuracy (r_chosen > r_rejected), the mean margin, the mean chosen and rejected
    scores and the scores' mean and mean square over all 2B answers. Example: a model scoring every
    row 0 on 3 pairs -> (3 ln 2, {"count": 3, "accuracy": 0, ...})."""
    from scratchllm.train.losses import bradley_terry_loss

    scores = model(batch["idx"], attention_mask=batch["attention_mask"]).squeeze(-1).float()  # (2B,)
    B = scores.shape[0] // 2
    chosen, rejected = scores[:B], scores[B:]
    losses = bradley_terry_loss(chosen, rejected, center_coef=center_coef)
    return losses.sum(), {"count": B, "tokens": batch["tokens"], "accuracy": (chosen > rejected).sum(),
                          "margin": (chosen - rejected).sum(), "rewards/chosen": chosen.sum(),
                          "rewards/rejected": rejected.sum(), "reward_mean": (scores.sum(), 2 * B),
                          "reward_sq": ((scores ** 2).sum(), 2 * B)}


def reward_std(metrics: dict) -> dict:
    """The scores' standard deviation from their reduced mean and mean square (a derived_metrics hook)."""
    return {"reward_std": math.sqrt(max(metrics["reward_sq"] - metrics["reward_mean"] ** 2, 0.0))}


def dpo_objective(model, batch, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
                  logp_mean: bool = False, ref=None) -> tuple[torch.Tensor, dict]:
    """DPO (or IPO) on preference pairs: the policy's log-probs of the B chosen and B rejected answers of
    `batch` (data/collate.collate_pairs; summed over the answer's tokens, or averaged with logp_mean)
    against the reference's: batch["ref"] (B, 2) when precomputed, else the frozen model `ref`, else the
    policy itself with its LoRA adapters off. Loss summed over pairs; metrics under the names TRL
    prints: rewards/chosen and rewards/rejected (beta * (pi - ref)), rewards/margins, rewards/accuracies
    (chosen reward > rejected), logps/chosen, logps/rejected. With pi == ref: ln 2 per pair, rewards 0."""
    from scratchllm.model.lora import disable_lora
    from scratchllm.train.losses import dpo_loss, ipo_loss, sequence_logprobs

    idx, mask = batch["idx"], batch["mask"]
    pick = 1 if logp_mean else 0
    pi = sequence_logprobs(model, idx, mask)[pick].float()  # (2B,)
    B = pi.shape[0] // 2
    if "ref" in batch:
        ref_c, ref_r = batch["ref"][:, 0].float(), batch["ref"][:, 1].float()
    else:
        with torch.no_grad():
            if ref is not None:
                r = sequence_logprobs(ref, idx, mask)[pick].float()
            else:
                with disable_lora(model):
                    r = sequence_logprobs(model, idx, mask)[pick].float()
        ref_c, ref_r = r[:B], r[B:]
    pi_c, pi_r = pi[:B], pi[B:]
    if loss == "ipo":
        losses = ipo_loss(pi_c, pi_r, ref_c, ref_r, tau=beta)
        r_c, r_r = beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()
    else:
        losses, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing)
    return losses.sum(), {"count": B, "tokens": batch["tokens"], "rewards/chosen": r_c.sum(),
                          "rewards/rejected": r_r.sum(), "rewards/margins": (r_c - r_r).sum(),
                          "rewards/accuracies": (r_c > r_r).sum(), "logps/chosen": pi_c.detach().sum(),
                          "logps/rejected": pi_r.detach().sum()}
