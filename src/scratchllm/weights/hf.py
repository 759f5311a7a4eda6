"""Hugging Face folders in and out: config, weights (safetensors) and tokenizer files.

What it does:
- `load_hf_model(path)` reads a transformers folder as published on the hub into our GPT: GPT-2
  (`openai-community/gpt2`: keys lose their `transformer.` prefix where present, the attention-mask
  buffers are dropped, the Conv1D weights (stored (in, out)) are transposed to nn.Linear's (out, in)),
  and the Llama family (Llama / SmolLM, Mistral without sliding window, Qwen2; hf_llama.py), from
  `model.safetensors` or the shards of `model.safetensors.index.json`. `config_from_hf` is the config
  part alone; `load_hf_gpt2` is the GPT-2-only loader.
- `load_hf_tokenizer(folder)` reads GPT-2's vocab.json, or any other folder's tokenizer.json (through
  tokenizer/convert.py); `hf_chat_format(folder)` the chat format of tokenizer_config.json's template.
- `export_hf(model, tokenizer, out_dir, chat=None)` writes a folder that transformers'
  `AutoModelForCausalLM` and `AutoTokenizer` load unchanged: a GPT2LMHeadModel for GPT-2-architecture
  models (with `vocab.json` + `merges.txt`: our ranks in GPT-2's printable-byte alphabet), a
  LlamaForCausalLM / Qwen2ForCausalLM for rmsnorm + rope + swiglu ones; always `config.json`,
  `model.safetensors`, `tokenizer.json` (the fast tokenizer, carrying our split pattern),
  `tokenizer_config.json` (+ the chat template of `chat`) and `special_tokens_map.json`.
What it does not do: import transformers (only its file formats are used), read TF or pickle files,
or convert architectures neither format can express (layernorm + rope, ...: an error, before any write).

    model = load_hf_model("~/.cache/scratchllm/gpt2/124M")     # or a SmolLM2 / Qwen2 folder
    export_hf(model, tokenizer, "out/hf")   # then AutoModelForCausalLM.from_pretrained("out/hf")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from scratchllm.common import ScratchError, atomic_dir, read_json
from scratchllm.model import GPT, ModelConfig
from scratchllm.weights import hf_llama
from scratchllm.weights.state import config_from_file, empty_model, load_state_dict_checked, read_safetensors

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation GPT-2 uses


# --------------------------------------------------------------------------------------------- config
def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a transformers config dict (GPT-2, Llama, Mistral, Qwen2; no model_type
    means GPT-2); refuses variants we cannot compute exactly, naming the field and its value."""
    model_type = d.get("model_type", "gpt2")
    if model_type in hf_llama.ARCHITECTURES:
        return hf_llama.config_from_llama(d, source)
    if model_type != "gpt2":
        raise ScratchError(f"{source}: model_type is {model_type!r}; supported: gpt2, "
                           f"{', '.join(hf_llama.ARCHITECTURES)} (SmolLM / SmolLM2 are llama)")
    return gpt2_config(d, source)


def gpt2_config(d: dict, source: str) -> ModelConfig:
    """Our ModelConfig from a transformers GPT2Config dict."""
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in d]
    if missing:
        raise ScratchError(f"{source}: required field(s) {', '.join(missing)} missing")
    if d.get("activation_function", "gelu_new") not in GELU_TANH:
        raise ScratchError(f"{source}: activation_function {d['activation_function']!r} is not supported "
                           f"(expected one of {', '.join(GELU_TANH)})")
    if d.get("n_inner") not in (None, 4 * d["n_embd"]):
        raise ScratchError(f"{source}: n_inner {d['n_inner']} is not 4 * n_embd; not supported")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if d.get(flag):
            raise ScratchError(f"{source}: {flag}=true is not supported")
    if d.get("scale_attn_weights", True) is not True:
        raise ScratchError(f"{source}: scale_attn_weights=false is not supported")
    return ModelConfig(block_size=d["n_positions"], vocab_size=d["vocab_size"], n_layer=d["n_layer"],
                       n_head=d["n_head"], n_embd=d["n_embd"], dropout=0.0, bias=True,
                       tie_embeddings=d.get("tie_word_embeddings", True),
                       norm_eps=d.get("layer_norm_epsilon", 1e-5))


