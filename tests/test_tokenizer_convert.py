"""tokenizer/convert.py against references nobody here wrote: transformers' AutoTokenizer built from the
SmolLM2 GGUF, the `tokenizers` library on tokenizer.json files (SmolLM2's, Qwen2- and Llama-3-style ones
trained in-process, GPT-2's), tiktoken's GPT-2; the split patterns against tokenizers' pre-tokenizers;
and every refusal. The SmolLM2 references (metadata, converted tokenizer, AutoTokenizer and its saved
folders) are conftest.py's session fixtures, shared with test_chat.py (built once)."""

import json
import random
import unicodedata
from pathlib import Path

import pytest
import regex
from conftest import need

from scratchllm.common import ScratchError
from scratchllm.tokenizer import Tokenizer, from_gpt2_files
from scratchllm.tokenizer.base import PATTERNS
from scratchllm.tokenizer.convert import check_merges, tokenizer_from_gguf_metadata, tokenizer_from_hf_json
from scratchllm.tokenizer.gpt2 import bytes_to_unicode

# mixed Unicode: CJK, emoji (ZWJ), combining marks, digit runs, whitespace before digits, tabs, CRLF,
# contractions, special-token texts (HF matches added tokens anywhere; ours need allowed_special="all")
TRICKY = ["日本語のテキスト、中文。한국어 Ελληνικά русский", "👩‍👩‍👧‍👦 🙂🙂 ❤️ 🇺🇸", "e\u0301 cafe\u0301 n\u0303 a\u0308\u0308",
          "12345678901 3.14 1,000,000 ١٢٣ ½ Ⅻ", "  1", "x  1", "a\n\n1", "\r\n1\r\n", "\t\t1\t", "  \n  ", "",
          "tabs\tand\nnewlines\r\nmixed  ", "don't I'll we've THEY'RE 'S 's", "   leading and trailing   ",
          "<|endoftext|>x<|im_start|>user\nHi<|im_end|>\n", "a<|im_end|>  2", "def f(x):\n    return x ** 2  # 42\n",
          "https://example.com/a?b=1&c=2", "ﬁ ﬀ ｆｕｌｌｗｉｄｔｈ １２３", "\u00a0\u2003\u3000 x \u200b y"]
# characters for random strings (no byte SmolLM2 lacks: it drops those, see test_missing_bytes)
ALPHABET = list(" \t\n\r\u00a0\u3000") + list("0123456789") + list("abcXYZ'.,!-_") + \
    ["٣", "½", "東", "🙂", "e\u0301", "'s", "'ll", "\r\n", "'S", "<|im_end|>", "é", "ß"]


def _hf():
    try:
        import tokenizers
    except ImportError:
        need("the tokenizers package", "pip install tokenizers (the dev extra)")
    return tokenizers


def random_texts(n: int, seed: int = 0, alphabet=ALPHABET) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16))) for _ in range(n)]


def shared_texts(root: Path, chunk: int = 50_000, first_only: bool = True) -> list[str]:
    """Every text file (UTF-8) of the shared data, in chunks of `chunk` characters (only the first one
    of each file when `first_only`)."""
    out = []
    for p in sorted(root.rglob("*")):
        try:
            text = p.read_bytes().decode("utf-8") if p.is_file() else None
        except UnicodeDecodeError:
            continue
        if text:
            out += [text[i:i + chunk] for i in range(0, len(text), chunk)][:1 if first_only else None]
    return out


@pytest.fixture(scope="session")
def smol_meta(smollm2_metadata):
    return smollm2_metadata


@pytest.fixture(scope="session")
def smol(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="session")
def smol_ref(smollm2_auto_tokenizer, smollm2_tokenizer_folders):
    """(AutoTokenizer from the GGUF, its saved folder, the folder with SmolLM2's own pre-tokenizer,
    a tokenizers.Tokenizer of that last one)."""
    saved, real = smollm2_tokenizer_folders
    return smollm2_auto_tokenizer, saved, real, _hf().Tokenizer.from_file(str(real / "tokenizer.json"))


