"""Hugging Face Llama-family format in and out: Llama (and SmolLM / SmolLM2), Mistral, Qwen2.

What it does:
- `config_from_llama(d, source)` turns a transformers LlamaConfig / MistralConfig / Qwen2Config dict into
  our ModelConfig (rmsnorm + rope + swiglu + grouped-query attention), refusing, with the file, field
  and value, every variant our GPT would compute differently: sliding windows, MoE, rope scaling, a
  head_dim other than hidden_size / num_attention_heads, an activation other than silu, biases on only
  some projections, cross-attention. Both config styles are read: transformers 4's `rope_theta` /
  `rope_scaling` and transformers 5's `rope_parameters`.
- `config_to_llama(cfg, bos, eos)` is the reverse: a LlamaForCausalLM config (attention_bias = mlp_bias
  = cfg.bias: RMSNorm has no bias, so bias=True is exactly Llama with both flags), Qwen2ForCausalLM when
  only q/k/v carry biases, or a ScratchError naming what neither can express. `check_qwen2_tokenizer`
  refuses a tokenizer a qwen2 folder would misrepresent (transformers 5 re-splits with Qwen2's pattern).
- `key_plan(cfg)` says which HF tensors make up each of our parameters (q/k/v are rows of c_attn,
  gate/up rows of c_fc); `load_llama_weights` fills a model from `model.safetensors` or the shards of
  `model.safetensors.index.json` through it, one tensor at a time (peak memory: the fp32 model plus
  its largest tensor, as read from the memory-mapped shard), and `state_dict_to_llama` cuts our weights back into HF tensors.
What it does not do: GPT-2 (hf.py), tokenizers (hf.py), pickle / TF files, or importing transformers.

    cfg = config_from_llama(read_json("smollm2/config.json"), "smollm2/config.json")
    model = empty_model(cfg); load_llama_weights(model, *tensor_files(Path("smollm2")))
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from scratchllm.common import ScratchError, read_json
from scratchllm.model import ModelConfig
from scratchllm.weights.state import listed, tied_names

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings")
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors dtype names we convert to fp32
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
# the split pattern transformers 5's Qwen2Tokenizer hard-codes: AutoTokenizer rebuilds the tokenizer of
# every model_type qwen2 folder with it (and NFC), whatever its tokenizer.json says
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


# --------------------------------------------------------------------------------------------- config
def _refuse(source: str, field: str, value, why: str):
    raise ScratchError(f"{source}: {field} is {value!r}; {why}")


def rope_theta_of(d: dict, source: str) -> float:
    """The RoPE base of a config in either transformers style; scaled / partial rope is refused.

    >>> rope_theta_of({"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}, "c.json")
    100000.0
    >>> rope_theta_of({"rope_theta": 5e5, "rope_scaling": None}, "c.json")
    500000.0
    """
    plain = "only plain RoPE is supported (rope_type 'default', no scaling)"
    scaling = d.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind != "default":
            _refuse(source, "rope_scaling", scaling, plain)
    theta = d.get("rope_theta", 10000.0)
    params = d.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
            _refuse(source, "rope_parameters", params, plain + ", one set for every layer")
        if params.get("rope_type", "default") != "default":
            _refuse(source, "rope_parameters.rope_type", params["rope_type"], plain)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse(source, "rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                    "rope must rotate the whole head (1.0)")
        theta = params.get("rope_theta", theta)
    if d.get("rope_interleaved"):  # nanotron's field (SmolLM2 has it, false): pairs (2i, 2i + 1)
        _refuse(source, "rope_interleaved", d["rope_interleaved"], "only rotate-half RoPE (false) is supported")
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse(source, "partial_rotary_factor", d["partial_rotary_factor"], "rope must rotate the whole head (1.0)")
    return float(theta)


def _check_family(d: dict, source: str, model_type: str) -> None:
    """The per-family switches: sliding windows (Mistral, Qwen2) and partial biases (Llama)."""
    if model_type == "mistral" and d.get("sliding_window") is not None:
        _refuse(source, "sliding_window", d["sliding_window"], "sliding-window attention is not supported "
                "(only Mistral checkpoints with sliding_window null, e.g. v0.3)")
    if model_type == "qwen2":
        if d.get("use_sliding_window", False):
            _refuse(source, "use_sliding_window", d["use_sliding_window"], "sliding-window attention is not supported")
        kinds = sorted(set(d.get("layer_types") or ["full_attention"]))
        if kinds != ["full_attention"]:
            _refuse(source, "layer_types", kinds, "every layer must be 'full_attention'")
    if model_type == "llama" and bool(d.get("attention_bias", False)) != bool(d.get("mlp_bias", False)):
        _refuse(source, "attention_bias / mlp_bias", (bool(d.get("attention_bias")), bool(d.get("mlp_bias"))),
                "our GPT has biases on every projection or on q/k/v only, so both must be false or both true")


def config_from_llama(d: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a transformers Llama / Mistral / Qwen2 config dict (see the module docstring)."""
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        _refuse(source, "model_type", model_type, f"this reader handles {', '.join(ARCHITECTURES)}")
    missing = [k for k in REQUIRED if k not in d]
    if missing:
        raise ScratchError(f"{source}: required field(s) {', '.join(missing)} missing")
    for field in MOE_FIELDS:
        if (d.get(field) or 0) > 0:
            _refuse(source, field, d[field], "mixture-of-experts models are not supported")
    for field in ("is_encoder_decoder", "add_cross_attention"):
        if d.get(field):
            _refuse(source, field, d[field], "only decoder-only models without cross-attention are supported")
    if d.get("hidden_act", "silu") != "silu":
        _refuse(source, "hidden_act", d["hidden_act"], "the gated MLP must use 'silu' (SwiGLU)")
    n_embd, n_head = d["hidden_size"], d["num_attention_heads"]
    head_dim = d.get("head_dim")
    if head_dim is not None and (not isinstance(n_head, int) or n_head <= 0 or head_dim * n_head != n_embd):
        _refuse(source, "head_dim", head_dim, f"it must be hidden_size / num_attention_heads = {n_embd} / {n_head}")
    tie = d.get("tie_word_embeddings", False)  # the default of all three transformers configs
    if not isinstance(tie, bool):
        _refuse(source, "tie_word_embeddings", tie, "it must be true or false")
    _check_family(d, source, model_type)
    bias = model_type == "llama" and bool(d.get("attention_bias", False))
    return ModelConfig(block_size=d["max_position_embeddings"], vocab_size=d["vocab_size"],
                       n_layer=d["num_hidden_layers"], n_head=n_head, n_embd=n_embd,
                       n_kv_head=d.get("num_key_value_heads"), mlp_hidden=d["intermediate_size"],
                       norm="rmsnorm", positions="rope", mlp="swiglu", dropout=0.0, bias=bias,
                       qkv_bias=model_type == "qwen2", tie_embeddings=tie,
                       norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=rope_theta_of(d, source))


def llama_problems(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of the Llama / Qwen2 formats ([] when it fits).

    >>> llama_problems(ModelConfig(norm="rmsnorm", positions="learned", mlp="swiglu"))
    ["positions='learned' (needs 'rope')"]
    """
    want = {"norm": "rmsnorm", "positions": "rope", "mlp": "swiglu", "norm_position": "pre"}
    return [f"{k}={getattr(cfg, k)!r} (needs {v!r})" for k, v in want.items() if getattr(cfg, k) != v]


def config_to_llama(cfg: ModelConfig, bos: int | None = None, eos: int | None = None) -> dict:
    """transformers config fields for a Llama-style ModelConfig: LlamaForCausalLM (biases everywhere or
    nowhere) or Qwen2ForCausalLM (biases on q/k/v only). Written in both the transformers 4 style
    (rope_theta, rope_scaling) and the 5 style (rope_parameters, dtype)."""
    problems = llama_problems(cfg)
    if problems:
        raise ScratchError(f"this model cannot be exported to Llama / Qwen2 format: {'; '.join(problems)}")
    qwen = cfg.qkv_bias and not cfg.bias
    out = {
        "architectures": [ARCHITECTURES["qwen2" if qwen else "llama"]], "model_type": "qwen2" if qwen else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": cfg.dropout, "initializer_range": 0.02, "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True, "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": "float32", "dtype": "float32",
    }
    if qwen:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    else:
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias, pretraining_tp=1)
    return out


def check_qwen2_tokenizer(tokenizer) -> None:
    """Refuse a tokenizer that a Qwen2 folder would misrepresent: transformers 5's AutoTokenizer
    ignores the pre-tokenizer of a qwen2 folder's tokenizer.json and splits with QWEN2_PATTERN."""
    if tokenizer is not None and tokenizer.pattern != QWEN2_PATTERN:
        raise ScratchError("this model (biases on q/k/v only) exports as Qwen2ForCausalLM, but transformers' "
                           "AutoTokenizer splits the text of every qwen2 folder with Qwen2's own pattern, not "
                           f"this tokenizer's ({tokenizer.pattern[:60]!r}...): it would encode differently. "
                           "Export with a Qwen2-pattern tokenizer, or without one")


# --------------------------------------------------------------------------------------------- key map
def key_plan(cfg: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """Each of our parameters -> the HF tensors stacked along its rows, with their row ranges.

    >>> plan = key_plan(ModelConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, bias=False))
    >>> [(k.split(".")[-2], a, b) for k, a, b in plan["transformer.h.0.attn.c_attn.weight"]]
    [('q_proj', 0, 32), ('k_proj', 32, 48), ('v_proj', 48, 64)]
    """
    q, kv, hidden = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    plan = {"transformer.wte.weight": [("model.embed_tokens.weight", 0, cfg.vocab_size)],
            "transformer.ln_f.weight": [("model.norm.weight", 0, cfg.n_embd)]}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = [("lm_head.weight", 0, cfg.vocab_size)]
    for i in range(cfg.n_layer):
        ours, hf = f"transformer.h.{i}.", f"model.layers.{i}."
        plan[ours + "ln_1.weight"] = [(hf + "input_layernorm.weight", 0, cfg.n_embd)]
        plan[ours + "ln_2.weight"] = [(hf + "post_attention_layernorm.weight", 0, cfg.n_embd)]
        kinds = ["weight", "bias"] if cfg.bias else ["weight"]
        for kind in ["weight", "bias"] if cfg.bias or cfg.qkv_bias else ["weight"]:
            plan[ours + f"attn.c_attn.{kind}"] = [(hf + f"self_attn.q_proj.{kind}", 0, q),
                                                  (hf + f"self_attn.k_proj.{kind}", q, q + kv),
                                                  (hf + f"self_attn.v_proj.{kind}", q + kv, q + 2 * kv)]
        for kind in kinds:
            plan[ours + f"attn.c_proj.{kind}"] = [(hf + f"self_attn.o_proj.{kind}", 0, cfg.n_embd)]
            plan[ours + f"mlp.c_fc.{kind}"] = [(hf + f"mlp.gate_proj.{kind}", 0, hidden),
                                               (hf + f"mlp.up_proj.{kind}", hidden, 2 * hidden)]
            plan[ours + f"mlp.c_proj.{kind}"] = [(hf + f"mlp.down_proj.{kind}", 0, cfg.n_embd)]
    return plan


def _checked_plan(model) -> dict[str, list[tuple[str, int, int]]]:
    """key_plan of the model's config, checked to cover exactly the model's tensors (bar the tied head)."""
    plan = key_plan(model.config)
    names = set(model.state_dict()) - tied_names(model)
    if set(plan) != names:
        raise ScratchError(f"internal: the HF key map and the model disagree on {sorted(set(plan) ^ names)}")
    return plan


def state_dict_to_llama(model) -> dict[str, torch.Tensor]:
    """Our weights as HF Llama / Qwen2 tensors (fp32, CPU); the tied head is left out."""
    sd = model.state_dict()
    return {hf: sd[ours][a:b].detach().to("cpu", torch.float32).contiguous()
            for ours, parts in _checked_plan(model).items() for hf, a, b in parts}


# --------------------------------------------------------------------------------------------- reading
@contextmanager
def open_safetensors(path: Path):
    """safetensors.safe_open(path) (memory-mapped: tensors are read one by one), with a ScratchError
    naming the file when it cannot be opened."""
    from safetensors import SafetensorError, safe_open

    try:
        f = safe_open(str(path), "pt")
    except (SafetensorError, OSError) as e:
        raise ScratchError(f"{path}: cannot read safetensors file ({e})") from None
    with f:
        yield f


def tensor_files(folder: Path, weights: Path | None = None) -> tuple[dict[str, Path], str]:
    """{HF tensor name: safetensors file holding it} and the file that says so: `weights`, else the
    folder's model.safetensors, else the weight_map of its model.safetensors.index.json."""
    single = weights or folder / SINGLE
    if single.is_file():
        with open_safetensors(single) as f:
            return {k: single for k in f.keys()}, str(single)
    index = folder / INDEX
    if not index.is_file():
        hint = " (only safetensors is read: no pickle / TF files)" if (folder / "pytorch_model.bin").exists() else ""
        raise ScratchError(f"{single} not found, nor {INDEX} beside it{hint}")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ScratchError(f"{index}: weight_map must be an object {{tensor name: shard file}}")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:
            raise ScratchError(f"{index}: shard {shard!r} must be a file name inside {folder}")
        if not (folder / shard).is_file():
            raise ScratchError(f"{index} lists shard {shard}, which is missing from {folder}")
    return {k: folder / v for k, v in weight_map.items()}, str(index)


def _ignorable(key: str, cfg: ModelConfig) -> bool:
    """Stored tensors that are not weights of ours: old rotary caches, a tied head kept anyway."""
    return key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and cfg.tie_embeddings)


def _by_shard(keys, files: dict[str, Path]) -> dict[Path, list[str]]:
    """{file: [its keys]}, the files in first-seen order."""
    shards: dict[Path, list[str]] = {}
    for key in keys:
        shards.setdefault(files[key], []).append(key)
    return shards


def _header_problems(shards: dict[Path, list[str]], needed: dict, state: dict) -> tuple[list[str], list[str]]:
    """(keys absent from the shard the index names, misshapen or non-float tensors), from headers only."""
    absent, bad = [], []
    for path, keys in shards.items():
        with open_safetensors(path) as f:
            stored = set(f.keys())
            for key in keys:
                if key not in stored:
                    absent.append(f"{key} (in {path.name})")
                    continue
                ours, a, b = needed[key]
                info = f.get_slice(key)
                want = (b - a, *state[ours].shape[1:])
                if tuple(info.get_shape()) != want or info.get_dtype() not in FLOAT_DTYPES:
                    bad.append(f"{key}: {info.get_dtype()} {tuple(info.get_shape())}, expected a float {want}")
    return absent, bad


def load_llama_weights(model, files: dict[str, Path], listing: str) -> None:
    """Fill `model` (from empty_model) tensor by tensor from the safetensors files of
    `tensor_files` (`listing`: the file that lists them, for messages); any float dtype becomes the
    model's. Every header is checked first, and all problems are one ScratchError: tensors missing or
    unexpected, listed in the index but absent from their shard, misshapen, or not floating point."""
    plan = _checked_plan(model)
    needed = {hf: (ours, a, b) for ours, parts in plan.items() for hf, a, b in parts}
    state = model.state_dict()  # tensors sharing the parameters' storage
    missing = sorted(set(needed) - set(files))
    unexpected = sorted(k for k in set(files) - set(needed) if not _ignorable(k, model.config))
    shards = _by_shard([k for k in needed if k in files], files)
    absent, bad = _header_problems(shards, needed, state)
    problems = [line for title, items in (("shape or dtype mismatch", bad), ("missing keys", missing),
                                          ("listed in the index but absent from the shard", absent),
                                          ("unexpected keys", unexpected)) if items for line in listed(title, items)]
    if problems:
        raise ScratchError("\n".join([f"{listing}: weights do not fit the model config:", *problems]))
    with torch.no_grad():
        for path, keys in shards.items():  # one tensor in memory at a time
            with open_safetensors(path) as f:
                for key in keys:
                    ours, a, b = needed[key]
                    state[ours][a:b].copy_(f.get_tensor(key))  # (rows, ...) slice of c_attn / c_fc
