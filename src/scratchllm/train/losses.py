"""The losses of preference tuning as small pure functions: DPO, IPO, the Bradley-Terry reward loss,
and PPO's pieces (GAE, clipped policy and value losses, KL penalties, whitening).

What it does: each function takes tensors and returns tensors, its equation in its docstring, so each
can be checked against numbers worked out by hand (tests/test_losses.py). Conventions: a "mask" is 1
on the response tokens that count and 0 elsewhere (prompt, padding); log-probs are natural logs;
masked means divide by the number of masked-in entries. `sequence_logprobs` is the one function that
runs a model: it asks it for per-token losses (GPT's fused output layer + cross-entropy), so the
(B, T, vocab) logits are never materialised.
What it does not do: batching, reference models or optimisation (the stages: reward, dpo, ppo).

    pi_c, _ = sequence_logprobs(policy, chosen_ids, chosen_mask)        # (B,) summed log-probs
    losses, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)      # (B,) each; ln 2 when pi == ref
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scratchllm.common import IGNORE_INDEX


def sequence_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) over the masked tokens of log p(ids[t] | ids[<t]), each (B,). ids, mask (B, T); mask[t]
    = 1 when token t is a response token (mask[:, 0] is never used: the first token has no prediction).
    A row with no masked token gets sum 0 and mean 0."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)  # (B, T-1)
    am = attention_mask[:, :-1] if attention_mask is not None else None
    _, nll = model(ids[:, :-1], targets=targets, reduction="none", attention_mask=am)  # (B, T-1), 0 where ignored
    total = -nll.sum(-1)  # (B,)
    return total, total / mask[:, 1:].sum(-1).clamp(min=1)


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) per pair: with h = beta * ((pi_c - ref_c) - (pi_r - ref_r)),
    loss = -(1 - eps) log sigmoid(h) - eps log sigmoid(-h) (eps = label_smoothing: the conservative
    DPO of noisy labels). Returns (losses, chosen rewards, rejected rewards), the implicit rewards
    beta * (pi - ref), detached. pi == ref gives ln 2 and zero rewards."""
    chosen, rejected = pi_chosen - ref_chosen, pi_rejected - ref_rejected  # (B,) log-ratios
    h = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, tau: float) -> torch.Tensor:
    """IPO (Azar et al. 2023) per pair: ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 tau))^2, a squared
    loss that pulls the log-ratio gap to 1 / (2 tau) instead of pushing it without bound."""
    gap = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    return (gap - 1 / (2 * tau)) ** 2


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2 (the
    second term keeps the rewards centred on 0; margin, when given, asks for a gap of at least it)."""
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    return -F.logsigmoid(diff) + center_coef * (r_chosen + r_rejected) ** 2


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / sum(mask) (0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with the masked mean and (biased) variance; shift_mean=False adds the
    mean back (only the scale changes). Entries outside the mask are returned as computed, not zeroed."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs: k1 = logp -
    ref_logp (unbiased, can be negative); k3 = (r - 1) - log r with r = exp(ref_logp - logp)
    (unbiased and never negative, Schulman's k3)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_r = ref_logp - logp
        return torch.expm1(log_r) - log_r
    raise ValueError(f"kl kind {kind!r}: expected k1 or k3")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. rewards, values, mask (B, T); mask 1 on
    the tokens of the response (a prefix of each row's masked run: no holes). With delta_t = r_t +
    gamma V_{t+1} - V_t (V = 0 after the last response token), A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages, returns = advantages + values), 0 outside the mask."""
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        next_value = torch.where(m > 0, values[:, t], torch.zeros_like(next_value))
        next_adv = adv[:, t]
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    clip: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, masked mean of max(-A ratio, -A clip(ratio, 1 - clip, 1 + clip)) with
    ratio = exp(logp - old_logp). Also {"clip_frac": share of tokens where the clipped term won,
    "approx_kl": masked mean of (ratio - 1) - log ratio} (both detached)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_frac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float = 0.2) -> torch.Tensor:
    """PPO's clipped value loss: masked mean of 0.5 max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)
