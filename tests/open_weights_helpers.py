"""Test helpers for open weights: tiny random Llama / Qwen2 models written as GGUF files the way
llama.cpp's converter does it, a tiny ChatML byte-level BPE tokenizer, and SmolLM2's reference files.

What it does (plain functions; conftest.py wraps the expensive ones as session fixtures):
- `tiny_hf(arch, tie, seed, vocab_size)`: a tiny random transformers LlamaForCausalLM / Qwen2ForCausalLM;
  `write_gguf(gguf, path, hf, ...)` writes it as GGUF (names, permuted Q/K rows and metadata keys as
  `convert_hf_to_gguf.py` writes them), with placeholder tokens or a real tokenizer's metadata;
  `hf_on_dequantized` gives the reference for a quantized file.
- `train_tiny_chat_tokenizer()`: a byte-level BPE (300 ids) trained in-process, with <|endoftext|>,
  <|im_start|>, <|im_end|>; `gguf_tokenizer_metadata` writes such a tokenizer the way llama.cpp does.
- `build_tiny_gguf(gguf, folder, tokenizer)`: a TinyGGUF (.path, .vocab_size, .config, .logits(idx)):
  a tiny Llama GGUF with that tokenizer and a ChatML template with a default system prompt.
- `export_chat_tokenizer_files(tokenizer, folder)`: the tokenizer.json + tokenizer_config.json (ChatML
  template) of a hub repo, as bytes, written by our export_hf.
- `gguf_metadata(path)` (the gguf package's GGUFReader) and `save_smollm2_tokenizer_folders(auto, root)`:
  SmolLM2's references for the tokenizer and chat tests.
What it does not do: assert anything (the tests do), or touch the network.

    from open_weights_helpers import tiny_hf, write_gguf
    path = write_gguf(gguf, tmp_path / "tiny.gguf", tiny_hf("llama"))
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch


# --------------------------------------------------------------------------------------------- tiny models
def permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py): rotate-half rows -> interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_hf(arch="llama", tie=False, seed=0, vocab_size=97):
    """A tiny random transformers LlamaForCausalLM / Qwen2ForCausalLM, every parameter perturbed."""
    import transformers

    kw = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
              bos_token_id=0, eos_token_id=0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **kw)
        model_cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(use_sliding_window=False, **kw)
        model_cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(seed)
    hf = model_cls(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return hf


HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_tensors(hf, arch):
    """(gguf name, fp32 array) of an HF model as llama.cpp's converter writes them (Q/K permuted for llama)."""
    cfg, out = hf.config, []
    for name, t in hf.state_dict().items():
        w = t.float().numpy()
        if name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            out.append(("output.weight", w))
            continue
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            out.append(({"model.embed_tokens.weight": "token_embd.weight"}.get(name, "output_norm.weight"), w))
            continue
        _, _, i, rest = name.split(".", 3)  # model.layers.{i}.{module}.{weight|bias}
        module, kind = rest.rsplit(".", 1)
        if arch == "llama" and module == "self_attn.q_proj":
            w = permute(w, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and module == "self_attn.k_proj":
            w = permute(w, cfg.num_attention_heads, cfg.num_key_value_heads)
        out.append((f"blk.{i}.{HF_TO_GGUF[module]}.{kind}", w))
    return out


def write_gguf(gguf, path, hf, arch="llama", qtypes=(), meta=None, edit=None, tokenizer=None):
    """Write `hf` as a GGUF file the way convert_hf_to_gguf.py does. qtypes: GGML types that the 2-D
    weights cycle through (default F32); meta: extra {key: (value, GGUFValueType)}; edit(tensors) ->
    tensors, where an array may be replaced by (uint8 blocks, GGML type) to write as it is;
    tokenizer: {key: (value, GGUFValueType)} of gguf_tokenizer_metadata (default: placeholder tokens)."""
    cfg, T = hf.config, gguf.GGMLQuantizationType
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)  # the keys convert_hf_to_gguf.py writes for llama
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(1)
    if tokenizer is None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
        w.add_token_scores([0.5] * cfg.vocab_size)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    for key, value in {**(tokenizer or {}), **(meta or {})}.items():
        w.add_key_value(key, *value)
    tensors = gguf_tensors(hf, arch)
    tensors = edit(tensors) if edit else tensors
    n2d = 0
    for name, arr in tensors:
        if isinstance(arr, tuple):  # (raw uint8 blocks, their type), written as they are
            data, qtype = arr
        else:
            qtype = qtypes[n2d % len(qtypes)] if qtypes and arr.ndim == 2 else T.F32
            n2d += arr.ndim == 2
            data = gguf.quants.quantize(arr, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if qtype not in (T.F32, T.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_on_dequantized(gguf, hf, qtypes):
    """`hf` with each 2-D weight replaced by gguf's dequantize(quantize(w)), the types cycling in the order
    write_gguf uses (the state dict's); quantizing row blocks commutes with the Q/K row permutation."""
    sd = hf.state_dict()
    tied = hf.config.tie_word_embeddings
    keys = [k for k, v in sd.items() if v.ndim == 2 and not (k == "lm_head.weight" and tied)]
    with torch.no_grad():
        for i, key in enumerate(keys):
            qtype = qtypes[i % len(qtypes)]
            w = gguf.quants.dequantize(gguf.quants.quantize(sd[key].numpy(), qtype), qtype)
            sd[key].copy_(torch.from_numpy(w.reshape(sd[key].shape)))
    return hf


# --------------------------------------------------------------------------------------------- tiny tokenizer
CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_SYSTEM = "You are a tiny test model."
TINY_TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! What is the capital of France? "
             "Paris is the capital of France. 1 + 1 = 2, and 12 + 30 = 42.\n") * 4


def train_tiny_chat_tokenizer():
    """A byte-level BPE of 300 ids (256 bytes, 41 merges, the 3 CHAT_SPECIALS last), GPT-2's split,
    trained in-process on TINY_TEXT and a ChatML conversation."""
    from scratchllm.tokenizer import train_bpe

    chat = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n<|endoftext|>"
    return train_bpe([TINY_TEXT, chat], vocab_size=300, special_tokens=CHAT_SPECIALS, name="tiny-chat")


def gguf_tokenizer_metadata(gguf, tokenizer, pre="gpt-2", chat_template=None, bos="<|endoftext|>",
                            eos="<|im_end|>") -> dict:
    """{key: (value, GGUFValueType)}: our byte-level BPE as llama.cpp writes one (model gpt2, tokens in
    GPT-2's printable-byte alphabet by id, token_type 1 normal / 3 control, merges 'left right')."""
    from scratchllm.weights.hf import hf_vocab_and_merges

    V = gguf.GGUFValueType
    vocab, merges = hf_vocab_and_merges(tokenizer)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "token ids must be 0..n-1"
    types = [3 if t in tokenizer.special_tokens else 1 for t in tokens]
    out = {"tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": (pre, V.STRING),
           "tokenizer.ggml.tokens": (tokens, V.ARRAY), "tokenizer.ggml.token_type": (types, V.ARRAY),
           "tokenizer.ggml.merges": (merges, V.ARRAY),
           "tokenizer.ggml.bos_token_id": (vocab[bos], V.UINT32), "tokenizer.ggml.eos_token_id": (vocab[eos], V.UINT32)}
    if chat_template is not None:
        out["tokenizer.chat_template"] = (chat_template, V.STRING)
    return out


@dataclass
class TinyGGUF:
    """A tiny Llama GGUF file and its reference: transformers' model of the same weights."""
    path: Path  # the .gguf file (read it, do not change it)
    vocab_size: int  # the model's
    config: object  # the transformers LlamaConfig
    hf: object  # the transformers LlamaForCausalLM (eval mode, fp32)
    tokenizer: object  # our Tokenizer whose metadata the file holds
    chat_template: str

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """The reference logits (B, T, vocab_size), fp32, of ids (B, T)."""
        with torch.no_grad():
            return self.hf(idx).logits.float()


def build_tiny_gguf(gguf, folder: Path, tokenizer) -> TinyGGUF:
    """folder/tiny.gguf: tiny_hf("llama") sized to `tokenizer`, its metadata (pre "gpt-2") and a ChatML
    template with TINY_SYSTEM as the default system prompt (as SmolLM2's has)."""
    from scratchllm.tokenizer.chat import CHATML, jinja_template

    template = jinja_template(replace(CHATML, system_prompt=TINY_SYSTEM))
    hf = tiny_hf("llama", vocab_size=tokenizer.vocab_size)
    meta = gguf_tokenizer_metadata(gguf, tokenizer, chat_template=template)
    path = write_gguf(gguf, Path(folder) / "tiny.gguf", hf, tokenizer=meta)
    return TinyGGUF(path, hf.config.vocab_size, hf.config, hf, tokenizer, template)


def export_chat_tokenizer_files(tokenizer, folder: Path, vocab_size: int = 320) -> dict[str, bytes]:
    """{"tokenizer.json": ..., "tokenizer_config.json": ...} (bytes) of `tokenizer` with the plain ChatML
    template, as our export_hf writes them for a tiny Llama-style model of `vocab_size`."""
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer.chat import CHATML
    from scratchllm.weights.hf import export_hf

    cfg = ModelConfig(block_size=64, vocab_size=vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                      mlp_hidden=32, dropout=0.0, bias=False, norm="rmsnorm", positions="rope", mlp="swiglu")
    out = export_hf(GPT(cfg), tokenizer, Path(folder) / "export", chat=CHATML)
    return {name: (out / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}


# --------------------------------------------------------------------------------------------- SmolLM2
def gguf_metadata(path) -> dict:
    """A GGUF file's metadata as a plain dict, read with the gguf package's GGUFReader (SmolLM2: ~3 s)."""
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(path)).fields.items() if not k.startswith("GGUF.")}


def save_smollm2_tokenizer_folders(auto, root: Path) -> tuple[Path, Path]:
    """(the folder transformers' `auto` tokenizer (built from the GGUF) saves, the same folder with the
    tokenizer.json pre-tokenizer SmolLM2 publishes: Digits(individual) + ByteLevel), under `root`."""
    saved, real = Path(root) / "SmolLM2-135M-Instruct-gguf", Path(root) / "SmolLM2-135M-Instruct"
    auto.save_pretrained(saved)
    shutil.copytree(saved, real)
    d = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))
    d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    (real / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
    return saved, real
