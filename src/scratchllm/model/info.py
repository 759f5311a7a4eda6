"""Back-of-the-envelope numbers for a ModelConfig: parameters, bytes, FLOPs per token, memory.

What it does: `estimate(config, batch_size, block_size)` returns a dict of counts computed from the
config alone (no model is built), and `format_report` lays it out as text for `scratchllm model info`.
What it does not do: measure anything; the activation estimate is checked against the tensors autograd
really saves in tests/test_model_info.py.

Formulas (N = weights of the matmuls, i.e. every Linear's weight including the lm_head; L layers;
d = n_embd; biases and norms are left out of the FLOPs as usual):
- FLOPs per token, forward: 2 N + 4 L T d (the second term: q k^T and att v over T positions);
  training = 3x forward (backward costs twice the forward).
- Training memory = weights + grads (fp32, 4 bytes each per parameter) + AdamW's two moments (8 bytes)
  + activations. Activations per layer per token: 16 d values for a GPT-2 block with SDPA (inputs of
  the norms and matmuls, q/k/v, the 4d MLP hidden before and after GELU), plus,
  for naive attention, the T x T softmax weights of every head (SDPA's fused kernels keep none). The
  fused chunked loss keeps no logits, only the (B T, d) gradient and one (V, d) fp32 gradient buffer.
  bf16 autocast roughly halves the activations (quoted as half; norms keep some in fp32).
- Inference memory = weights + KV cache (2 L B T n_kv_head head_dim values) + one step's logits.
"""

from __future__ import annotations

from scratchllm.model.config import ModelConfig

