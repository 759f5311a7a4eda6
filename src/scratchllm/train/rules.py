"""Rule rewards for `scratchllm ppo --reward MODULE:FN`: tasks whose best answer is known, so PPO can be
checked (does the mean reward climb to the optimum, and at what KL?).

What it does: each rule is `fn(prompt, response) -> float`, the response being the decoded answer
without its end-of-turn token. Write your own in any module on the Python path (the current folder
is searched first) with the same signature.
What it does not do: learned rewards (train/reward.py).

    scratchllm ppo --model runs/sft/best --reward scratchllm.train.rules:short_answer --prompts data:instruction-data --out runs/ppo-short
"""

from __future__ import annotations

SHORT_WORDS = 5


def short_answer(prompt: str, response: str) -> float:
    """1 for a non-empty answer of at most 5 words, 5 / words for a longer one, 0 for an empty one:
    the optimum (1.0) is any answer of 1 to 5 words.

    >>> short_answer("Capital of France?", "Paris."), short_answer("q", "one two three four five six seven eight nine ten")
    (1.0, 0.5)
    """
    n = len(response.split())
    if n == 0:
        return 0.0
    return 1.0 if n <= SHORT_WORDS else SHORT_WORDS / n
