"""Growing a GPT's vocabulary for new special tokens: new embedding (and untied head) rows.

What it does: `grow_vocab(model, vocab_size, first_new)` makes rows first_new .. vocab_size-1 of the
token embedding the mean of rows 0 .. first_new-1 (and of the output head's rows, when it is not tied
to the embedding), growing both matrices when vocab_size is larger than the model's; the ids below
first_new never move and keep their rows. The mean keeps the new tokens' logits ordinary at first (a
random row could dominate the softmax). `model.config.vocab_size` follows.
What it does not do: add the tokens to a tokenizer (Tokenizer.add_special_tokens does) or train them.

    new_ids = tokenizer.add_special_tokens(["<|user|>", "<|assistant|>"])
    grow_vocab(model, max(tokenizer.vocab_size, model.config.vocab_size), first_new=new_ids[0])
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

from scratchllm.common import ScratchError


@torch.no_grad()
def _grown(weight: torch.Tensor, vocab_size: int, first_new: int) -> torch.Tensor:
    """A (vocab_size, C) copy of weight (V, C): rows < first_new kept, the others their mean."""
    out = torch.empty(vocab_size, weight.shape[1], dtype=weight.dtype, device=weight.device)
    out[:first_new] = weight[:first_new]
    out[first_new:] = weight[:first_new].float().mean(0).to(weight.dtype)  # (C,) broadcast to the new rows
    return out


def grow_vocab(model: nn.Module, vocab_size: int, first_new: int) -> nn.Module:
    """New rows first_new .. vocab_size-1 (mean-initialised) in the embedding and an untied lm_head."""
    V = model.config.vocab_size
    if not 0 < first_new <= min(V, vocab_size) or vocab_size < V:
        raise ScratchError(f"grow_vocab: cannot give ids {first_new}..{vocab_size - 1} new rows in a model with "
                           f"{V} (the new ids must follow existing ones, and a vocabulary only grows)")
    wte, head = model.transformer.wte, model.lm_head
    tied = head.weight is wte.weight
    model.transformer.wte = nn.Embedding(vocab_size, wte.embedding_dim, _weight=nn.Parameter(
        _grown(wte.weight, vocab_size, first_new), requires_grad=wte.weight.requires_grad))
    model.lm_head = nn.Linear(head.in_features, vocab_size, bias=False, device="meta")  # its weight comes next
    model.lm_head.weight = model.transformer.wte.weight if tied else nn.Parameter(
        _grown(head.weight, vocab_size, first_new), requires_grad=head.weight.requires_grad)
    model.config = replace(model.config, vocab_size=vocab_size)
    return model