GIB = 1024**3


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by part, from the config alone."""
    d, L = cfg.n_embd, cfg.n_layer
    norm = d if (cfg.norm == "rmsnorm" or not cfg.bias) else 2 * d
    qkv_out = (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim
    fc_out = 2 * cfg.hidden_dim if cfg.mlp == "swiglu" else cfg.hidden_dim
    b = 1 if cfg.bias else 0
    attn = d * qkv_out + (1 if cfg.bias or cfg.qkv_bias else 0) * qkv_out + d * d + b * d
    mlp = d * fc_out + b * fc_out + cfg.hidden_dim * d + b * d
    per_layer = attn + mlp + 2 * norm
    wte = cfg.vocab_size * d
    wpe = cfg.block_size * d if cfg.positions == "learned" else 0
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = wte + wpe + L * per_layer + norm + head
    matmul = L * (d * qkv_out + d * d + d * fc_out + cfg.hidden_dim * d) + cfg.vocab_size * d  # weights only
    return {"total": total, "total_untied": total + (wte if cfg.tie_embeddings else 0),
            "non_embedding": total - wte - wpe, "matmul": matmul, "embedding": wte + wpe}


def activation_values_per_token(cfg: ModelConfig, block_size: int) -> int:
    """Values autograd saves per token for one block (dropout 0): what each op keeps for its backward."""
    d, H, hd = cfg.n_embd, cfg.hidden_dim, cfg.head_dim
    norm = d if cfg.norm == "layernorm" else 2 * d  # LayerNorm keeps its input; RMSNorm also x * rstd
    qkv = (cfg.n_head + 2 * cfg.kv_heads) * hd
    attn = d + qkv + d  # c_attn input, q/k/v (one storage), c_proj input
    repeat_kv = cfg.attention == "naive" and cfg.kv_heads != cfg.n_head
    if cfg.positions == "rope":
        attn += d + (0 if repeat_kv else cfg.kv_heads * hd)  # rotated q and k are new tensors
        if cfg.attention == "sdpa":
            attn += d  # SDPA keeps its output; with contiguous q it is not the c_proj input's storage
    if cfg.attention == "naive":
        attn += cfg.n_head * block_size  # the softmax weights, T x T per head
        if repeat_kv:
            attn += 2 * d  # keys and values repeated for every query head
    mlp = d + (4 * H if cfg.mlp == "swiglu" else 2 * H)  # c_fc input, hidden before / after activation
    return 2 * norm + attn + mlp


def activation_bytes(cfg: ModelConfig, batch_size: int, block_size: int, bytes_per_value: int = 4) -> int:
    """Approximate bytes autograd keeps for the backward pass of one (B, T) batch (dropout 0)."""
    tokens = batch_size * block_size
    layers = cfg.n_layer * tokens * activation_values_per_token(cfg, block_size)
    norm = cfg.n_embd if cfg.norm == "layernorm" else 2 * cfg.n_embd
    head = tokens * (norm + cfg.n_embd)  # final norm + the fused loss's gradient w.r.t. the hidden states
    return int((layers + head) * bytes_per_value + cfg.vocab_size * cfg.n_embd * 4)  # + fp32 head gradient


def estimate(cfg: ModelConfig, batch_size: int = 1, block_size: int | None = None) -> dict:
    """Parameters, bytes, FLOPs per token and memory (training with AdamW, inference with a KV cache)."""
    T = block_size or cfg.block_size
    p = param_counts(cfg)
    fwd = 2 * p["matmul"] + 4 * cfg.n_layer * T * cfg.n_embd
    kv = 2 * cfg.n_layer * batch_size * T * cfg.kv_heads * cfg.head_dim
    out = {"params": p, "batch_size": batch_size, "block_size": T,
           "bytes": {"fp32": 4 * p["total"], "bf16": 2 * p["total"]},
           "flops_per_token": {"forward": fwd, "training": 3 * fwd},
           "training_memory": {"weights": 4 * p["total"], "grads": 4 * p["total"], "adamw": 8 * p["total"],
                               "activations_fp32": activation_bytes(cfg, batch_size, T, 4),
                               "activations_bf16": activation_bytes(cfg, batch_size, T, 2)},
           "inference_memory": {}}
    for name, nbytes in (("fp32", 4), ("bf16", 2)):
        out["inference_memory"][name] = {"weights": nbytes * p["total"], "kv_cache": nbytes * kv,
                                         "logits": 4 * batch_size * cfg.vocab_size}
    return out


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _flops(n: float) -> str:
    return f"{n / 1e9:.3f} GFLOP" if n >= 1e8 else f"{n / 1e6:.3f} MFLOP"


def format_report(name: str, cfg: ModelConfig, e: dict) -> str:
    """The text `scratchllm model info` prints."""
    p, tm, B, T = e["params"], e["training_memory"], e["batch_size"], e["block_size"]
    arch = "GPT-2" if cfg.is_gpt2 else f"{cfg.norm}, {cfg.positions}, {cfg.mlp}, n_kv_head {cfg.kv_heads}"
    static = tm["weights"] + tm["grads"] + tm["adamw"]
    lines = [
        f"model {name}: {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, "
        f"block_size {cfg.block_size} ({arch}; tied embeddings: {cfg.tie_embeddings})",
        f"parameters          {p['total']:,} ({p['total_untied']:,} counting the tied head separately; "
        f"{p['non_embedding']:,} without embeddings)",
        f"size                fp32 {_size(e['bytes']['fp32'])}, bf16 {_size(e['bytes']['bf16'])}",
        f"FLOPs per token     forward {_flops(e['flops_per_token']['forward'])}, "
        f"training {_flops(e['flops_per_token']['training'])} (context T={T})",
        f"training memory     batch {B} x {T}, AdamW, fp32 weights:",
        f"  weights {_size(tm['weights'])} + grads {_size(tm['grads'])} + AdamW state {_size(tm['adamw'])} "
        f"= {_size(static)}",
        f"  activations       {_size(tm['activations_fp32'])} fp32 / {_size(tm['activations_bf16'])} bf16 autocast"
        f" -> total ~{_size(static + tm['activations_fp32'])} fp32, ~{_size(static + tm['activations_bf16'])} bf16",
        f"inference memory    batch {B}, {T} positions cached:",
    ]
    for dtype, m in e["inference_memory"].items():
        total = sum(m.values())
        lines.append(f"  {dtype}: weights {_size(m['weights'])} + KV cache {_size(m['kv_cache'])} "
                     f"+ logits {_size(m['logits'])} = {_size(total)}")
    return "\n".join(lines)