@pytest.fixture(scope="session")
def samples(shared_data):
    return shared_texts(shared_data) + TRICKY + random_texts(1500)


def hf_ids(hf_tok, texts):
    return [e.ids for e in hf_tok.encode_batch(texts, add_special_tokens=False)]


# --------------------------------------------------------------------------------------------- SmolLM2
def test_gguf_smollm2_tokenizer(smol, smol_meta):
    assert smol.pattern == PATTERNS["smollm"]
    assert smol.special_tokens == {t: i for i, t in enumerate(smol_meta["tokenizer.ggml.tokens"][:17])}
    assert smol.special_tokens["<|im_end|>"] == smol_meta["tokenizer.ggml.eos_token_id"] == 2
    assert len(smol_meta["tokenizer.ggml.tokens"]) == 49152 and smol.vocab_size == 49152  # 21 bytes absent
    assert smol.encode("Hello world! 123", allowed_special="all") == [19556, 905, 17, 216, 33, 34, 35]


def test_gguf_smollm2_equals_transformers(smol, smol_ref, samples):
    """Ours == SmolLM2's own split (Digits + ByteLevel) on every shared text file's first 50 KB, mixed
    Unicode and random strings; with GPT-2's split (what transformers' GGUF loader uses for 'smollm'), the
    same ranks and specials give exactly transformers' AutoTokenizer ids."""
    auto, _, _, real = smol_ref
    assert smol.encode_batch(samples, allowed_special="all") == hf_ids(real, samples)
    gpt2_split = Tokenizer(smol.mergeable_ranks, "gpt2", smol.special_tokens, absent_bytes=smol.absent_bytes)
    assert gpt2_split.encode_batch(samples, allowed_special="all") == auto(samples, add_special_tokens=False)["input_ids"]


def test_transformers_gguf_split_differs_from_llama_cpp(smol, smol_ref):
    """transformers reads pre 'smollm' as GPT-2's split; llama.cpp and SmolLM2's tokenizer.json cut at
    digits first, so whitespace before a digit is one piece. We follow llama.cpp (and SmolLM2)."""
    auto, _, _, real = smol_ref
    [two_spaces] = smol.encode("  ")  # 'ĠĠ'
    assert smol.encode("  1") == hf_ids(real, ["  1"])[0] == [two_spaces, 33]
    assert auto("  1", add_special_tokens=False)["input_ids"] == [216, 216, 33]


@pytest.mark.slow
def test_gguf_smollm2_all_shared_data(smol, smol_ref, shared_data):
    auto, _, _, real = smol_ref
    chunks = shared_texts(shared_data, first_only=False)
    assert smol.encode_batch(chunks, allowed_special="all") == hf_ids(real, chunks)
    gpt2_split = Tokenizer(smol.mergeable_ranks, "gpt2", smol.special_tokens, absent_bytes=smol.absent_bytes)
    assert gpt2_split.encode_batch(chunks, allowed_special="all") == auto(chunks, add_special_tokens=False)["input_ids"]


def test_smollm2_tokenizer_json_routes(smol, smol_ref):
    """transformers' saved tokenizer.json (ByteLevel) and SmolLM2's (Digits + ByteLevel) give our GGUF
    tokenizer's ranks and specials, with GPT-2's and SmolLM2's split respectively."""
    _, saved, real, real_hf = smol_ref
    from_saved, from_real = tokenizer_from_hf_json(saved / "tokenizer.json"), tokenizer_from_hf_json(real)
    assert from_real == smol and from_real.name == "SmolLM2-135M-Instruct"
    assert from_saved.pattern == PATTERNS["gpt2"] and from_saved.mergeable_ranks == smol.mergeable_ranks
    texts = TRICKY + random_texts(300, seed=1)
    assert from_real.encode_batch(texts, allowed_special="all") == hf_ids(real_hf, texts)


