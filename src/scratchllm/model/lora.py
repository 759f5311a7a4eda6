"""LoRA: low-rank adapters swapped into the nn.Linear modules of an existing GPT (Hu et al., 2021).

What it does: `apply_lora` replaces the chosen nn.Linear modules (by name pattern) with `LoRALinear`,
y = W0 x + b + (alpha / r) * B A dropout(x), and freezes every other parameter; `merge_lora` folds
B A back into W0 and puts plain nn.Linear modules back; `disable_lora` runs the base model (the
DPO / PPO reference without a second copy); `lora_state_dict`, `lora_settings` and
`count_lora_parameters` describe the adapters. A LoRALinear holds the wrapped Linear's own `weight`
and `bias` Parameters under the same names, so `h.0.attn.c_attn.weight` keeps its state-dict key
(and a tied lm_head stays tied); the adapters add `h.0.attn.c_attn.lora_A` (r, in) and `.lora_B` (out, r).
What it does not do: file I/O, optimisers or HF's peft (tests/test_lora.py checks equality with peft).
An adapter on lm_head counts in the loss too: GPT.forward(idx, targets) runs a wrapped head's own
forward instead of its chunked cross-entropy on `lm_head.weight`.

    >>> names = apply_lora(model, rank=8, alpha=16)     # ['transformer.h.0.attn.c_attn', ...]
    >>> with disable_lora(model):
    ...     ref_logits = model(idx)                     # the frozen base model
    >>> adapters = lora_state_dict(model)               # {'transformer.h.0.attn.c_attn.lora_A': ...}
    >>> model = merge_lora(model)                       # plain nn.Linear again, same logits
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchllm.common import ScratchError
from scratchllm.configs import LORA_TARGETS

# attention's fused q,k,v and output projections, the MLP's (fused gate+up) input and output projections
DEFAULT_TARGETS = tuple(LORA_TARGETS)


def check_lora_settings(rank: int, alpha: float, dropout: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ScratchError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ScratchError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ScratchError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update: y = x W0^T + b + scaling * dropout(x) A^T B^T, scaling = alpha / r.

    A (r, in) starts Kaiming-uniform like nn.Linear's weight, B (out, r) at zero, so a fresh adapter
    changes nothing. `enabled = False` gives the base Linear exactly.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_lora_settings(rank, alpha, dropout)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.register_parameter("weight", base.weight)  # the same Parameter objects: names and ties kept
        self.register_parameter("bias", base.bias)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout)
        self.enabled = True
        self._cast: tuple | None = None  # (the weight, (its version, dtype), its copy in autocast's dtype)
        self.train(base.training)  # a new module starts in train mode: follow the base's mode instead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self._base_weight(x), self.bias)  # (..., out)
        if not self.enabled:
            return y
        h = F.linear(self.lora_dropout(x), self.lora_A) * self.scaling  # (..., r): scaled where it is small
        return y.add_(F.linear(h, self.lora_B))  # (..., out), in place (linear's backward does not need y)

    def _base_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight, or under autocast a frozen weight's copy in the autocast dtype, made once per value of
        the weight: autocast keeps casts only of weights that train, so it would cast a frozen one again at
        every call (measured: 11% of a bf16 LoRA step of SmolLM2-135M on the CPU, docs/benchmarks.md)."""
        w = self.weight
        if (w.requires_grad or x.device.type != "cpu" or not torch.is_autocast_enabled("cpu")
                or torch.compiler.is_compiling()):  # (measured on the CPU only; compiled graphs fuse the cast)
            return w
        dtype = torch.get_autocast_dtype("cpu")
        cached = self._cast
        if cached is None or cached[0] is not w or cached[1] != (w._version, dtype):  # replaced or edited in place
            self._cast = cached = (w, (w._version, dtype), w.detach().to(dtype))
        return cached[2]

    def merged_weight(self) -> torch.Tensor:
        """W0 + scaling * B A, computed in float32 and cast back to the weight's dtype."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, r) @ (r, in) -> (out, in)
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, bias={self.bias is not None}, enabled={self.enabled}")


def matches(name: str, pattern: str) -> bool:
    """A dotted module name matches a pattern equal to it or to its tail after a dot.

    >>> matches("transformer.h.3.attn.c_proj", "attn.c_proj"), matches("transformer.h.3.mlp.c_proj", "attn.c_proj")
    (True, False)
    """
    return name == pattern or name.endswith("." + pattern)


def _short_name(name: str) -> str:
    """What follows the last layer index: 'transformer.h.3.attn.c_attn' -> 'attn.c_attn'; 'lm_head' -> 'lm_head'."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else name


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{qualified name: LoRALinear} of every adapter in the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Swap every nn.Linear matching a pattern of `targets` for a LoRALinear, in place; freeze every
    other parameter. Returns the sorted names of the wrapped modules."""
    check_lora_settings(rank, alpha, dropout)
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    if not targets:
        raise ScratchError("apply_lora: targets is empty (name at least one nn.Linear, e.g. 'c_attn')")
    existing = lora_modules(model)
    if existing:
        raise ScratchError(f"apply_lora: the model already has LoRA on {', '.join(existing)} "
                           "(merge_lora it first, or start from the base model)")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = set()
    for pattern in targets:
        hits = [name for name in linears if matches(name, pattern)]
        if not hits:
            known = sorted({_short_name(name) for name in linears})
            raise ScratchError(f"apply_lora: target {pattern!r} matches no nn.Linear module; this model's "
                               f"Linear modules include {', '.join(known[:8]) or '(none)'}")
        chosen.update(hits)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in sorted(chosen):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(linears[name], rank, alpha, dropout))
    return sorted(chosen)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W0 += scaling * B A) and put plain nn.Linear modules back.

    A weight shared with another parameter (a tied lm_head == wte) is not modified: the merged Linear
    gets a new weight, and each GPT whose head is then untied gets config.tie_embeddings = False."""
    uses = {}  # id(parameter) -> how many names it has
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for name, lora in lora_modules(model).items():
        w = lora.weight
        linear = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        with torch.no_grad():
            if uses[id(w)] > 1:  # shared: a new Parameter, the other owner keeps W0
                linear.weight = nn.Parameter(lora.merged_weight(), requires_grad=w.requires_grad)
            else:
                linear.weight = w.copy_(lora.merged_weight())
        linear.bias = lora.bias
        linear.train(lora.training)
        if not name:
            return linear  # the model was a bare LoRALinear
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if getattr(cfg, "tie_embeddings", False) is True and hasattr(m, "lm_head") and hasattr(m, "transformer") \
                and m.lm_head.weight is not m.transformer.wte.weight:
            m.config = dataclasses.replace(cfg, tie_embeddings=False)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: the lora_A / lora_B entries of model.state_dict()."""
    return {k: v for k, v in model.state_dict().items() if k.rpartition(".")[2] in ("lora_A", "lora_B")}


@contextmanager
def disable_lora(model: nn.Module):
    """Run the base model inside the block (every LoRALinear's `enabled` False); the previous flags
    come back on exit, also after an exception."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise ScratchError("disable_lora: the model has no LoRA modules (call apply_lora first)")
    before = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.enabled = flag


def lora_settings(model: nn.Module) -> dict:
    """{"rank", "alpha", "dropout", "targets": [wrapped module names]}: what an adapter description holds."""
    modules = lora_modules(model)
    if not modules:
        raise ScratchError("lora_settings: the model has no LoRA modules (call apply_lora first)")
    settings = {(m.rank, m.alpha, m.lora_dropout.p) for m in modules.values()}
    if len(settings) > 1:
        raise ScratchError(f"lora_settings: the adapters disagree on (rank, alpha, dropout): {sorted(settings)}; "
                           "one setting for the whole model is expected")
    (rank, alpha, dropout), = settings
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": list(modules)}


def count_lora_parameters(model: nn.Module) -> int:
    """Adapter parameters: r * (in + out) summed over every LoRALinear."""
    return sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_modules(model).values())
