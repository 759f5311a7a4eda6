"""train/losses.py: each preference-tuning loss against numbers worked out by hand (in the comments),
and sequence_logprobs against log_softmax of the model's full logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from scratchllm.model import GPT, ModelConfig
from scratchllm.train.losses import (
    bradley_terry_loss,
    dpo_loss,
    gae,
    ipo_loss,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    whiten,
)

t = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_dpo_loss_by_hand():
    # policy == reference: h = 0, loss = -log sigmoid(0) = ln 2, rewards 0
    losses, rc, rr = dpo_loss(t([-5.0, -1.0]), t([-7.0, -2.0]), t([-5.0, -1.0]), t([-7.0, -2.0]), beta=0.1)
    assert close(losses, [math.log(2)] * 2) and close(rc, [0, 0]) and close(rr, [0, 0])
    # log-ratios chosen +1, rejected -1, beta 0.5: h = 0.5 * 2 = 1, loss = log(1 + e^-1) = 0.313262
    losses, rc, rr = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5)
    assert close(losses, [0.313262]) and close(rc, [0.5]) and close(rr, [-0.5])
    # label smoothing 0.1: 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = 0.281936 + 0.131326 = 0.413262
    losses, _, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, label_smoothing=0.1)
    assert close(losses, [0.413262])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pi_c, pi_r = t([-2.0], requires_grad=True), t([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pi_c, pi_r, t([-2.0]), t([-2.0]), beta=0.1)
    losses.sum().backward()
    # d/dpi_c of -log sigmoid(beta (pi_c - pi_r)) at 0 = -beta * sigmoid(0) = -0.05; +0.05 for pi_r
    assert close(pi_c.grad, [-0.05]) and close(pi_r.grad, [0.05])


def test_ipo_loss_by_hand():
    # gap (1 - (-1)) = 2; tau 0.25 -> target 1 / (2 tau) = 2 -> 0; tau 0.5 -> target 1 -> (2 - 1)^2 = 1
    args = t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0])
    assert close(ipo_loss(*args, tau=0.25), [0.0]) and close(ipo_loss(*args, tau=0.5), [1.0])


def test_bradley_terry_by_hand():
    assert close(bradley_terry_loss(t([2.0]), t([0.0])), [math.log(1 + math.exp(-2))])  # 0.126928
    assert close(bradley_terry_loss(t([2.0]), t([0.0]), margin=t([2.0])), [math.log(2)])
    # centring: + 0.1 * (2 + 0)^2 = 0.4
    assert close(bradley_terry_loss(t([2.0]), t([0.0]), center_coef=0.1), [0.126928 + 0.4])


def test_kl_penalties_by_hand():
    logp, ref = t([-1.0, -2.0]), t([-2.0, -2.0])
    assert close(kl_penalty(logp, ref, "k1"), [1.0, 0.0])
    # k3 with log r = ref - logp = -1: e^-1 - 1 + 1 = 0.367879; equal log-probs: 0
    assert close(kl_penalty(logp, ref, "k3"), [math.exp(-1), 0.0])
    assert (kl_penalty(t([-3.0, 0.0]), t([-1.0, -4.0]), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref, "k2")


def test_whiten_and_masked_mean_by_hand():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    assert close(masked_mean(x, mask), 2.0) and close(masked_mean(x, torch.zeros(4)), 0.0)
    sd = math.sqrt(2 / 3)  # masked variance of 1, 2, 3 (biased)
    assert close(whiten(x, mask), [-1 / sd, 0.0, 1 / sd, 98 / sd], tol=1e-4)
    assert close(whiten(x, mask, shift_mean=False)[:3], [2 - 1 / sd, 2.0, 2 + 1 / sd], tol=1e-4)


def test_gae_by_hand():
    rewards, values = t([[0.0, 0.0, 1.0]]), t([[0.5, 0.5, 0.5]])
    mask = torch.ones(1, 3)
    # lam 1, gamma 1: deltas (0, 0, 0.5) -> A = (0.5, 0.5, 0.5): the Monte Carlo return 1 minus V
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert close(adv, [[0.5, 0.5, 0.5]]) and close(ret, [[1.0, 1.0, 1.0]])
    # lam 0.5: A2 = 0.5, A1 = 0 + 0.5 * 0.5 = 0.25, A0 = 0.125
    adv, _ = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[0.125, 0.25, 0.5]])
    # a prompt token before and padding after: the response (t = 1, 2) alone; V after its end is 0
    # gamma 0.9, lam 1: delta2 = 2 - 1 = 1, delta1 = 0 + 0.9 * 1 - 1 = -0.1, A1 = -0.1 + 0.9 * 1 = 0.8
    adv, ret = gae(t([[9.0, 0.0, 2.0, 9.0]]), t([[9.0, 1.0, 1.0, 9.0]]), t([[0.0, 1.0, 1.0, 0.0]]), 0.9, 1.0)
    assert close(adv, [[0.0, 0.8, 1.0, 0.0]]) and close(ret, [[0.0, 1.8, 2.0, 0.0]])


def test_ppo_policy_loss_by_hand():
    mask = torch.ones(1, 2)
    # ratio 1: loss = -mean(A) = -(1 + 3) / 2; nothing clipped; approx KL 0
    loss, stats = ppo_policy_loss(t([[-1.0, -2.0]]), t([[-1.0, -2.0]]), t([[1.0, 3.0]]), mask)
    assert close(loss, -2.0) and close(stats["clip_frac"], 0.0) and close(stats["approx_kl"], 0.0)
    # ratio e^0.5 = 1.648721: with A = 1 the clipped term -1.2 wins; with A = -1 the unclipped 1.648721
    loss, stats = ppo_policy_loss(t([[0.5, 0.5]]), t([[0.0, 0.0]]), t([[1.0, -1.0]]), mask, clip=0.2)
    assert close(loss, (-1.2 + 1.648721) / 2) and close(stats["clip_frac"], 0.5)
    assert close(stats["approx_kl"], math.exp(0.5) - 1 - 0.5)  # (ratio - 1) - log ratio


def test_ppo_value_loss_by_hand():
    # v = 1, old 0, R = 2, clip 0.2: (1 - 2)^2 = 1 vs (0.2 - 2)^2 = 3.24 -> 0.5 * 3.24
    assert close(ppo_value_loss(t([[1.0]]), t([[0.0]]), t([[2.0]]), torch.ones(1, 1), clip=0.2), 1.62)
    # inside the clip range both terms agree: 0.5 * (0.1 - 2)^2
    assert close(ppo_value_loss(t([[0.1]]), t([[0.0]]), t([[2.0]]), torch.ones(1, 1), clip=0.2), 0.5 * 1.9 ** 2)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_sequence_logprobs_equal_log_softmax_of_the_logits(positions):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=50, n_layer=1, n_embd=32, n_head=2, positions=positions))
    ids = torch.randint(0, 50, (2, 7))
    mask = t([[0, 0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]])
    total, mean = sequence_logprobs(model, ids, mask)
    logp = F.log_softmax(model(ids[:, :-1]).float(), -1).gather(-1, ids[:, 1:, None])[..., 0]  # (2, 6)
    want = (logp * mask[:, 1:]).sum(-1)
    assert close(total, want, 1e-4) and close(mean, want / mask[:, 1:].sum(-1), 1e-4)
    total.sum().backward()  # differentiable, through the fused output layer
    assert model.transformer.wte.weight.grad is not None