def test_missing_bytes(smol, smol_ref):
    """SmolLM2 lacks 21 byte tokens (e.g. 0x04, 0xF5..0xFF): encoding drops them, as HF does, and every
    id stays inside the model's 49152."""
    *_, real = smol_ref
    assert len(smol.absent_bytes) == 21 and 0x04 in smol.absent_bytes and smol.vocab_size == 49152
    ids = smol.encode("a\x04b")
    assert ids == hf_ids(real, ["a\x04b"])[0] and len(ids) == 2 and smol.decode(ids) == "ab"
    assert smol.encode_reference("a\x04b") == ids and smol.encode_batch(["a\x04b"]) == [ids]


# --------------------------------------------------------------------------------------------- splits
def test_patterns_equal_tokenizers_pre_tokenizers():
    """Each named pattern splits like the tokenizers pre-tokenizer it stands for (random tricky text)."""
    tk = _hf()
    P, b2u = tk.pre_tokenizers, bytes_to_unicode()
    byte_of = {c: b for b, c in b2u.items()}
    refs = {"gpt2": P.ByteLevel(add_prefix_space=False, use_regex=True),
            "smollm": P.Sequence([P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False)])}
    for name in ("llama3", "qwen2", "qwen35", "tekken", "gpt4o"):
        refs[name] = P.Sequence([P.Split(tk.Regex(PATTERNS[name]), behavior="isolated"),
                                 P.ByteLevel(add_prefix_space=False, use_regex=False)])
    texts = TRICKY + random_texts(1500, seed=2, alphabet=ALPHABET + ["A", "Ab", "aB", "/", "\u0301"])
    for name, pre in refs.items():
        for t in texts:
            want = [bytes(byte_of[c] for c in p).decode("utf-8") for p, _ in pre.pre_tokenize_str(t)]
            assert regex.findall(PATTERNS[name], t) == want, (name, t)


