"""Test doubles for the Trainer tests: a tiny tied-embedding language model and a resumable batch source.

They stand in for the GPT and the data samplers so the Trainer's tests stay fast and independent of
other packages; tests of the real pretraining path live in test_pretrain*.py.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchllm.train.objectives import token_cross_entropy_sum

VOCAB, BLOCK = 32, 8


class TinyLM(nn.Module):
    """Embedding -> one residual MLP -> tied lm_head; forward(idx, targets, reduction) like GPT."""

    def __init__(self, vocab: int = VOCAB, d: int = 16, block: int = BLOCK, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout(dropout)  # consumes the torch RNG: resume must restore it
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets=None, reduction="mean"):
        h = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        h = h + self.drop(torch.tanh(self.fc(self.ln(h))))
        logits = self.lm_head(h)  # (B, T, V)
        if targets is None:
            return logits
        loss_sum, n = token_cross_entropy_sum(logits, targets)
        return logits, loss_sum if reduction == "sum" else loss_sum / n


class CountingBatches:
    """Batch k is a pure function of (seed, k): random (x, y) with y = x shifted by one."""

    def __init__(self, batch_size: int = 4, block: int = BLOCK, seed: int = 0, vocab: int = VOCAB):
        self.batch_size, self.block, self.seed, self.vocab, self.k = batch_size, block, seed, vocab, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.k)
        self.k += 1
        seq = torch.randint(0, self.vocab, (self.batch_size, self.block + 1), generator=g)
        return seq[:, :-1], seq[:, 1:]

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


def main(argv=None):
    """`python trainer_helpers.py OUT [--resume] [--max-steps N] [--sleep S]`: a run for subprocess tests."""
    import argparse
    import time

    from scratchllm.configs import TrainConfig
    from scratchllm.train import stage
    from scratchllm.train.core import Trainer
    from scratchllm.train.objectives import next_token_objective

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--max-steps", type=int, default=30)
    ap.add_argument("--sleep", type=float, default=0.0)
    a = ap.parse_args(argv)

    class Slow(CountingBatches):
        def next_batch(self):
            time.sleep(a.sleep)
            return super().next_batch()

    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=a.max_steps, lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_every=7, checkpoint_every=5,
                      keep_last=2, precision="fp32", device="cpu", compile="off")
    val = lambda: iter([CountingBatches(seed=9).next_batch() for _ in range(2)])  # noqa: E731
    t = Trainer(TinyLM(dropout=0.2), cfg, next_token_objective, Slow(), out_dir=a.out, val_batches=val)
    if a.resume:
        t.resume(a.out)
    return stage.finish(t.fit())  # the exit code a stage's command returns


if __name__ == "__main__":
    raise SystemExit(main())
