"""Hermetic inputs for the pretraining tests: a synthetic corpus (a fixed LCG picks words, so the text
is the same on every machine and Python version), a byte-level tokenizer (vocab 257:
the 256 bytes + <|endoftext|>, no merges, so it does not depend on the BPE trainer), its shards, and a
helper that runs `scratchllm pretrain` in-process."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the model reads tokens and predicts the next one while the loss falls slowly over many "
         "steps of training on small text with a fixed seed so every run is the same").split()


def corpus(n_words: int = 30_000) -> str:
    state, out = 12345, []
    for i in range(n_words):
        state = (1103515245 * state + 12345) % 2**31
        out.append(WORDS[(state >> 16) % len(WORDS)])
        if i % 12 == 11:
            out.append(".\n")
    return " ".join(out)


def make_inputs(root: Path) -> dict:
    """{corpus, tokenizer, shards} paths under root (built once per test module)."""
    from scratchllm.data.shards import prepare
    from scratchllm.tokenizer import Tokenizer

    text = root / "corpus.txt"
    text.write_text(corpus())
    tok = Tokenizer({bytes([i]): i for i in range(256)}, "gpt2", {"<|endoftext|>": 256}, name="bytes")
    tok.save(root / "tok")
    prepare([str(text)], tok, root / "shards", val_fraction=0.1, progress=False)
    return {"corpus": text, "tokenizer": root / "tok", "shards": root / "shards"}


SMALL_TOML = """
model_preset = "tiny"
block_size = 32
[model_overrides]
n_layer = 2
n_head = 2
n_embd = 32
[train]
batch_size = 4
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2
precision = "fp32"
device = "cpu"
compile = "off"
eval_every = 4
eval_batches = 2
checkpoint_every = 4
seed = 1234
"""


def pretrain(*argv: str) -> int:
    """Run `scratchllm pretrain ARGV` in this process; ScratchError propagates (no CLI catch)."""
    from scratchllm.cli import build_parser

    args = build_parser().parse_args(["pretrain", *argv])
    return args.func(args)