def _trained_json(tmp_path, shared_data, pattern: str, closure: bool) -> Path:
    """A Qwen2-style (closure=False: one merge per token, NFC) or Llama-3-style (closure=True: every split
    of a token is a merge, as transformers' TikTokenConverter writes them, ignore_merges) tokenizer.json:
    a BPE trained in-process by the tokenizers library, with added tokens after the vocabulary."""
    tk = _hf()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(PATTERNS[pattern]), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = tk.trainers.BpeTrainer(vocab_size=1500, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    corpus = [(shared_data / "the-verdict.txt").read_text(), (shared_data / "tinyshakespeare.txt").read_text()[:300_000],
              *TRICKY * 20]
    tok.train_from_iterator(corpus, trainer)
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    if closure:
        merges = sorted(((vocab[t], vocab[t[:k]], vocab[t[k:]]), [t[:k], t[k:]]) for t in vocab for k in range(1, len(t))
                        if t[:k] in vocab and t[k:] in vocab)
        d["model"]["merges"], d["model"]["ignore_merges"] = [m for _, m in merges], True
    else:
        d["normalizer"] = {"type": "NFC"}
    names = ["<|begin_of_text|>", "<|eot_id|>"] if closure else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    d["added_tokens"] = [{"id": len(vocab) + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(names)]
    d["added_tokens"].append({**d["added_tokens"][-1], "id": len(vocab) + len(names), "content": "<tool_call>",
                              "special": False})
    path = tmp_path / f"{pattern}-style" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


@pytest.mark.parametrize("pattern,closure", [("qwen2", False), ("llama3", True)])
def test_trained_tokenizer_json_equals_tokenizers(tmp_path, shared_data, pattern, closure):
    path = _trained_json(tmp_path, shared_data, pattern, closure)
    ref, ours = _hf().Tokenizer.from_file(str(path)), tokenizer_from_hf_json(path)
    assert ours.pattern == PATTERNS[pattern] and ours.name == f"{pattern}-style"
    assert ours.special_tokens["<tool_call>"] == ours.vocab_size - 1 == ref.token_to_id("<tool_call>")
    texts = [unicodedata.normalize("NFC", t) for t in shared_texts(shared_data, chunk=10_000) + TRICKY + random_texts(1500)]
    # (NFC: Qwen2-style files normalize, ours does not; see convert.py)
    assert ours.encode_batch(texts, allowed_special="all") == hf_ids(ref, texts)


@pytest.fixture(scope="module")
def gpt2_json(tmp_path_factory, shared_data):
    """GPT-2's tokenizer.json, built by the tokenizers library from encoder.json + vocab.bpe."""
    tk = _hf()
    hf = tk.Tokenizer(tk.models.BPE.from_file(str(shared_data / "gpt2" / "encoder.json"),
                                              str(shared_data / "gpt2" / "vocab.bpe")))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens([tk.AddedToken("<|endoftext|>", special=True, normalized=False)])
    path = tmp_path_factory.mktemp("gpt2") / "tokenizer.json"
    hf.save(str(path))
    return path


def test_gpt2_tokenizer_json(gpt2_json, shared_data, gpt2_tiktoken):
    ours = tokenizer_from_hf_json(gpt2_json)
    assert ours == from_gpt2_files(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")
    texts = shared_texts(shared_data, chunk=10_000) + TRICKY
    assert ours.encode_batch(texts, allowed_special="all") == gpt2_tiktoken.encode_batch(texts, allowed_special="all")


@pytest.mark.slow
def test_gpt2_export_reads_back(gpt2_json, tmp_path):
    """Our HF export (weights/hf.py: Split(our regex) + ByteLevel, ignore_merges) reads back unchanged."""
    from scratchllm.weights.hf import _fast_tokenizer_json, hf_vocab_and_merges

    ours = tokenizer_from_hf_json(gpt2_json)
    (tmp_path / "tokenizer.json").write_text(_fast_tokenizer_json(ours, *hf_vocab_and_merges(ours)), encoding="utf-8")
    assert tokenizer_from_hf_json(tmp_path) == ours


# --------------------------------------------------------------------------------------------- the rank check
def _byte_vocab() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def test_merge_rules_that_tiktoken_cannot_follow_are_refused(tmp_path):
    """HF applies merges in list order; tiktoken merges the lowest id. Where they differ we refuse, and
    the tokenizers library shows the difference is real."""
    tk = _hf()
    vocab = {**_byte_vocab(), "bc": 256, "ab": 257, "abc": 258}
    hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[("b", "c"), ("a", "b"), ("ab", "c")]))
    hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert hf.encode("abc").ids == [ord("a"), 256]  # tiktoken's rule would give [258]
    (tmp_path / "a").mkdir()
    hf.save(str(tmp_path / "a" / "tokenizer.json"))
    with pytest.raises(ScratchError, match=r"tokenizer.json: token b'abc' \(id 258\) is built as b'a' \+ b'bc'"):
        tokenizer_from_hf_json(tmp_path / "a")
    # a token no pair of lower ids builds: refused without ignore_merges, equal with it
    vocab = {**_byte_vocab(), "bc": 256, "abcd": 257}
    for ignore in (False, True):
        hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[("b", "c")], ignore_merges=ignore))
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        (tmp_path / str(ignore)).mkdir()
        hf.save(str(tmp_path / str(ignore) / "tokenizer.json"))
        if not ignore:
            assert hf.encode("abcd").ids == [ord("a"), 256, ord("d")]
            with pytest.raises(ScratchError, match="cannot be built from two lower-id tokens .* ignore_merges"):
                tokenizer_from_hf_json(tmp_path / str(ignore))
        else:
            ours = tokenizer_from_hf_json(tmp_path / str(ignore))
            texts = ["abcd", "abcdx", "x abcd abc", "bcd"]
            assert ours.encode_batch(texts) == hf_ids(hf, texts) and ours.encode("abcd") == [257]


def test_check_merges_errors():
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256, b"cd": 257}
    with pytest.raises(ScratchError, match="merge 1 .* builds id 256 after an earlier merge built id 257"):
        check_merges(ranks, [(b"c", b"d"), (b"a", b"b")], False, "x.json")
    with pytest.raises(ScratchError, match="x.json: merge 0 .* not a regular token"):
        check_merges(ranks, [(b"a", b"z")], False, "x.json")


