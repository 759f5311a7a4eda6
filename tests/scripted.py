"""A stand-in for a GPT whose i-th new token is known in advance, for tests of generation loops.

`ScriptedModel(script, vocab_size)`: whatever the prompt, new token i (counted from the end of the
prompt) gets all the probability on script[i] (the last entry repeats). It follows the KVCache protocol
Engine uses (hidden_states / lm_head / forward with a cache), so the text an answer must become is
known before the engine runs.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchllm.model import ModelConfig


class ScriptedModel(nn.Module):
    def __init__(self, script: list[int], vocab_size: int, block_size: int = 256):
        super().__init__()
        self.config = ModelConfig(block_size=block_size, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=4)
        self.script = script
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads device and dtype from it
        self.prompt_len = 0

    def hidden_states(self, idx, kv_cache):
        B, T = idx.shape
        if kv_cache.pos == 0:
            self.prompt_len = T
        kv_cache.advance(T)
        return torch.full((B, T, 1), float(kv_cache.pos - self.prompt_len))  # (B, T, 1): the step index

    def lm_head(self, h):
        ids = torch.tensor(self.script)[h[..., 0].long().clamp(max=len(self.script) - 1)]
        return F.one_hot(ids, self.config.vocab_size).float() * 10  # (..., V)

    def forward(self, idx, kv_cache):
        return self.lm_head(self.hidden_states(idx, kv_cache))
