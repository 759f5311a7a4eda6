"""Hermetic inputs for the SFT tests: a toy instruction set (the book's record shape), a tiny random GPT
saved with tiny_chat_tokenizer (ChatML specials) as a model folder, and a helper that runs
`scratchllm sft` in-process.

The toy records pair a question about one of a few words with a one- or two-word answer, so a 2-block x
32-wide model fits them in a few dozen steps on a CPU. Nothing here downloads anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["cat", "dog", "sun", "sea", "tree", "fox", "bird", "rain"]
ANSWERS = {"cat": "meow", "dog": "woof", "sun": "hot", "sea": "salt water", "tree": "green", "fox": "quick",
           "bird": "sings", "rain": "wet"}
TINY = dict(block_size=128, vocab_size=300, n_layer=2, n_head=2, n_embd=32)
FAST = ["--precision", "fp32", "--device", "cpu", "--no-compile", "--seed", "7"]


def toy_records(n: int = 24) -> list[dict]:
    """n Alpaca-style records: every third one has an "input" (the book's data has both kinds)."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        if i % 3 == 2:
            out.append({"instruction": "Describe the word.", "input": w, "output": ANSWERS[w]})
        else:
            out.append({"instruction": f"What about the {w}?", "input": "", "output": ANSWERS[w]})
    return out


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def base_model(tokenizer, folder: Path, chat=None, seed: int = 0, **overrides) -> Path:
    """Save a random tiny GPT (TINY + overrides) with `tokenizer` (and chat.json) as a model folder."""
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.weights.folder import save_model

    torch.manual_seed(seed)
    return save_model(GPT(ModelConfig(**{**TINY, **overrides})), tokenizer, folder, chat=chat)


def sft_args(base, data, out, *extra, steps: int = 4, batch: int = 2) -> list[str]:
    """`scratchllm sft` arguments for a short full fine-tuning run (sample answers off)."""
    return ["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", str(batch), "--lr", "1e-3", "--eval-every", str(steps), "--samples", "0",
            "--checkpoint-every", str(steps), *FAST, *map(str, extra)]


def cli(*argv) -> int:
    """`scratchllm ARGV` in this process (errors print `error: ...` and return 2, as for a user)."""
    from scratchllm.cli import main

    return main([str(a) for a in argv])


def records(run: Path, split: str | None = None) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]
