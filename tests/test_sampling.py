"""Sampling functions checked against hand-derived numbers: filters keep exactly the right sets, the
repetition penalty follows CTRL's rule, a seed reproduces draws, bad parameters raise ScratchError."""

import math

import pytest
import torch

from scratchllm.common import ScratchError
from scratchllm.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    make_generator,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

# a hand-made distribution, deliberately not sorted: probabilities by token id
PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])
LOGITS = PROBS.log()[None]  # (1, 4)


def kept(logits):
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize("p, expected", [
    (0.4, {1}),  # 0.5 alone reaches 0.4
    (0.5, {1}),  # exactly reached by the top token
    (0.7, {1, 3}),  # 0.5 + 0.3 = 0.8 >= 0.7
    (0.85, {1, 3, 2}),  # 0.5 + 0.3 + 0.15 = 0.95
    (0.96, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    out = top_p_filter(LOGITS, p)
    assert kept(out) == expected
    assert torch.equal(out[0, list(expected)], LOGITS[0, list(expected)])  # survivors unchanged


def test_top_p_batched_rows_are_independent():
    other = torch.tensor([0.7, 0.1, 0.1, 0.1]).log()
    out = top_p_filter(torch.stack([LOGITS[0], other]), 0.6)
    assert kept(out[:1]) == {1, 3} and kept(out[1:]) == {0}


@pytest.mark.parametrize("m, expected", [
    (0.0, {0, 1, 2, 3}),
    (0.2, {1, 2, 3}),  # threshold 0.1: drops 0.05
    (0.35, {1, 3}),  # threshold 0.175: drops 0.15
    (0.61, {1}),  # threshold 0.305: drops 0.3
    (1.0, {1}),
])
def test_min_p_keeps_tokens_above_fraction_of_top(m, expected):
    assert kept(min_p_filter(LOGITS, m)) == expected


def test_top_k():
    assert kept(top_k_filter(LOGITS, 1)) == {1}
    assert kept(top_k_filter(LOGITS, 3)) == {1, 2, 3}
    assert kept(top_k_filter(LOGITS, 0)) == {0, 1, 2, 3}  # 0 = off
    assert kept(top_k_filter(LOGITS, 10)) == {0, 1, 2, 3}


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 1.5)
    # seen positive logits are divided, seen negative ones multiplied, unseen ones unchanged
    assert torch.allclose(out, torch.tensor([[2.0 / 1.5, -1.5, 3.0, 0.5]]))


def test_repetition_penalty_can_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    seen = torch.tensor([[True, False, False]])
    params = SamplingParams(temperature=0, repetition_penalty=1.5)  # 3 / 1.5 = 2 < 2.5
    assert sample(logits, params, seen=seen).tolist() == [1]
    assert sample(logits, SamplingParams(temperature=0)).tolist() == [0]


def test_temperature_scales_logits_and_zero_is_argmax():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.allclose(process_logits(logits, SamplingParams(temperature=0.5)), logits * 2)
    assert sample(logits, SamplingParams(temperature=0)).tolist() == [2]


def test_top_k_1_equals_greedy():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    gen = make_generator(1)
    drawn = sample(logits, SamplingParams(temperature=1.3, top_k=1), gen)
    assert torch.equal(drawn, logits.argmax(-1))


def test_fixed_seed_reproduces_samples_and_other_seeds_differ():
    logits = torch.zeros(4, 1000)  # uniform: any draw is allowed, so only the generator decides

    def draws(seed):
        gen = make_generator(seed)
        return [sample(logits, SamplingParams(temperature=1.0), gen).tolist() for _ in range(5)]

    assert draws(123) == draws(123)
    assert draws(123) != draws(124)


def test_samples_follow_the_filtered_distribution():
    # top_p 0.7 keeps tokens 1 and 3 (0.5 and 0.3): renormalised 0.625 / 0.375
    gen = make_generator(0)
    logits = LOGITS.expand(20000, 4)
    ids = sample(logits, SamplingParams(temperature=1.0, top_p=0.7), gen)
    counts = torch.bincount(ids, minlength=4).float() / len(ids)
    assert counts[0] == 0 and counts[2] == 0
    assert math.isclose(counts[1].item(), 0.625, abs_tol=0.02)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_p=1.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_parameters_raise_scratch_error_naming_the_field(kwargs, field):
    with pytest.raises(ScratchError, match=field):
        SamplingParams(**kwargs)
