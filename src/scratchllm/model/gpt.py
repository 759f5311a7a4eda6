"""The GPT: token + position embeddings, n_layer pre-norm transformer blocks, a final norm and a head.

What it does: the math of GPT-2 (LayerNorm, learned positions, 4x GELU MLP, multi-head causal
attention) with switches for the Llama-style variant (RMSNorm, rotary positions, SwiGLU, grouped-query
attention) and for the lab's comparisons (a ReLU MLP, post-norm blocks: lab/). Attention has two
implementations picked by `config.attention`: "naive" (the explicit
QK^T / mask / softmax of the book's chapter 3) and "sdpa" (`F.scaled_dot_product_attention`, which uses
flash kernels on GPUs); they agree to 1e-5 in fp32. Parameter names are GPT-2's (`transformer.wte`,
`transformer.h.0.attn.c_attn`, ...), stored as nn.Linear weights (out, in).
What it does not do: any I/O, printing, optimisation or HF imports (see weights/, train/, infer/).

    >>> model = GPT(ModelConfig.from_preset("tiny"))
    >>> logits = model(torch.zeros(2, 8, dtype=torch.long))            # (2, 8, vocab_size)
    >>> _, loss = model(idx, targets=idx_shifted)                       # mean CE, IGNORE_INDEX skipped
    >>> logits = model(idx, kv_cache=KVCache(model.config, 2, 64))     # cached, see kv_cache.py
    >>> logits = model(idx, attention_mask=mask)   # padded batch: mask (B, T), 1 = token, 0 = padding
    >>> logits = model(idx, attention_mask=seg)    # packed batch: seg (B, T), 1, 2, ... per example, 0 = padding
    >>> _, nll = model(idx, targets=tgt, reduction="none")              # (B, T) -log p(target)
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchllm.common import ScratchError
from scratchllm.model.config import ModelConfig
from scratchllm.model.kv_cache import KVCache, segment_causal_mask
from scratchllm.model.loss import linear_cross_entropy


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles pos * theta^(-2i/head_dim), i < head_dim/2.

    positions (T,) -> (T, head_dim/2); positions (B, T) -> (B, 1, T, head_dim/2) (broadcasts over heads).
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., T, head_dim/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + head_dim/2]) of x (B, h, T, head_dim) by the angles (Llama's layout)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, h, T, head_dim/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.naive = config.attention == "naive"
        self.dropout = config.dropout
        # one fused projection for queries, keys and values: (n_head + 2 * n_kv_head) * head_dim outputs
        qkv_dim = (self.n_head + 2 * self.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias or config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache: KVCache | None = None, mask=None):
        B, T, C = x.shape
        nh, nkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hd, nkv * hd, nkv * hd], dim=2)
        q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, nkv, hd).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        act_dtype = q.dtype
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, n_kv_head, L, head_dim), L = pos + T
            q = q.to(k.dtype)  # a cache may keep keys and values in fp32 for a bf16 model (SlotKVCache)
        # without a mask, attention is plain causal over T == L keys (or one query that sees all keys)
        causal = mask is None and T > 1
        if self.naive:
            y = self._naive(q, k, v, mask, causal)
        else:
            dtype = q.dtype
            fp32 = dtype == torch.bfloat16 and q.device.type == "cpu" and q.requires_grad
            if fp32:  # PyTorch's CPU flash-attention backward is 2-5x slower in bf16 than in fp32 (measured:
                q, k, v = q.float(), k.float(), v.float()  # docs/benchmarks.md, SFT): with a backward to come,
            with torch.autocast("cpu", enabled=False) if fp32 else nullcontext():  # attend in fp32
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                   dropout_p=self.dropout if self.training else 0.0,
                                                   enable_gqa=nkv != nh).to(dtype)
        y = y.to(act_dtype).transpose(1, 2).reshape(B, T, C)  # (B, T, n_embd): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def _naive(self, q, k, v, mask, causal):
        """softmax(q k^T / sqrt(head_dim) + mask) v, written out as in the book."""
        if self.n_kv_head != self.n_head:  # each key/value head serves n_head / n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, L, head_dim)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)  # (B, n_head, L, head_dim)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, n_head, T, L)
        if causal:
            T = q.shape[2]
            mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v  # (B, n_head, T, head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu, self.relu = config.mlp == "swiglu", config.mlp == "relu"
        hidden = config.hidden_dim
        # SwiGLU fuses its gate and up projections into one c_fc with 2 * hidden outputs
        self.c_fc = nn.Linear(config.n_embd, 2 * hidden if self.swiglu else hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, hidden) or (B, T, 2 * hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)  # (B, T, hidden) each
            h = F.silu(gate) * up
        elif self.relu:
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x)). With norm_position="post"
    (the 2017 Transformer's order): norm(x + attn(x)), then norm(x + mlp(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)
        self.post = config.norm_position == "post"

    def forward(self, x, rope=None, kv_cache=None, mask=None):
        if self.post:
            x = self.ln_1(x + self.attn(x, rope, kv_cache, mask))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), rope, kv_cache, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.positions == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts.update(drop=nn.Dropout(config.dropout),
                     h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                     ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.init == "gpt2":
            self.apply(self._init_weights)
            # GPT-2: residual projections start smaller, so the residual stream's variance does not
            # grow with depth (each block adds two of them)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # init == "torch": keep what the modules' constructors drew (Linear Kaiming-uniform, Embedding
        # N(0, 1), norms ones / zeros), as the book's chapter 5 GPTModel does

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, each shared tensor counted once; non_embedding=True leaves out the token and
        position embedding tables (an untied lm_head still counts: it is a matmul per token)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wte.weight.numel()
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCache | None = None, *,
                      positions: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, n_embd) of token ids idx (B, T), before the lm_head.

        Without a cache, a padded batch (left, right or both) takes attention_mask (B, T), 1 = real
        token, 0 = padding: attention is causal and never sees padded keys, so each real token gets
        what its row alone would give it (padding positions give finite values that mean nothing).
        A packed batch numbers its examples instead (1, 2, ... per row; 0 = padding): a token sees
        only the earlier tokens of its own example. positions ((T,) or (B, T) int64) default to
        0..T-1, or with a mask to the token's index within its example (its row's real tokens for a
        0/1 mask), so each example counts from 0. With a kv_cache, the cache owns positions and
        padding (KVCache.set_left_padding) and neither may be passed.
        """
        cfg = self.config
        B, T = idx.shape
        mask = None
        if kv_cache is None:
            check_positions = positions is not None  # a caller's positions may reach any value
            if attention_mask is not None:
                if attention_mask.shape != (B, T):
                    raise ScratchError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected "
                                       f"(B, T) = {(B, T)} like idx")
                mask = segment_causal_mask(attention_mask)  # (B, 1, T, T)
                if positions is None:  # the keys a token sees: its example's tokens up to itself
                    positions = mask[:, 0].sum(-1) - 1  # (B, T); a padding token sees itself only: 0
            if positions is None:
                positions = torch.arange(T, device=idx.device)  # (T,)
            elif positions.shape not in ((T,), (B, T)):
                raise ScratchError(f"positions has shape {tuple(positions.shape)}, expected (T,) = ({T},) "
                                   f"or (B, T) = {(B, T)}")
            last_pos = T - 1  # the largest default position (masked ones count fewer)
            if cfg.positions == "learned" and (check_positions or last_pos >= cfg.block_size):
                last_pos = int(positions.max())  # exact (a device sync), only when it can matter
        else:
            if positions is not None or attention_mask is not None:
                raise ScratchError("positions / attention_mask cannot be combined with a kv_cache: the cache "
                                   "counts positions and masks its left padding (KVCache.set_left_padding)")
            if kv_cache.k.shape[0] != cfg.n_layer or kv_cache.k.shape[2:] != (cfg.kv_heads, kv_cache.max_len,
                                                                               cfg.head_dim):
                raise ScratchError(f"KVCache shape {tuple(kv_cache.k.shape)} does not fit this model "
                                   f"(n_layer {cfg.n_layer}, n_kv_head {cfg.kv_heads}, head_dim {cfg.head_dim})")
            positions = kv_cache.positions(T)  # (T,) or (B, T) with left padding
            mask = kv_cache.attn_mask(T)  # None or (B, 1, T, pos + T)
            last_pos = kv_cache.pos + T - 1 - kv_cache.min_pad
        if cfg.positions == "learned" and last_pos >= cfg.block_size:
            raise ScratchError(f"sequence reaches position {last_pos}, but this model's learned positions "
                               f"stop at block_size - 1 = {cfg.block_size - 1} (shorten the prompt or "
                               f"generate fewer tokens)")
        x = self.transformer.wte(idx)  # (B, T, n_embd)
        rope = None
        if cfg.positions == "learned":
            x = x + self.transformer.wpe(positions)  # (T, n_embd) or (B, T, n_embd), broadcast over B
        else:
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                reduction: str = "mean", *, positions: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        """Logits (B, T, vocab_size) of idx (B, T). With targets (B, T) returns (None, loss): the
        cross-entropy over targets != IGNORE_INDEX, averaged ("mean"), summed ("sum") or per token
        ("none": (B, T), -log p(target), 0.0 where ignored), computed in row chunks by
        loss.linear_cross_entropy so the (B, T, vocab_size) logits never exist at once.
        positions / attention_mask: for padded batches, see hidden_states."""
        h = self.hidden_states(idx, kv_cache, positions=positions,
                               attention_mask=attention_mask)  # (B, T, n_embd)
        if targets is None:
            return self.lm_head(h)  # (B, T, vocab_size)
        if type(self.lm_head) is not nn.Linear:  # a wrapped head (a LoRA adapter): its own forward
            logits = self.lm_head(h).float()  # (B, T, vocab_size)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100,
                                   reduction=reduction)
            return None, loss.view(targets.shape) if reduction == "none" else loss
        loss = linear_cross_entropy(h.reshape(-1, h.size(-1)), self.lm_head.weight, targets.reshape(-1),
                                    reduction=reduction)  # (B*T, n_embd) against (B*T,)
        if reduction == "none":
            loss = loss.view(targets.shape)  # (B, T)
        return None, loss