# --------------------------------------------------------------------------------------------- refusals
def _write(tmp_path, d: dict, name="bad") -> Path:
    (tmp_path / name).mkdir(exist_ok=True)
    path = tmp_path / name / "tokenizer.json"
    path.write_text(json.dumps(d), encoding="utf-8")
    return path


def _bpe_json(**changes) -> dict:
    base = {"version": "1.0", "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "byte_fallback": False,
                      "ignore_merges": False, "vocab": _byte_vocab(), "merges": []}}
    for key, value in changes.items():
        if key.startswith("model."):
            base["model"][key[6:]] = value
        else:
            base[key] = value
    return base


def test_hf_json_refusals(tmp_path):
    tk = _hf()
    bad = {"Unigram": tk.models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0, False),
           "WordPiece": tk.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"),
           "WordLevel": tk.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")}
    for kind, model in bad.items():
        tk.Tokenizer(model).save(str(_write(tmp_path, {}, kind)))
        with pytest.raises(ScratchError, match=rf"{kind}/tokenizer.json: field 'model.type' is '{kind}'.*byte-level BPE"):
            tokenizer_from_hf_json(tmp_path / kind)
    cases = [(_bpe_json(**{"model.byte_fallback": True}), "field 'model.byte_fallback' is true: a SentencePiece-style"),
             (_bpe_json(normalizer={"type": "Lowercase"}), "field 'normalizer' is .*Lowercase.* not supported \\(only none, or NFC\\)"),
             (_bpe_json(pre_tokenizer={"type": "Metaspace", "replacement": "▁"}), "field 'pre_tokenizer' is Metaspace"),
             (_bpe_json(pre_tokenizer={"type": "ByteLevel", "add_prefix_space": True}), "add_prefix_space=true"),
             (_bpe_json(pre_tokenizer={"type": "Sequence", "pretokenizers": [
                 {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False},
                 {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}), "has Split .* only a"),
             (_bpe_json(**{"model.vocab": {"▁hi": 0}}), "token '▁hi' .* outside GPT-2's printable-byte alphabet"),
             (_bpe_json(added_tokens=[{"id": 256, "content": "<mask>", "lstrip": True}]), "sets lstrip=true"),
             (_bpe_json(**{"model.dropout": 0.1}), "BPE dropout"),
             (_bpe_json(**{"model.vocab": {**_byte_vocab(), "Ġt": 300}, "model.merges": [["Ġ", "t"]]}), "rank 256 is missing")]
    for d, message in cases:
        with pytest.raises(ScratchError, match=message):
            tokenizer_from_hf_json(_write(tmp_path, d))
    with pytest.raises(ScratchError, match="not found"):
        tokenizer_from_hf_json(tmp_path / "nowhere")


def test_gguf_refusals(smol_meta):
    meta = {k: v for k, v in smol_meta.items() if k.startswith("tokenizer.ggml.")}
    cases = [({"tokenizer.ggml.model": "llama"}, "'llama': a SentencePiece .* not supported \\(byte-level BPE only"),
             ({"tokenizer.ggml.model": "bert"}, "WordPiece"),
             ({"tokenizer.ggml.pre": "mystery"}, "'tokenizer.ggml.pre' is 'mystery'; known pre-tokenizers: gpt-2, .*smollm"),
             ({"tokenizer.ggml.pre": "default"}, "llama.cpp's fallback split"),
             ({"tokenizer.ggml.pre": None}, "is missing"),
             ({"tokenizer.ggml.token_type": [6] + list(meta["tokenizer.ggml.token_type"])[1:]}, "token_type 6 \\(a byte"),
             ({"tokenizer.ggml.merges": None}, "'tokenizer.ggml.merges' is missing"),
             ({"tokenizer.ggml.merges": ["Ġ t", "no-space"]}, "entry 1 is 'no-space', not 'left right'"),
             ({"tokenizer.ggml.tokens": ["!"] + list(meta["tokenizer.ggml.tokens"])[1:]}, "token text '!' appears twice, at ids 0 and 17")]
    for change, message in cases:
        with pytest.raises(ScratchError, match="m.gguf: .*" + message):
            tokenizer_from_gguf_metadata({**meta, **change}, "m.gguf")
