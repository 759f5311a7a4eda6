"""llama.cpp's GGUF files into our GPT: config from the metadata, tensors into parameters, tokenizer.

What it does:
- `config_from_gguf(meta, source)`: `llama` (also Mistral, SmolLM, ... files) and `qwen2` metadata ->
  ModelConfig, refusing what our GPT cannot compute exactly (MoE, rope scaling, sliding windows,
  partial rotary or another head size, per-layer sizes, unknown `{arch}.*` keys, other architectures).
- `tensor_plan(config, arch)`: where each llama.cpp tensor goes in our GPT (q/k/v fused into c_attn,
  gate/up into c_fc); `unpermute_rows` undoes llama.cpp's Q/K row permutation.
- `load_gguf_model(path, device)` allocates the GPT once and copies each tensor, dequantized, straight
  into its slice of a parameter, one tensor at a time: peak memory ~ one fp32 model + the mapped file
  + one tensor. `rope_freqs.weight` (Llama 3.1 rope factors) is ignored when all ones, refused otherwise.
- `load_gguf(path, device)` adds the tokenizer and chat format read from the file's metadata;
  `gguf_info(f)` summarises a file for reports.
- `load_gguf_quantized(path, weights)`: the same, for CPU inference, with the matrices kept quantized
  (model/quant.py): Q8_0 / Q4_0 / Q4_1 tensors go into int8 / int4 QuantWeights as stored, never
  through fp32, when `weights` is "auto" (each tensor in its own format) or names their format; any
  other tensor is dequantized alone and requantized to `weights` (auto: bf16). A fused matrix whose
  parts are stored in different types (q Q4_0, v Q8_0) takes the finest of their formats (auto), with
  groups of 32. Norms stay fp32.
What it does not do: parse the file or dequantize (gguf_file.py: `read_gguf`, `dequantize`, `GGUFFile`,
re-exported here), write GGUF, or run other architectures.

    model, gguf_file = load_gguf_model("SmolLM2-135M-Instruct.Q4_1.gguf")   # the weights alone
    model, tokenizer, chat_format, info = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import time
from collections import Counter
from typing import NamedTuple

import torch

from scratchllm.common import Progress, ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.weights.gguf_file import GGUFFile, GGUFTensor, dequantize, read_gguf, type_info
from scratchllm.weights.state import config_from_file, empty_model, meta_model

__all__ = ["GGUFFile", "GGUFTensor", "config_from_gguf", "dequantize", "gguf_info", "load_gguf",
           "load_gguf_model", "load_gguf_quantized", "read_gguf", "tensor_plan", "type_info", "unpermute_rows"]

# --------------------------------------------------------------------------------------------- config
ARCHITECTURES = {"llama": "llama (also Mistral, SmolLM, ...)", "qwen2": "qwen2"}
# the {arch}.KEY entries read or checked below; any other {arch}.* key is refused as unknown
KNOWN_KEYS = {"vocab_size", "context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
              "rope.freq_base", "rope.dimension_count", "attention.key_length", "attention.value_length",
              "expert_count", "expert_used_count", "rope.scaling.type", "rope.scaling.factor",
              "rope.scaling.original_context_length", "rope.scaling.finetuned", "attention.sliding_window",
              "attention.causal", "tensor_data_layout"}


def config_from_gguf(meta: dict, source: str, tensor_names=None) -> ModelConfig:
    """ModelConfig of a GGUF file's metadata. `tensor_names` decide tying: without `output.weight` the
    head is the token embedding (None counts as tied). What our GPT cannot compute exactly is refused."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ScratchError(f"{source}: architecture {arch!r} is not supported; supported: "
                           f"{', '.join(ARCHITECTURES.values())}")

    def refuse(what: str):
        raise ScratchError(f"{source}: this {arch} model has {what}, which scratchllm's GPT cannot represent")

    def get(key: str, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if isinstance(value, list):
            refuse(f"per-layer values of {arch}.{key} ({value[:4]}...)")
        if value is None:
            raise ScratchError(f"{source}: metadata key {arch}.{key} is missing (the {arch} models need it)")
        return value

    unknown = sorted(k for k in meta if k.startswith(f"{arch}.") and k[len(arch) + 1:] not in KNOWN_KEYS)
    if unknown:
        refuse(f"metadata that scratchllm does not know ({', '.join(unknown)}), so it cannot promise "
               "llama.cpp's results")
    if get("expert_count", 0):
        refuse(f"mixture-of-experts layers ({arch}.expert_count = {get('expert_count')})")
    scaling, factor = get("rope.scaling.type", "none"), get("rope.scaling.factor", 1.0)
    if scaling != "none" or factor != 1.0:
        refuse(f"rope scaling ({arch}.rope.scaling.type {scaling!r}, factor {factor})")
    if get("attention.causal", True) is not True:
        refuse("non-causal attention")
    n_embd, n_head, block_size = get("embedding_length"), get("attention.head_count"), get("context_length")
    if 0 < get("attention.sliding_window", block_size) < block_size:
        refuse(f"sliding-window attention ({arch}.attention.sliding_window = {get('attention.sliding_window')} "
               f"< context_length {block_size})")
    head_dim = n_embd // n_head if n_head else 0
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        if get(key, head_dim) != head_dim:
            refuse(f"{arch}.{key} = {get(key)}, not embedding_length / head_count = {head_dim} (partial rotary "
                   "or a separate head size)")
    vocab = get("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])) or None)
    tied = tensor_names is None or "output.weight" not in tensor_names
    return config_from_file(lambda: ModelConfig(
        block_size=block_size, vocab_size=vocab, n_layer=get("block_count"), n_head=n_head, n_embd=n_embd,
        n_kv_head=get("attention.head_count_kv", n_head), mlp_hidden=get("feed_forward_length"), dropout=0.0,
        bias=False, qkv_bias=arch == "qwen2", tie_embeddings=tied, norm="rmsnorm", positions="rope",
        mlp="swiglu", norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0)), source)


# --------------------------------------------------------------------------------------------- weights
class Target(NamedTuple):
    """Where one GGUF tensor goes: rows start:stop of our parameter `param`; `heads`: un-permute the
    rows (llama Q/K) over that many heads, None: copy as stored."""
    param: str
    start: int
    stop: int
    heads: int | None = None


IGNORED = {"rope_freqs.weight": "rope frequency factors (Llama 3.1 rope scaling)"}  # when all ones


def tensor_plan(config: ModelConfig, arch: str) -> dict[str, Target]:
    """llama.cpp tensor name -> Target, for every parameter of a GPT of `config`.

    >>> cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, bias=False)
    >>> tensor_plan(cfg, "llama")["blk.0.attn_k.weight"]
    Target(param='transformer.h.0.attn.c_attn.weight', start=32, stop=48, heads=2)
    """
    C, V, F = config.n_embd, config.vocab_size, config.hidden_dim
    q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    permuted = arch == "llama"  # llama.cpp permutes llama's Q/K rows for its interleaved rope; not qwen2's
    plan = {"token_embd.weight": Target("transformer.wte.weight", 0, V),
            "output_norm.weight": Target("transformer.ln_f.weight", 0, C)}
    if not config.tie_embeddings:
        plan["output.weight"] = Target("lm_head.weight", 0, V)
    for i in range(config.n_layer):
        b, h = f"blk.{i}.", f"transformer.h.{i}."
        plan[b + "attn_norm.weight"] = Target(h + "ln_1.weight", 0, C)
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            c_attn = h + f"attn.c_attn.{kind}"  # rows: q (n_head heads), k, v (kv_heads heads each)
            plan[b + f"attn_q.{kind}"] = Target(c_attn, 0, q, config.n_head if permuted else None)
            plan[b + f"attn_k.{kind}"] = Target(c_attn, q, q + kv, config.kv_heads if permuted else None)
            plan[b + f"attn_v.{kind}"] = Target(c_attn, q + kv, q + 2 * kv)
        plan[b + "attn_output.weight"] = Target(h + "attn.c_proj.weight", 0, C)
        plan[b + "ffn_norm.weight"] = Target(h + "ln_2.weight", 0, C)
        plan[b + "ffn_gate.weight"] = Target(h + "mlp.c_fc.weight", 0, F)  # c_fc rows: gate, then up
        plan[b + "ffn_up.weight"] = Target(h + "mlp.c_fc.weight", F, 2 * F)
        plan[b + "ffn_down.weight"] = Target(h + "mlp.c_proj.weight", 0, C)
    return plan


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K permutation: within each head its rows are stored as interleaved pairs
    (x0 y0 x1 y1 ..., for rope on adjacent pairs), ours are halves (x0 x1 ... y0 y1 ..., rotate-half).

    >>> unpermute_rows(torch.arange(4.0), 1)
    tensor([0., 2., 1., 3.])
    """
    hd = w.shape[0] // heads
    pairs = w.reshape(heads, hd // 2, 2, *w.shape[1:])  # (heads, head_dim/2, 2, ...): rows 2i, 2i+1
    return pairs.transpose(1, 2).reshape(w.shape)  # (heads, 2, head_dim/2, ...) -> (rows, ...)


def _check_tensors(f: GGUFFile, plan: dict[str, Target], params: dict, arch: str) -> None:
    """Before any copy: one ScratchError listing every unknown, missing and misshapen tensor; then each
    tensor type is tried on one block, and the ignored tensors are checked."""
    want = {n: (t.stop - t.start, *params[t.param].shape[1:]) for n, t in plan.items()}
    problems = {"shape mismatch": [f"{n}: file {f.tensors[n].shape} vs model {s}" for n, s in want.items()
                                   if n in f.tensors and f.tensors[n].shape != s],
                "missing tensors": [n for n in want if n not in f.tensors],
                "unknown tensors": [n for n in f.tensors if n not in want and n not in IGNORED]}
    lines = [f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
             for title, items in problems.items() if items]
    if lines:
        raise ScratchError("\n".join([f"{f.path}: tensors do not fit the {arch} model its metadata describes:",
                                      *lines]))
    for t in {t.qtype: t for t in f.tensors.values()}.values():  # one tensor of each type
        _, block, block_bytes = type_info(t.qtype, t.name)
        dequantize(bytes(block_bytes), t.qtype, (block,), t.name)
    for name in IGNORED.keys() & f.tensors.keys():
        t = f.tensors[name]
        if not torch.all(dequantize(f.raw(t), t.qtype, t.shape, name) == 1):
            raise ScratchError(f"{f.path}: {name} holds {IGNORED[name]} that are not all 1, which scratchllm's "
                               "GPT cannot represent")


def load_gguf_model(path, device="cpu", progress: bool = True) -> tuple[GPT, GGUFFile]:
    """Our GPT (fp32, eval mode, on `device`) with the weights of the GGUF file `path` (or of a GGUFFile
    already read), and the parsed file (call its .close() when done). `progress`: a progress line on
    stderr when loading is slow."""
    f = path if isinstance(path, GGUFFile) else read_gguf(path)
    arch = f.metadata.get("general.architecture")
    config = config_from_gguf(f.metadata, str(f.path), f.tensors)
    plan = tensor_plan(config, arch)
    model = empty_model(config, device)  # allocated, not initialised: every parameter is filled below
    params = dict(model.named_parameters())
    uncovered = set(params) - {t.param for t in plan.values()}
    assert not uncovered, f"tensor_plan leaves parameters unset: {sorted(uncovered)}"
    _check_tensors(f, plan, params, arch)
    bar = Progress(len(plan), unit="tensors", desc=f"loading {f.path.name}", enabled=progress)
    with torch.no_grad():
        for name, target in plan.items():
            params[target.param][target.start:target.stop].copy_(_tensor_fp32(f, name, target))
            bar.update(1)
    bar.close()
    return model.eval(), f


def _tensor_fp32(f: GGUFFile, name: str, target: Target) -> torch.Tensor:
    """GGUF tensor `name` dequantized to float32 (this tensor only), checked finite, its rows in our
    order (llama.cpp's Q/K permutation undone)."""
    t = f.tensors[name]
    w = dequantize(f.raw(t), t.qtype, t.shape, name)  # (rows, ...)
    if not torch.isfinite(w).all():
        raise ScratchError(f"{f.path}: tensor {name} holds inf or nan values (a corrupt file?)")
    return w if target.heads is None else unpermute_rows(w, target.heads)


def gguf_info(f: GGUFFile) -> dict:
    """What a GGUF file holds, for a report: architecture, name, tensor types counted, size."""
    return {"architecture": f.metadata.get("general.architecture"), "name": f.metadata.get("general.name"),
            "quant_types": dict(Counter(t.type_name for t in f.tensors.values()).most_common()),
            "file_size": f.size, "tensors": len(f.tensors),
            "ignored": sorted(IGNORED.keys() & f.tensors.keys())}


def load_gguf(path, device="cpu", progress: bool = True):
    """(model, tokenizer, chat_format, info) of one GGUF file: the GPT of load_gguf_model, the tokenizer
    and chat format (None when unknown) of its metadata, and gguf_info with the seconds it took."""
    return _with_tokenizer(path, lambda f: load_gguf_model(f, device, progress)[0])


def _with_tokenizer(path, build_model):
    """(build_model(file), tokenizer, chat_format, info) of a GGUF file; the file is closed after."""
    from scratchllm.tokenizer.chat import detect_chat_format
    from scratchllm.tokenizer.convert import tokenizer_from_gguf_metadata

    start = time.perf_counter()
    f = read_gguf(path)  # the tokenizer first: a file whose tokenizer we refuse fails before any weight is read
    tokenizer = tokenizer_from_gguf_metadata(f.metadata, str(f.path))
    chat_format = detect_chat_format(f.metadata.get("tokenizer.chat_template"), str(f.path))
    model = build_model(f)
    info = {**gguf_info(f), "seconds": round(time.perf_counter() - start, 3)}
    f.close()
    return model, tokenizer, chat_format, info


def _quant_weight(f: GGUFFile, name: str, target: Target, weights: str):
    """One GGUF tensor as a QuantWeight: as stored when its type is the format asked for (or weights is
    auto), else dequantized alone and requantized; Q/K rows un-permuted like load_gguf_model's."""
    from scratchllm.model.quant import GGUF_TYPES, QuantWeight

    t = f.tensors[name]
    family = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}.get(GGUF_TYPES.get(t.qtype, ""))
    if family is None or weights not in ("auto", family):  # rows are quantized one by one: order them first
        return QuantWeight.quantize(_tensor_fp32(f, name, target), "bf16" if weights == "auto" else weights)
    qw = QuantWeight.from_gguf(f.raw(t), t.qtype, t.shape, f"{f.path}: {name}")
    return qw if target.heads is None else qw.take_rows(unpermute_rows(torch.arange(t.shape[0]), target.heads))


def load_gguf_quantized(path, weights: str = "auto", progress: bool = True):
    """(model, tokenizer, chat_format, info) of a GGUF file, like load_gguf, with every matrix kept as a
    QuantWeight (see the module doc; `weights`: auto, bf16, int8 or int4). CPU only."""
    from scratchllm.model.quant import QUANT_FORMATS

    if weights not in ("auto", *QUANT_FORMATS):
        raise ScratchError(f"weights must be auto or one of {', '.join(QUANT_FORMATS)}, got {weights!r}")
    return _with_tokenizer(path, lambda f: _quantized_model(f, weights, progress))


def _quantized_model(f: GGUFFile, weights: str, progress: bool) -> GPT:
    """The GPT of an open GGUF file with QuantWeight matrices (load_gguf_quantized)."""
    from scratchllm.model.quant import QuantEmbedding, QuantLinear, QuantWeight

    arch = f.metadata.get("general.architecture")
    config = config_from_gguf(f.metadata, str(f.path), f.tensors)
    plan = tensor_plan(config, arch)
    model = meta_model(config)  # no memory: every matrix is replaced below, the rest allocated after
    _check_tensors(f, plan, dict(model.named_parameters()), arch)
    by_param: dict[str, list[tuple[int, str, Target]]] = {}
    for name, target in plan.items():
        by_param.setdefault(target.param, []).append((target.start, name, target))
    bar = Progress(len(plan), unit="tensors", desc=f"loading {f.path.name}", enabled=progress)

    def fp32(parts) -> torch.Tensor:  # a parameter's GGUF tensors dequantized (norms, biases: small)
        bar.update(len(parts))
        return torch.cat([_tensor_fp32(f, name, target) for _, name, target in sorted(parts)])

    with torch.no_grad():
        matrices = {}
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                matrices[f"{name}.weight"] = module
        quantized = {}
        for param, parts in by_param.items():
            if param in matrices:
                qws = [_quant_weight(f, name, target, weights) for _, name, target in sorted(parts)]
                try:
                    quantized[param] = QuantWeight.cat(qws) if len(qws) > 1 else qws[0]
                except ScratchError:  # q/k/v stored in different types: one format for the fused matrix,
                    full = torch.cat([qw.dequantize() for qw in qws])  # the finest of its parts (auto)
                    finest = next(fm for fm in ("bf16", "int8", "int4") if any(qw.fmt == fm for qw in qws))
                    quantized[param] = QuantWeight.quantize(full, finest if weights == "auto" else weights, 32)
                bar.update(len(parts))
        wte = quantized.pop("transformer.wte.weight")
        model.transformer.wte = QuantEmbedding(wte)
        model.lm_head = QuantLinear(quantized.pop("lm_head.weight", wte))
        done = set(quantized) | {"transformer.wte.weight", "lm_head.weight"}
        for param, qw in quantized.items():  # the blocks' nn.Linear modules, with their biases (qwen2)
            path = param.rsplit(".", 1)[0]
            parent, child = path.rsplit(".", 1)
            bias = by_param.get(f"{path}.bias")
            done.add(f"{path}.bias")
            setattr(model.get_submodule(parent), child, QuantLinear(qw, None if bias is None else fp32(bias)))
        for module in model.modules():  # what is left: norms, in fp32 on the CPU
            for key, p in module._parameters.items():
                if p is not None and p.is_meta:
                    module._parameters[key] = torch.nn.Parameter(torch.empty(p.shape), requires_grad=False)
        params = dict(model.named_parameters())
        for param, parts in by_param.items():
            if param not in done:
                params[param].copy_(fp32(parts))
    bar.close()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"parameters left unset: {left}"
    return model.eval()
