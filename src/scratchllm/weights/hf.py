"""Hugging Face GPT-2 format in and out: config, weights (safetensors) and tokenizer files.

What it does:
- `load_hf_gpt2(path)` reads a GPT-2 folder as published on the hub (`config.json` +
  `model.safetensors`, e.g. openai-community/gpt2) into our GPT: keys lose their `transformer.`
  prefix where present, the attention-mask buffers (`h.N.attn.bias`) are dropped, and the Conv1D
  weights (stored (in, out)) are transposed to nn.Linear's (out, in). The head is tied to wte.
- `export_hf(model, tokenizer, out_dir)` writes a folder that `transformers.GPT2LMHeadModel` and
  `AutoTokenizer` load unchanged: `config.json`, `model.safetensors`, `vocab.json` + `merges.txt`
  (our ranks in GPT-2's printable-byte alphabet, merges derived from the ranks), `tokenizer.json`
  (the fast tokenizer, carrying our split pattern), `tokenizer_config.json`, `special_tokens_map.json`.
What it does not do: import transformers (only its file formats are used), read TF or pickle files,
or convert Llama-style configs (GPT-2's format cannot express them; that is an error).

    model = load_hf_gpt2("~/.cache/scratchllm/gpt2/124M")
    export_hf(model, tokenizer, "out/hf")   # then GPT2LMHeadModel.from_pretrained("out/hf")
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from scratchllm.common import ScratchError, atomic_dir, read_json
from scratchllm.model import GPT, ModelConfig
from scratchllm.weights.state import config_from_file, empty_model, load_state_dict_checked, read_safetensors

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # the tanh approximation GPT-2 uses


# --------------------------------------------------------------------------------------------- config
def config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a transformers GPT2Config dict; refuses variants we cannot compute exactly."""
    if d.get("model_type", "gpt2") != "gpt2":
        raise ScratchError(f"{source}: model_type is {d.get('model_type')!r}, only 'gpt2' checkpoints can be imported")
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
    """transformers GPT2Config fields for a GPT-2-architecture ModelConfig."""
    if not cfg.is_gpt2:
        switches = dict(norm=cfg.norm, positions=cfg.positions, mlp=cfg.mlp, n_kv_head=cfg.n_kv_head,
                        mlp_hidden=cfg.mlp_hidden)
        raise ScratchError(f"this model cannot be exported to GPT-2 format: GPT-2 needs layernorm, learned "
                           f"positions, gelu, n_kv_head = n_head and a 4x MLP; it has {switches}")
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


def load_hf_gpt2(path: str | Path, device="cpu") -> GPT:
    """Our GPT from a HF GPT-2 folder (config.json + model.safetensors) or its model.safetensors file."""
    path = Path(path).expanduser()
    folder = path.parent if path.is_file() else path
    weights = path if path.is_file() else folder / "model.safetensors"
    if not (folder / "config.json").is_file():
        raise ScratchError(f"{folder}: config.json not found (a HF GPT-2 folder needs config.json + model.safetensors)")
    if not weights.is_file():
        hint = " (only safetensors is read: no pickle / TF files)" if (folder / "pytorch_model.bin").exists() else ""
        raise ScratchError(f"{weights} not found{hint}")
    source = str(folder / "config.json")
    config = config_from_file(lambda: config_from_hf(read_json(source), source), source)
    sd = state_dict_from_hf(read_safetensors(weights))
    model = empty_model(config, device)
    load_state_dict_checked(model, sd, str(weights))
    return model.eval()


# --------------------------------------------------------------------------------------------- tokenizer
def hf_vocab_and_merges(tokenizer) -> tuple[dict[str, int], list[str]]:
    """Our ranks as GPT-2 files: vocab {printable token: id} and merges ["left right", ...] in rank order.

    >>> vocab, merges = hf_vocab_and_merges(load_tokenizer("gpt2"))
    >>> vocab["Ġthe"], merges[0]
    (262, 'Ġ t')
    """
    from scratchllm.tokenizer.gpt2 import bytes_to_unicode

    b2u = bytes_to_unicode()

    def printable(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

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
    """Our Tokenizer from a HF GPT-2 folder's vocab.json (ids = ranks), with the special tokens and the
    split pattern of its tokenizer.json when present (GPT-2's pattern otherwise); None without vocab.json."""
    from scratchllm.tokenizer import Tokenizer
    from scratchllm.tokenizer.base import PATTERNS
    from scratchllm.tokenizer.gpt2 import bytes_to_unicode

    folder = Path(folder)
    if not (folder / "vocab.json").is_file():
        return None
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
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {}
    for token, idx in vocab.items():
        if token in specials:
            continue
        try:
            ranks[bytes(byte_of[ch] for ch in token)] = idx
        except KeyError:
            raise ScratchError(f"{folder / 'vocab.json'}: token {token!r} is not in GPT-2's byte alphabet "
                               "(not a byte-level BPE vocabulary)") from None
    return Tokenizer(ranks, pattern, specials, name=folder.name)


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


def export_hf(model: GPT, tokenizer, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a HF GPT-2 folder (weights + tokenizer) that transformers loads unchanged.

    `out_dir` may be missing or an empty folder; anything else (a non-empty folder, a file) is
    refused unless `overwrite`, which replaces it only once the new folder is complete."""
    out_dir = Path(out_dir)
    empty_dir = check_export_dir(out_dir, overwrite)
    cfg = model.config
    eot = tokenizer.eot_token if tokenizer is not None else None
    hf_config = config_to_hf(cfg, eot)  # refuses Llama-style configs before anything is written
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ScratchError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                           f"{cfg.vocab_size} embedding rows: they do not belong together")
    with atomic_dir(out_dir, overwrite=overwrite or empty_dir) as tmp:  # an empty folder is replaced
        save_file(state_dict_to_hf(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            vocab, merges = hf_vocab_and_merges(tokenizer)
            (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
            (tmp / "tokenizer.json").write_text(_fast_tokenizer_json(tokenizer, vocab, merges), encoding="utf-8")
            eot_text = "<|endoftext|>" if eot is not None else None
            specials = {"bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text}
            tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
                          "add_prefix_space": False, "add_bos_token": False, **specials}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
            (tmp / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out_dir