def config_to_hf(cfg: ModelConfig, eot: int | None = None) -> dict:
    """transformers config fields for our model: GPT2Config for the GPT-2 architecture, else a Llama /
    Qwen2 config (hf_llama.config_to_llama); a ScratchError saying what neither format can express."""
    if cfg.is_gpt2:
        return gpt2_config_to_hf(cfg, eot)
    if not hf_llama.llama_problems(cfg):
        return hf_llama.config_to_llama(cfg, eot, eot)
    switches = dict(norm=cfg.norm, positions=cfg.positions, mlp=cfg.mlp, n_kv_head=cfg.n_kv_head,
                    mlp_hidden=cfg.mlp_hidden, bias=cfg.bias, qkv_bias=cfg.qkv_bias)
    raise ScratchError(f"this model cannot be exported to Hugging Face format: GPT-2 needs layernorm, learned "
                       f"positions, gelu, n_kv_head = n_head and a 4x MLP; Llama / Qwen2 need rmsnorm, rope "
                       f"and swiglu ({'; '.join(hf_llama.llama_problems(cfg))}); it has {switches}")


def gpt2_config_to_hf(cfg: ModelConfig, eot: int | None) -> dict:
    """transformers GPT2Config fields for a GPT-2-architecture ModelConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------------------------- weights
def state_dict_from_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 keys/layout -> ours: `transformer.` prefix, no mask buffers, Conv1D transposed."""
    out = {}
    for key, t in sd.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith((".attn.bias", ".attn.masked_bias")) and t.dim() != 1:
            continue  # the causal-mask buffers of old transformers versions, not weights
        out[name] = t.t().contiguous() if name.endswith(CONV1D) else t  # (in, out) -> (out, in)
    return out


def state_dict_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights in HF GPT2LMHeadModel layout (Conv1D (in, out), zero biases when the model has
    none); the tied head is left out."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue
        t = t.detach().to("cpu", torch.float32)
        out[name] = t.t().contiguous() if name.endswith(CONV1D) else t.contiguous()
        if not model.config.bias and name.endswith(CONV1D + (".ln_1.weight", ".ln_2.weight", "ln_f.weight")):
            # GPT-2 always has biases: a bias-free model is the same model with zero biases
            out[name.removesuffix("weight") + "bias"] = torch.zeros(out[name].shape[-1])
    return out


def _hf_folder(path: str | Path) -> tuple[Path, Path | None, dict, str]:
    """(folder, the weights file when `path` names one, config dict, config path) of a HF model path."""
    path = Path(path).expanduser()
    folder, weights = (path.parent, path) if path.is_file() else (path, None)
    source = folder / "config.json"
    if not source.is_file():
        raise ScratchError(f"{folder}: config.json not found (a HF model folder needs config.json + "
                           "model.safetensors or model.safetensors.index.json)")
    return folder, weights, read_json(source), str(source)


def load_hf_model(path: str | Path, device="cpu") -> GPT:
    """Our GPT (eval mode) from a HF folder (config.json + model.safetensors, or the shards of
    model.safetensors.index.json) or the model.safetensors inside one; every dtype is read as fp32.
    model_type gpt2, llama, mistral, qwen2 (see config_from_hf for the variants refused)."""
    folder, weights, d, source = _hf_folder(path)
    config = config_from_file(lambda: config_from_hf(d, source), source)  # a config we refuse: before any I/O
    files, listing = hf_llama.tensor_files(folder, weights)  # {tensor name: file}, from the headers
    model = empty_model(config, device)
    if d.get("model_type", "gpt2") in hf_llama.ARCHITECTURES:
        hf_llama.load_llama_weights(model, files, listing)  # tensor by tensor, into the empty model
    else:  # GPT-2: small enough to read whole, and its published keys come in several layouts
        sd = {}
        for shard in sorted(set(files.values())):
            sd.update(read_safetensors(shard))
        load_state_dict_checked(model, state_dict_from_hf(sd), listing)
    return model.eval()


def load_hf_gpt2(path: str | Path, device="cpu") -> GPT:
    """load_hf_model for GPT-2 folders only (what `download gpt2` checks): another model_type is refused."""
    _, _, d, source = _hf_folder(path)
    if d.get("model_type", "gpt2") != "gpt2":
        raise ScratchError(f"{source}: model_type is {d['model_type']!r}, only 'gpt2' checkpoints can be "
                           "imported here (load_hf_model reads every supported model_type)")
    return load_hf_model(path, device)


