"""ModelConfig: the shape of a GPT, as a typed dataclass with validation and named presets.

What it does: holds every number and switch the model needs (sizes, dropout, bias, tying, the
Llama-style switches rmsnorm / rope / swiglu / grouped-query attention, the init scheme), checks them in
`__post_init__`, and round-trips through a plain dict (the `config.json` of a checkpoint).
What it does not do: build the model (see gpt.py) or read files (see weights/).

    >>> cfg = ModelConfig.from_preset("tiny", vocab_size=4096)
    >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from scratchllm.common import ScratchError


@dataclass
class ModelConfig:
    block_size: int = 1024  # context length: the most positions the model attends over
    vocab_size: int = 50257  # number of token ids (embedding rows / logits per position)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per attention layer
    n_embd: int = 768  # width of the residual stream; head_dim = n_embd // n_head
    dropout: float = 0.0  # dropout on embeddings, attention weights and residual branches
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2: True; the lm_head never has one)
    qkv_bias: bool = False  # biases on the query/key/value projection even when bias=False (Qwen2)
    tie_embeddings: bool = True  # lm_head.weight is the same tensor as wte.weight (GPT-2: True)
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (Llama)
    positions: str = "learned"  # "learned" absolute embeddings (GPT-2) or "rope" rotary (Llama)
    mlp: str = "gelu"  # "gelu" 4x MLP (GPT-2, tanh-approximate GELU), "relu" 4x MLP, or "swiglu" gated MLP (Llama)
    norm_position: str = "pre"  # "pre": x + f(norm(x)) (GPT-2, Llama); "post": norm(x + f(x)) (the 2017 Transformer)
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None = n_head
    attention: str = "sdpa"  # "sdpa" (F.scaled_dot_product_attention) or "naive" (explicit softmax)
    mlp_hidden: int | None = None  # MLP hidden width; None = 4*n_embd (gelu) or ~8/3*n_embd (swiglu)
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0  # RoPE base frequency (only used with positions="rope")
    # weight init: "gpt2" = normal(0, 0.02), zero biases, residual c_proj normal(0, 0.02/sqrt(2 n_layer));
    # "torch" = PyTorch's defaults untouched (Linear Kaiming-uniform, Embedding N(0, 1), norms ones/zeros),
    # as the GPTModel of Raschka's "Build a LLM from scratch" (ch. 5); absent from old config.json = "gpt2"
    init: str = "gpt2"

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ScratchError(f"model config: {name} must be a positive integer, got {value!r}")
        choices = {"norm": ("layernorm", "rmsnorm"), "positions": ("learned", "rope"), "mlp": ("gelu", "relu", "swiglu"),
                   "norm_position": ("pre", "post"),
                   "attention": ("naive", "sdpa"), "init": ("gpt2", "torch")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ScratchError(f"model config: {name} must be one of {', '.join(allowed)}, "
                                   f"got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ScratchError(f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_kv_head is not None and (self.n_kv_head <= 0 or self.n_head % self.n_kv_head):
            raise ScratchError(f"model config: n_kv_head ({self.n_kv_head}) must be a positive divisor of "
                               f"n_head ({self.n_head})")
        if self.positions == "rope" and self.head_dim % 2:
            raise ScratchError(f"model config: rope needs an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ScratchError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise ScratchError(f"model config: mlp_hidden must be positive, got {self.mlp_hidden}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ScratchError("model config: norm_eps and rope_theta must be positive")

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (n_kv_head, or n_head when it is None)."""
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width: 4*n_embd for GELU and ReLU; 2/3 of that rounded up to a multiple of 64 for SwiGLU
        (so the gated MLP has about the same parameters as the 4x one)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp in ("gelu", "relu"):
            return 4 * self.n_embd
        return -(-(8 * self.n_embd // 3) // 64) * 64

    @property
    def is_gpt2(self) -> bool:
        """True when the architecture is plain GPT-2 (exportable to transformers' GPT2LMHeadModel)."""
        return (self.norm, self.positions, self.mlp, self.norm_position) == ("layernorm", "learned", "gelu", "pre") and \
            self.kv_heads == self.n_head and self.mlp_hidden in (None, 4 * self.n_embd) and \
            (self.bias or not self.qkv_bias)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> ModelConfig:
        """Build from a dict (e.g. config.json); unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ScratchError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ModelConfig:
        """A named preset (see PRESETS) with any fields replaced, e.g. from_preset("tiny", vocab_size=4096)."""
        if name not in PRESETS:
            raise ScratchError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ScratchError(f"unknown model config field(s) {', '.join(unknown)}")
        return replace(PRESETS[name], **overrides)


# The GPT-2 family (sizes as published by OpenAI) and small presets that train on a laptop CPU.
# tiny: ~0.8M parameters besides the embeddings, for tests; small: ~10.6M, for CPU demos.
PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600),
    "tiny": ModelConfig(block_size=128, vocab_size=4096, n_layer=4, n_head=4, n_embd=128),
    "small": ModelConfig(block_size=256, vocab_size=4096, n_layer=6, n_head=6, n_embd=384),
}
