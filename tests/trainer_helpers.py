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

    def __init__(self, vocab: int = VOCAB, d: int = 16, block: int = BLOCK):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets=None, reduction="mean"):
        h = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        h = h + torch.tanh(self.fc(self.ln(h)))
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