# --------------------------------------------------------------------------------------------- tokenizer
def hf_vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[str]]:
    """Our ranks as GPT-2 files: vocab {printable token: id} and merges ["left right", ...] in rank order.

    >>> vocab, merges = hf_vocab_and_merges(load_tokenizer("gpt2"))
    >>> vocab["Ġthe"], merges[0]
    (262, 'Ġ t')
    """
    from scratchllm.tokenizer.gpt2 import printable

    vocab = {printable(t): i for t, i in tokenizer.mergeable_ranks.items()}
    vocab.update(tokenizer.special_tokens)
    merges = [f"{printable(a)} {printable(b)}" for a, b in tokenizer.merges()]
    return vocab, merges


def _fast_tokenizer_json(tokenizer, vocab: dict[str, int], merges: list[str]) -> str:
    """tokenizer.json for HF's fast tokenizer: our split regex, then GPT-2's byte-level BPE.
    ignore_merges=True makes a piece that is itself a token encode as that token, as tiktoken does."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], ignore_merges=True)
    tok = HFTokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s, _ in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])])
    return tok.to_str(pretty=True)


def load_hf_tokenizer(folder: str | Path):
    """Our Tokenizer from a HF folder, or None when it holds no tokenizer files: a GPT-2 folder's
    vocab.json (ids = ranks; see _gpt2_vocab_tokenizer), any other folder's tokenizer.json (through
    tokenizer.convert.tokenizer_from_hf_json). A sentencepiece-only folder is refused."""
    folder = Path(folder)
    config = folder / "config.json"
    model_type = read_json(config).get("model_type", "gpt2") if config.is_file() else "gpt2"
    if model_type == "gpt2" and (folder / "vocab.json").is_file():
        return _with_padding(_gpt2_vocab_tokenizer(folder), folder)
    if (folder / "tokenizer.json").is_file():
        from scratchllm.tokenizer.convert import tokenizer_from_hf_json

        return _with_padding(tokenizer_from_hf_json(folder / "tokenizer.json"), folder)
    others = [n for n in ("tokenizer.model", "vocab.json") if (folder / n).is_file()]
    if others:
        raise ScratchError(f"{folder}: has {', '.join(others)} but no tokenizer.json; only a tokenizer.json "
                           "(or a GPT-2 folder's vocab.json) can be read")
    return None


def _with_padding(tok, folder: Path):
    """The pad token and padding side of tokenizer_config.json (`pad_token`: a string or an
    {"content": ...} object), when it names one of the tokenizer's special tokens."""
    path = folder / "tokenizer_config.json"
    config = read_json(path) if path.is_file() else {}
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if isinstance(pad, str) and pad in tok.special_tokens:
        tok.pad_token = pad
    if config.get("padding_side") in ("left", "right"):
        tok.padding_side = config["padding_side"]
    return tok


def _gpt2_vocab_tokenizer(folder: Path):
    """Our Tokenizer from a GPT-2 folder's vocab.json, with the special tokens and the split pattern of
    its tokenizer.json when present (GPT-2's pattern otherwise)."""
    from scratchllm.tokenizer import Tokenizer
    from scratchllm.tokenizer.base import PATTERNS
    from scratchllm.tokenizer.gpt2 import token_bytes

    vocab = read_json(folder / "vocab.json")
    specials, pattern = {}, PATTERNS["gpt2"]
    if (folder / "tokenizer.json").is_file():
        fast = read_json(folder / "tokenizer.json")
        specials = {t["content"]: t["id"] for t in fast.get("added_tokens", []) if t.get("special")}
        for step in (fast.get("pre_tokenizer") or {}).get("pretokenizers", []):
            if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
                pattern = step["pattern"]["Regex"]
    elif "<|endoftext|>" in vocab:
        specials = {"<|endoftext|>": vocab["<|endoftext|>"]}
    ranks = {}
    for token, idx in vocab.items():
        if token in specials:
            continue
        b = token_bytes(token)
        if b is None:
            raise ScratchError(f"{folder / 'vocab.json'}: token {token!r} is not in GPT-2's byte alphabet "
                               "(not a byte-level BPE vocabulary)")
        ranks[b] = idx
    return Tokenizer(ranks, pattern, specials, name=folder.name)


