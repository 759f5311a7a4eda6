"""Our Tokenizer from foreign formats: a Hugging Face `tokenizer.json`, or a GGUF file's metadata.

What it does: reads byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3 style) into our
Tokenizer, whose ids ARE tiktoken merge ranks, and proves that this gives the same ids as the file's own
merge list (`check_merges`) before it says yes. The split step (HF's `pre_tokenizer`, llama.cpp's
`tokenizer.ggml.pre`) becomes ONE split regex (a name of base.PATTERNS where there is one); added /
control tokens become our special tokens and keep their ids.

What it does not do (each is a ScratchError naming the file, the field and the value):
SentencePiece-style BPE (`byte_fallback`, `<0x0A>` byte tokens, GGUF model "llama"), Unigram,
WordPiece, WordLevel, normalizers that change text (NFC is accepted: see below), pre-tokenizers other
than the three shapes of `pattern_from_pre_tokenizer`, added tokens that strip spaces
(lstrip/rstrip/single_word), BPE dropout or subword prefixes/suffixes. It never imports `gguf`,
`tokenizers` or `transformers`: the caller reads the GGUF file and hands over a plain dict.

Where ours and the reference can still differ, by design:
- Added tokens: HF matches every added token in raw text; ours are special tokens, so pass
  `allowed_special="all"` to `encode` to get HF's ids (encode_ordinary treats them as text).
- NFC normalizer (Qwen2's tokenizer.json): we do not normalize, so text that is not NFC
  (e.g. "e\\u0301") may encode differently from HF; NFC text encodes the same. llama.cpp does not
  normalize either.
- Byte tokens missing from a vocabulary (SmolLM2 lacks 21 of the 256 bytes, e.g. 0x04, 0xF5..0xFF)
  become the Tokenizer's `absent_bytes`: encoding drops them, as HF tokenizers (without an unk
  token) and llama.cpp do, so every id stays inside the model's vocabulary.
- HF's post-processor (e.g. Llama 3 adding <|begin_of_text|>) is not applied: that is the chat
  format's job (tokenizer/chat.py).

    tok = tokenizer_from_hf_json("SmolLM2-135M-Instruct/tokenizer.json")
    tok = tokenizer_from_gguf_metadata(gguf_file.metadata, "model.gguf")
    tok.encode("Hello <|im_end|>", allowed_special="all")
"""

from __future__ import annotations

from pathlib import Path

from scratchllm.common import ScratchError, read_json
from scratchllm.tokenizer.base import PATTERNS, bpe_encode_reference
from scratchllm.tokenizer.gpt2 import printable, token_bytes
from scratchllm.tokenizer.tokenizer import Tokenizer

SUPPORTED = ("supported: byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3 style), i.e. a BPE model "
             "over GPT-2's printable-byte alphabet, split by a regex")

