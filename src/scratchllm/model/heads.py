"""Heads on a GPT backbone: a sequence classifier (one hidden state per sequence -> class logits; one
"class" is a scalar score: a reward model).

What it does: `SequenceClassifier(backbone, num_classes, pool)` runs the backbone's final-norm hidden
states (GPT.hidden_states, never the lm_head) and a new `head = Linear(n_embd, num_classes)` on one
vector per sequence. `pool="last"` takes the last real (non-padding) token, the only position of a
causal model that has seen the whole text (the book's chapter 6 argument); `pool="mean"` averages the
real tokens. A padded batch takes `attention_mask` (B, T), 1 = token, 0 = padding, on either side.
`set_trainable(clf, mode, ...)` chooses what trains: "head" (only the new head), "last-block" (the
head, the last N blocks and the final norm: the book's choice), "all", or "lora" (adapters on the
backbone's Linear layers, model/lora.py, plus the head). Everything else is frozen, so it gets no
gradient, no optimizer state and, below the first trainable layer, no backward pass at all.
What it does not do: load weights or tokenize (infer/classifier.py, train/classify.py).

    >>> clf = SequenceClassifier(GPT(ModelConfig.from_preset("tiny")), num_classes=2)
    >>> clf = set_trainable(clf, "last-block", n_blocks=1)
    >>> clf(idx, attention_mask=mask).shape                     # (B, 2)
"""

from __future__ import annotations

import torch
from torch import nn

from scratchllm.common import ScratchError
from scratchllm.configs import TRAINABLE
from scratchllm.model.gpt import GPT
from scratchllm.model.lora import apply_lora

POOLS = ("last", "mean")


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last 1 in a (B, T) mask, whatever side the padding is on.

    >>> last_real_index(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    tensor([1, 2])
    """
    T = attention_mask.size(1)
    return T - 1 - attention_mask.long().flip(1).argmax(1)  # argmax finds the first 1 from the right


def pool_hidden(h: torch.Tensor, attention_mask: torch.Tensor | None, pool: str) -> torch.Tensor:
    """(B, T, C) hidden states -> (B, C): the last real token's state, or the mean over real tokens."""
    if attention_mask is None:
        return h[:, -1] if pool == "last" else h.mean(1)
    if pool == "last":
        return h[torch.arange(h.size(0), device=h.device), last_real_index(attention_mask)]  # (B, C)
    m = attention_mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: GPT, num_classes: int, pool: str = "last"):
        super().__init__()
        if pool not in POOLS:
            raise ScratchError(f"pool {pool!r}: expected one of {', '.join(POOLS)}")
        if not 1 <= num_classes <= 2**16:
            raise ScratchError(f"a classifier needs 2 to 65536 classes (1: a scalar score), got {num_classes}")
        self.backbone, self.pool, self.num_classes = backbone, pool, num_classes
        self.head = nn.Linear(backbone.config.n_embd, num_classes)

    @property
    def config(self):
        return self.backbone.config

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits (B, num_classes) of token ids idx (B, T)."""
        mask = attention_mask
        if mask is not None and bool((mask[:, 1:] <= mask[:, :-1]).all()):
            # right padding only: causal attention already keeps real tokens from seeing the pads after
            # them, and their positions start at 0, so the plain (faster) causal path gives the same states
            mask_for_backbone = None
        else:
            mask_for_backbone = mask
        h = self.backbone.hidden_states(idx, attention_mask=mask_for_backbone)  # (B, T, n_embd)
        return self.head(pool_hidden(h, mask, self.pool))  # (B, num_classes)


def set_trainable(clf: SequenceClassifier, mode: str, n_blocks: int = 1, lora: dict | None = None) -> SequenceClassifier:
    """Freeze all of `clf` but what `mode` trains (see the module doc); `lora` = {"rank", "alpha",
    "dropout", "targets"} for mode "lora". Returns clf."""
    if mode not in TRAINABLE:
        raise ScratchError(f"--train {mode!r}: expected one of {', '.join(TRAINABLE)}")
    backbone = clf.backbone
    clf.requires_grad_(mode == "all")
    if mode == "all" and backbone.lm_head.weight is not backbone.transformer.wte.weight:
        backbone.lm_head.requires_grad_(False)  # an untied LM head is not used by a classifier
    if mode == "last-block":
        blocks = backbone.transformer.h
        if not 1 <= n_blocks <= len(blocks):
            raise ScratchError(f"--train-blocks {n_blocks}: the model has {len(blocks)} blocks")
        for block in blocks[len(blocks) - n_blocks:]:
            block.requires_grad_(True)
        backbone.transformer.ln_f.requires_grad_(True)
    if mode == "lora":
        if not lora:
            raise ScratchError("--train lora needs the LoRA settings (rank, alpha, dropout, targets)")
        apply_lora(backbone, lora["rank"], lora["alpha"], lora.get("dropout", 0.0), tuple(lora["targets"]))
    clf.head.requires_grad_(True)
    return clf