def hf_chat_template(folder: str | Path) -> tuple[str | None, str]:
    """(the chat template, the file it came from) of a HF folder: chat_template.jinja (newer
    transformers), else tokenizer_config.json's `chat_template`, a string or a list of
    {"name", "template"} (the one named "default" is used, as transformers does); (None, file) if none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8"), str(folder / "chat_template.jinja")
    source = folder / "tokenizer_config.json"
    template = read_json(source).get("chat_template") if source.is_file() else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ScratchError(f"{source}: chat_template lists {sorted(map(str, named))} but none named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ScratchError(f"{source}: chat_template must be a string or a list of {{name, template}}, "
                           f"got a {type(template).__name__}")
    return template, str(source)


def hf_chat_format(folder: str | Path):
    """The ChatFormat (tokenizer.chat.detect_chat_format) of a HF folder's chat template; None without one."""
    template, source = hf_chat_template(folder)
    if template is None:
        return None
    from scratchllm.tokenizer.chat import detect_chat_format

    return detect_chat_format(template, source)


def check_export_dir(out_dir: str | Path, overwrite: bool = False) -> bool:
    """Refuse an `out_dir` export_hf cannot write (before any work): a non-empty folder or a file
    without `overwrite`, or a path whose parent folder cannot be made. Returns True for an empty folder."""
    out_dir = Path(out_dir)
    empty_dir = out_dir.is_dir() and not any(out_dir.iterdir())
    if out_dir.exists() and not (empty_dir or overwrite):
        kind = "is not empty" if out_dir.is_dir() else "is a file"
        raise ScratchError(f"{out_dir} already exists and {kind} (pass --overwrite to replace it)")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission, ...
        raise ScratchError(f"cannot create {out_dir}: making {out_dir.parent} failed ({e.strerror or e})") from None
    return empty_dir


def _write_tokenizer(tmp: Path, tokenizer, gpt2: bool, block_size: int, template: str | None) -> None:
    """The tokenizer files of an export: tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    and for GPT-2 folders also vocab.json + merges.txt (what GPT2Tokenizer, the slow one, reads)."""
    vocab, merges = hf_vocab_and_merges(tokenizer)
    if gpt2:
        (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (tmp / "tokenizer.json").write_text(_fast_tokenizer_json(tokenizer, vocab, merges), encoding="utf-8")
    eot_text = "<|endoftext|>" if tokenizer.eot_token is not None else None
    specials = {"bos_token": eot_text, "eos_token": eot_text, **({"unk_token": eot_text} if gpt2 else {})}
    if tokenizer.pad_token is not None:
        specials["pad_token"] = tokenizer.pad_token
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                  "add_prefix_space": False, "add_bos_token": False, "padding_side": tokenizer.padding_side,
                  **specials}
    if template is not None:
        tok_config["chat_template"] = template
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def export_hf(model: GPT, tokenizer, out_dir: str | Path, overwrite: bool = False, chat=None) -> Path:
    """Write a HF folder (weights + tokenizer) that transformers loads unchanged: GPT2LMHeadModel for
    the GPT-2 architecture, LlamaForCausalLM / Qwen2ForCausalLM for rmsnorm + rope + swiglu models.
    `chat` (a tokenizer.chat.ChatFormat) adds its Jinja chat template to tokenizer_config.json, and a
    generation_config.json whose eos_token_id lists the tokens that end a turn (<|im_end|> and
    <|endoftext|> for ChatML): what transformers' generate and vLLM stop at.

    `out_dir` may be missing or an empty folder; anything else (a non-empty folder, a file) is
    refused unless `overwrite`, which replaces it only once the new folder is complete. Everything
    that can fail (the config, the tokenizer size, the template) fails before anything is written."""
    out_dir = Path(out_dir)
    empty_dir = check_export_dir(out_dir, overwrite)
    cfg = model.config
    eot = tokenizer.eot_token if tokenizer is not None else None
    hf_config = config_to_hf(cfg, eot)  # refuses what neither format can express
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ScratchError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                           f"{cfg.vocab_size} embedding rows: they do not belong together")
    if hf_config["model_type"] == "qwen2":
        hf_llama.check_qwen2_tokenizer(tokenizer)
    template, generation = None, None
    if chat is not None:
        from scratchllm.tokenizer.chat import jinja_template, turn_stops

        template = jinja_template(chat)
        stops = turn_stops(chat, tokenizer)[0] if tokenizer is not None else []
        if stops:
            generation = {"bos_token_id": hf_config.get("bos_token_id"), "eos_token_id": stops}
    weights = state_dict_to_hf(model) if cfg.is_gpt2 else hf_llama.state_dict_to_llama(model)
    with atomic_dir(out_dir, overwrite=overwrite or empty_dir) as tmp:  # an empty folder is replaced
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if generation is not None:
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            _write_tokenizer(tmp, tokenizer, cfg.is_gpt2, cfg.block_size, template)
    return out_dir