# llama.cpp's `tokenizer.ggml.pre` names (src/llama-vocab.cpp, `llama_vocab::impl::load`) -> (our
# PATTERNS name, llama.cpp's ignore_merges for it). Each regex is the original one of the HF
# tokenizer.json that llama.cpp's pre-tokenizer type emulates.
GGUF_PRE: dict[str, tuple[str, bool]] = {
    **{n: ("gpt2", False) for n in ("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais")},
    **{n: ("llama3", True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral",
                                      "midm-2.0", "lfm2", "jina-v5-nano")},
    **{n: ("llama3", False) for n in ("dbrx", "smaug-bpe", "glm4", "chatglm-bpe")},
    **{n: ("qwen2", False) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2")},
    "qwen35": ("qwen35", False),
    **{n: ("smollm", False) for n in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")},
    "tekken": ("tekken", True),
    **{n: ("gpt4o", False) for n in ("gpt-4o", "minimax-m2")},
}
# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _short(value, n: int = 80) -> str:
    """repr() cut to n characters: for error messages that quote a field's value."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def check_merges(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]], ignore_merges: bool,
                 source: str) -> None:
    """Refuse a merge list that would not give tiktoken's ids for these ranks (ids taken as ranks).

    HF/llama.cpp BPE merges the adjacent pair listed first in `merges`; tiktoken merges the adjacent pair
    whose concatenation has the lowest id. They agree when (1) every merge joins two tokens into a token,
    (2) merges come in the order of the ids they build, and (3) each multi-byte token t is built, by
    tiktoken's own rule using only ids below t's, from exactly two parts (a, b) and (a, b) is a merge of
    the file. (3) also makes every token reachable, so HF's `ignore_merges` does not matter. A token
    tiktoken cannot build from lower ids is only allowed with ignore_merges (llama.cpp/HF then look
    whole words up, as tiktoken does) and when every split of it into two tokens is a merge
    (transformers' TikTokenConverter lists all such splits, e.g. Llama 3); for such tokens only a tie
    between two overlapping splits of the same token could still be ordered differently. Cost: the BPE
    loop once per token, about 1 s for 50k tokens.

    >>> ranks = {bytes([i]): i for i in range(256)} | {b"bc": 256, b"ab": 257, b"abc": 258}
    >>> check_merges(ranks, [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")], False, "t.json")
    >>> check_merges(ranks, [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")], False, "t.json")
    Traceback (most recent call last):
    scratchllm.common.ScratchError: t.json: token b'abc' (id 258) is built as b'a' + b'bc' by tiktoken's rule (the lowest id first), but the file has no merge 'a bc': its ids are not tiktoken ranks, so scratchllm's encoding would differ
    """
    last = -1
    for i, (a, b) in enumerate(merges):
        for part in (a, b, a + b):
            if part not in ranks:
                raise ScratchError(f"{source}: merge {i} ({printable(a)} {printable(b)}) uses or builds {part!r}, which "
                                   "is not a regular token of the vocabulary")
        if ranks[a + b] < last:
            raise ScratchError(f"{source}: merge {i} ({printable(a)} {printable(b)}) builds id {ranks[a + b]} after an "
                               f"earlier merge built id {last}: the merge order disagrees with the id order, so "
                               "the ids are not tiktoken ranks")
        last = ranks[a + b]
    listed = set(merges)
    for t, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) < 2:
            continue
        parts = bpe_encode_reference(t, ranks, max_rank=rank)
        if len(parts) == 2:
            if tuple(parts) not in listed:
                raise ScratchError(f"{source}: token {t!r} (id {rank}) is built as {parts[0]!r} + {parts[1]!r} by "
                                   f"tiktoken's rule (the lowest id first), but the file has no merge "
                                   f"'{printable(parts[0])} {printable(parts[1])}': its ids are not tiktoken ranks, so "
                                   "scratchllm's encoding would differ")
            continue
        splits = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ranks and t[k:] in ranks]
        if not ignore_merges or any(s not in listed for s in splits):
            raise ScratchError(f"{source}: token {t!r} (id {rank}) cannot be built from two lower-id tokens "
                               f"(tiktoken's rule stops at {len(parts)} parts) and the file "
                               f"{'does not list all its splits as merges' if ignore_merges else 'does not set ignore_merges'}"
                               ": scratchllm's encoding would differ from the file's")


def build_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], specials: dict[str, int],
                    pattern: str, ignore_merges: bool, name: str, source: str) -> Tokenizer:
    """Tokenizer from a byte-level BPE vocabulary {printable token: id} (specials may be in it too), its
    merges (left, right) and {special text: id}; every error names `source`."""
    ranks: dict[bytes, int] = {}
    for token, idx in vocab.items():
        if token in specials:
            if specials[token] != idx:
                raise ScratchError(f"{source}: token {token!r} has id {idx} in the vocabulary but {specials[token]} "
                                   "as an added token")
            continue
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise ScratchError(f"{source}: token {token!r} has id {_short(idx)}, not an integer")
        b = token_bytes(token)
        if b is None:
            raise ScratchError(f"{source}: token {token!r} (id {idx}) uses characters outside GPT-2's printable-"
                               f"byte alphabet: not a byte-level BPE vocabulary; {SUPPORTED}")
        if b in ranks:
            raise ScratchError(f"{source}: tokens with ids {ranks[b]} and {idx} stand for the same bytes {b!r}")
        ranks[b] = idx
    pairs = []
    for i, (a, b) in enumerate(merges):
        ab, bb = token_bytes(a), token_bytes(b)
        if ab is None or bb is None:
            raise ScratchError(f"{source}: merge {i} ({a} {b}) uses characters outside GPT-2's printable-byte "
                               f"alphabet; {SUPPORTED}")
        pairs.append((ab, bb))
    check_merges(ranks, pairs, ignore_merges, source)
    absent = [b for b in range(256) if bytes([b]) not in ranks]  # encode drops them, as HF and llama.cpp do
    try:
        return Tokenizer(ranks, pattern, specials, name=name, absent_bytes=absent)
    except ScratchError as e:
        raise ScratchError(f"{source}: {e}") from None


# --------------------------------------------------------------------------------------------- HF
def pattern_from_pre_tokenizer(pre, source: str) -> str:
    """HF's `pre_tokenizer` JSON -> one split regex (a PATTERNS name where one fits). Three shapes:
    ByteLevel(use_regex=true) alone (GPT-2); Sequence[Split(Regex, isolated), ByteLevel(use_regex=false)]
    (Qwen2, Llama 3: the regex as given); Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)]
    (SmolLM2, StarCoder). ByteLevel must not add a prefix space.

    >>> pattern_from_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "t")
    'gpt2'
    """
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ScratchError(f"{source}: field 'pre_tokenizer' is {_short(pre)}: not a pre-tokenizer this reads; {SUPPORTED}")
    kinds = [s.get("type") for s in steps]
    for s in steps:
        if s.get("type") == "ByteLevel" and s.get("add_prefix_space", True):
            raise ScratchError(f"{source}: field 'pre_tokenizer' has ByteLevel with add_prefix_space=true (a space "
                               "put before the text), which a split regex cannot do; only add_prefix_space=false "
                               "is supported")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex") if isinstance(split.get("pattern"), dict) else None
        if regex is None or str(split.get("behavior", "")).lower() != "isolated" or split.get("invert"):
            raise ScratchError(f"{source}: field 'pre_tokenizer' has Split {_short(split, 160)}: only a "
                               "{'Regex': ...} pattern with behavior 'Isolated' and invert=false is supported")
        return next((k for k, v in PATTERNS.items() if v == regex), regex)
    raise ScratchError(f"{source}: field 'pre_tokenizer' is {' + '.join(map(str, kinds))} ({_short(pre, 160)}): not "
                       "one of ByteLevel(use_regex=true), Split(Regex)+ByteLevel(use_regex=false), "
                       f"Digits(individual_digits=true)+ByteLevel; {SUPPORTED}")


def _check_hf_model(model: dict, source: str) -> None:
    """Refuse what is not plain byte-level BPE in tokenizer.json's `model`."""
    kind = model.get("type", "BPE" if "merges" in model else None)  # older files may leave out "type"
    if kind != "BPE":
        raise ScratchError(f"{source}: field 'model.type' is {kind!r}, not 'BPE': Unigram (SentencePiece), WordPiece "
                           f"and WordLevel models are not supported; {SUPPORTED}")
    if model.get("byte_fallback"):
        raise ScratchError(f"{source}: field 'model.byte_fallback' is true: a SentencePiece-style BPE (unknown "
                           f"characters fall back to <0x..> byte tokens), not byte-level BPE; {SUPPORTED}")
    for field in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(field):
            raise ScratchError(f"{source}: field 'model.{field}' is {model[field]!r}: subword markers are not "
                               f"supported; {SUPPORTED}")
    if model.get("dropout"):
        raise ScratchError(f"{source}: field 'model.dropout' is {model['dropout']!r}: BPE dropout (random "
                           "tokenization) is not supported; set it to null")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
        raise ScratchError(f"{source}: fields 'model.vocab' (an object) and 'model.merges' (a list) are required")


def _hf_merges(merges: list, source: str) -> list[tuple[str, str]]:
    """tokenizer.json merges: "a b" strings (older files) or [a, b] pairs (tokenizers >= 0.20)."""
    out = []
    for i, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list | tuple) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise ScratchError(f"{source}: merge {i} is {_short(m)}, not two tokens")
        out.append((parts[0], parts[1]))
    return out


def _hf_specials(added: list, source: str) -> dict[str, int]:
    """tokenizer.json `added_tokens` -> {content: id}, special or not (HF matches both in raw text)."""
    specials = {}
    for t in added or []:
        if not isinstance(t, dict) or not isinstance(t.get("content"), str) or not isinstance(t.get("id"), int):
            raise ScratchError(f"{source}: field 'added_tokens' holds {_short(t)}, not {{'id': int, 'content': str}}")
        for flag in ("lstrip", "rstrip", "single_word"):
            if t.get(flag):
                raise ScratchError(f"{source}: added token {t['content']!r} (id {t['id']}) sets {flag}=true; scratchllm's "
                                   "special tokens match their exact text only")
        if t["content"] in specials:
            raise ScratchError(f"{source}: added token {t['content']!r} appears twice (ids {specials[t['content']]} "
                               f"and {t['id']})")
        specials[t["content"]] = t["id"]
    return specials


def tokenizer_from_hf_json(path: str | Path) -> Tokenizer:
    """Our Tokenizer from a HF `tokenizer.json` (or a folder holding one), named after its folder.

    Checks every field it relies on and refuses the rest (see the module docstring), then checks that
    the vocabulary's ids are tiktoken ranks for its merges (`check_merges`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    source = str(path)
    if not path.is_file():
        raise ScratchError(f"{source} not found (a Hugging Face tokenizer.json)")
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise ScratchError(f"{source}: field 'model' is missing: not a Hugging Face tokenizer.json")
    _check_hf_model(d["model"], source)
    norm = d.get("normalizer")
    steps = (norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]) if isinstance(norm, dict) else [norm]
    kinds = [n.get("type") if isinstance(n, dict) else n for n in steps or []]
    if norm is not None and kinds not in ([], ["NFC"]):
        raise ScratchError(f"{source}: field 'normalizer' is {_short(norm, 160)}: normalizers that change the text are "
                           f"not supported (only none, or NFC); {SUPPORTED}")
    pattern = pattern_from_pre_tokenizer(d.get("pre_tokenizer"), source)
    specials = _hf_specials(d.get("added_tokens"), source)
    name = path.parent.name or "hf"
    return build_tokenizer(d["model"]["vocab"], _hf_merges(d["model"]["merges"], source), specials, pattern,
                           bool(d["model"].get("ignore_merges")), name, source)


# --------------------------------------------------------------------------------------------- GGUF
def _as_list(value, key: str, source: str) -> list:
    if value is None:
        raise ScratchError(f"{source}: metadata key {key!r} is missing (needed for the tokenizer)")
    try:
        return value.tolist() if hasattr(value, "tolist") else list(value)
    except TypeError:
        raise ScratchError(f"{source}: metadata key {key!r} is {_short(value)}, not an array") from None


def gguf_pattern(pre, source: str) -> tuple[str, bool]:
    """`tokenizer.ggml.pre` -> (PATTERNS name, ignore_merges), as llama.cpp reads it.

    >>> gguf_pattern("smollm", "m.gguf")
    ('smollm', False)
    """
    if pre in GGUF_PRE:
        return GGUF_PRE[pre]
    why = {None: "is missing (llama.cpp then falls back to its 'default' split and warns that generation "
                 "quality will be degraded)",
           "default": "is 'default', llama.cpp's fallback split (punctuation runs, then GPT-2's regex, then "
                      "digit runs), which is not the split the model was trained with"}.get(pre, f"is {pre!r}")
    raise ScratchError(f"{source}: metadata key 'tokenizer.ggml.pre' {why}; known pre-tokenizers: "
                       f"{', '.join(GGUF_PRE)}")


def tokenizer_from_gguf_metadata(meta: dict, source: str) -> Tokenizer:
    """Our Tokenizer from a GGUF file's metadata {key: value} (`tokenizer.ggml.*`; `source` names the file).

    Needs `tokenizer.ggml.model` "gpt2" (byte-level BPE) with tokens, token_type and merges. Control
    (3), user-defined (4), unknown (2) and unused (5) tokens become special tokens keeping their ids;
    byte tokens (6, SentencePiece's <0x0A>) are refused. Named after `general.name` or the file."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        kind = {"llama": "a SentencePiece (llama) tokenizer", "t5": "a SentencePiece unigram (t5) tokenizer",
                "bert": "a WordPiece (bert) tokenizer"}.get(model, "not a byte-level BPE tokenizer")
        raise ScratchError(f"{source}: metadata key 'tokenizer.ggml.model' is {model!r}: {kind}. SentencePiece and "
                           "unigram tokenizers are not supported (byte-level BPE only: 'gpt2')")
    pattern, ignore_merges = gguf_pattern(meta.get("tokenizer.ggml.pre"), source)
    tokens = _as_list(meta.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens", source)
    types = _as_list(meta.get("tokenizer.ggml.token_type"), "tokenizer.ggml.token_type", source)
    merges = _as_list(meta.get("tokenizer.ggml.merges"), "tokenizer.ggml.merges", source)
    if len(types) != len(tokens):
        raise ScratchError(f"{source}: metadata 'tokenizer.ggml.token_type' has {len(types)} entries for "
                           f"{len(tokens)} tokens")
    vocab, specials = {}, {}
    for i, (token, kind) in enumerate(zip(tokens, types)):
        if not isinstance(token, str):
            raise ScratchError(f"{source}: metadata 'tokenizer.ggml.tokens' entry {i} is {_short(token)}, not a string")
        if kind == BYTE:
            raise ScratchError(f"{source}: token {i} ({token!r}) has token_type 6 (a byte token): a SentencePiece-"
                               "style vocabulary; byte-level BPE only")
        if token in vocab or token in specials:
            raise ScratchError(f"{source}: token text {token!r} appears twice, at ids "
                               f"{vocab.get(token, specials.get(token))} and {i}")
        if kind in (CONTROL, USER_DEFINED, UNKNOWN, UNUSED):
            specials[token] = i
        elif kind == NORMAL:
            vocab[token] = i
        else:
            raise ScratchError(f"{source}: token {i} ({token!r}) has token_type {kind!r}, not one of 1..6")
    pairs = []
    for i, m in enumerate(merges):
        parts = m.split(" ") if isinstance(m, str) else None
        if parts is None or len(parts) != 2:
            raise ScratchError(f"{source}: metadata 'tokenizer.ggml.merges' entry {i} is {_short(m)}, not 'left right'")
        pairs.append((parts[0], parts[1]))
    name = meta.get("general.name") if isinstance(meta.get("general.name"), str) else Path(source).stem
    tok = build_tokenizer(vocab, pairs, specials, pattern, ignore_merges, name, source)
    pad = meta.get("tokenizer.ggml.padding_token_id")
    tok.pad_token = next((t for t, i in specials.items() if i == pad), None)  # a regular token id: no pad token
    return tok


__all__ = ["GGUF_PRE", "check_merges", "pattern_from_pre_tokenizer", "tokenizer_from_gguf_metadata",
           "tokenizer_from_hf_json"]
