"""The Tokenizer: fast (tiktoken core) == pure-Python reference, round-trips on arbitrary Unicode,
GPT-2 ids equal tiktoken's on every text file of the shared data, special-token rules, save/load."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm import Tokenizer, train_bpe
from scratchllm.common import ScratchError
from scratchllm.tokenizer import from_gpt2_files, from_tiktoken_file, load_tokenizer

# texts full of the hard cases: emoji (incl. ZWJ sequences), combining marks, CJK, controls, runs
HARD = ["👩‍👩‍👧‍👦 family", "e\u0301 cafe\u0301 n\u0303", "日本語のテキスト、中文。한국어", "\x00\x01\x1b[31m\x7f",
        "a" * 5000, " " * 300 + "x", "\n\n\n\r\n\t\t", "don't I'll we've THEY'RE", "12345678901 3.14", "🙂" * 100]
UNICODE = st.text(st.characters(codec="utf-8"), max_size=200)


@pytest.fixture(scope="module")
def trained(shared_data):
    texts = [(shared_data / "the-verdict.txt").read_text(), *HARD]
    return train_bpe(texts, vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"])


@pytest.fixture(scope="module")
def trained_gpt4(shared_data):
    return train_bpe([(shared_data / "the-verdict.txt").read_text(), *HARD], vocab_size=500, pattern="gpt4")


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return Tokenizer.from_gpt2_files(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")


@settings(max_examples=150, deadline=None)
@given(UNICODE)
def test_roundtrip_and_fast_equals_reference(trained, gpt2, trained_gpt4, text):
    for tok in (trained, gpt2, trained_gpt4):
        ids = tok.encode(text, disallowed_special=())
        assert tok.decode(ids, errors="strict") == text
        assert tok.encode_reference(text, disallowed_special=()) == ids


@pytest.mark.parametrize("text", HARD)
def test_hard_cases(trained, gpt2, gpt2_tiktoken, text):
    for tok in (trained, gpt2):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_reference(text) == ids
    assert gpt2.encode(text) == gpt2_tiktoken.encode(text)


def shared_text_files(root):
    """Every file of the shared data that is text (decodes as UTF-8), whatever its name."""
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            try:
                p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            files.append(p)
    return files


def test_gpt2_ids_equal_tiktoken_on_all_shared_data(shared_data, gpt2, gpt2_tiktoken):
    files = shared_text_files(shared_data)
    names = {p.name for p in files}
    assert len(files) >= 20 and {"r50k_base.tiktoken", "SHA256SUMS", "vocab.bpe", "the-verdict.txt"} <= names
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        assert gpt2.encode(text, disallowed_special=()) == gpt2_tiktoken.encode(text, disallowed_special=()), path
    # the same tokenizer three ways: original files, the .tiktoken ranks file, tiktoken's cache
    assert from_tiktoken_file(shared_data / "gpt2" / "r50k_base.tiktoken") == gpt2
    assert load_tokenizer("gpt2") == gpt2
    assert gpt2.vocab_size == 50257 and gpt2.eot_token == 50256
    assert gpt2.encode("Hello, world! <|endoftext|> Some text", allowed_special="all") == \
        [15496, 11, 995, 0, 220, 50256, 2773, 2420]


def test_reference_equals_fast_on_a_book_slice(shared_data, gpt2):
    text = (shared_data / "gutenberg" / "pg11.txt").read_text()[:20000]
    assert gpt2.encode_reference(text) == gpt2.encode(text)


def test_special_token_rules(trained):
    text = "a<|endoftext|>b"
    with pytest.raises(ValueError, match="disallowed special token"):
        trained.encode(text)
    with pytest.raises(ValueError, match="disallowed special token"):
        trained.encode_reference(text)
    eot = trained.eot_token
    for enc in (trained.encode, trained.encode_reference):
        assert eot in enc(text, allowed_special={"<|endoftext|>"})
        assert eot in enc(text, allowed_special="all")
        plain = enc(text, disallowed_special=())
        assert eot not in plain and trained.decode(plain) == text
        with pytest.raises(ValueError):  # allowing one special does not allow the other
            enc("<|pad|>", allowed_special={"<|endoftext|>"})
    assert trained.encode_ordinary(text) == trained.encode(text, disallowed_special=())


def test_add_special_tokens_keeps_ids(trained):
    tok = Tokenizer(trained.mergeable_ranks, trained.pattern, trained.special_tokens)
    before = dict(tok.special_tokens)
    ids = tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|pad|>"])
    assert ids == [600, 601, before["<|pad|>"]]
    assert {k: tok.special_tokens[k] for k in before} == before and tok.vocab_size == 602
    assert tok.encode("<|im_start|>hi", allowed_special="all")[0] == 600
    with pytest.raises(ScratchError, match="overlaps"):
        tok.add_special_tokens(["<|im_start|>x"])


def test_decode_modes(gpt2):
    ids = gpt2.encode("🙂")
    assert len(ids) > 1
    assert gpt2.decode(ids[:1]) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        gpt2.decode(ids[:1], errors="strict")
    assert gpt2.decode_bytes(ids) == "🙂".encode()
    with pytest.raises(ScratchError, match="cannot decode ids \\[99999\\]"):
        gpt2.decode([1, 99999])


def test_encode_batch(gpt2):
    texts = [f"document {i} " * (i + 1) for i in range(50)]
    assert gpt2.encode_batch(texts, num_threads=2) == [gpt2.encode(t) for t in texts]


def test_save_load_identity(trained, tmp_path):
    trained.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded == trained and loaded.fingerprint() == trained.fingerprint()
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["ranks.tiktoken", "tokenizer.json", "vocab.txt"]
    vocab = (tmp_path / "tok" / "vocab.txt").read_text()
    assert "(special)" in vocab and " + " in vocab
    with pytest.raises(ScratchError, match="already exists"):
        trained.save(tmp_path / "tok")
    trained.save(tmp_path / "tok", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_gpt2_save_load(gpt2, tmp_path):
    gpt2.save(tmp_path / "g")
    assert Tokenizer.load(tmp_path / "g") == gpt2


def test_load_errors(trained, tmp_path):
    d = tmp_path / "tok"
    trained.save(d)
    ranks = (d / "ranks.tiktoken").read_bytes()
    (d / "ranks.tiktoken").write_bytes(ranks[: len(ranks) // 2])  # truncated
    with pytest.raises(ScratchError, match="corrupted or truncated"):
        Tokenizer.load(d)
    (d / "ranks.tiktoken").write_bytes(ranks.replace(b" 300\n", b" 3x0\n"))
    with pytest.raises(ScratchError, match="corrupted"):
        Tokenizer.load(d)
    (d / "ranks.tiktoken").write_bytes(ranks)
    meta = json.loads((d / "tokenizer.json").read_text())
    (d / "tokenizer.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ScratchError, match="newer scratchllm"):
        Tokenizer.load(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ScratchError, match="not valid JSON"):
        Tokenizer.load(d)
    (d / "tokenizer.json").write_text("[1]")
    with pytest.raises(ScratchError, match="tokenizer.json: expected a JSON object"):
        Tokenizer.load(d)
    with pytest.raises(ScratchError, match="not a tokenizer folder"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("YQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ScratchError, match="bad.tiktoken:2"):
        from_tiktoken_file(bad)
    with pytest.raises(ScratchError, match="not found"):
        load_tokenizer(tmp_path / "nope")


def test_gpt2_files_mismatch(shared_data, tmp_path):
    merges = (shared_data / "gpt2" / "vocab.bpe").read_text().splitlines()
    merges[1], merges[2] = merges[2], merges[1]
    (tmp_path / "vocab.bpe").write_text("\n".join(merges))
    with pytest.raises(ScratchError, match="do not belong together"):
        from_gpt2_files(shared_data / "gpt2" / "encoder.json", tmp_path / "vocab.bpe")


def test_failed_save_leaves_nothing(trained, tmp_path, monkeypatch):
    def broken(self):
        raise OSError("disk full")

    monkeypatch.setattr(Tokenizer, "_vocab_text", broken)
    with pytest.raises(OSError, match="disk full"):
        trained.save(tmp_path / "tok")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temp folder


def test_edited_ranks_with_a_matching_checksum_name_the_line(trained, tmp_path):
    import hashlib

    d = trained.save(tmp_path / "tok")
    ranks = (d / "ranks.tiktoken").read_bytes().replace(b" 300\n", b" 3x0\n")
    (d / "ranks.tiktoken").write_bytes(ranks)
    meta = json.loads((d / "tokenizer.json").read_text())
    meta["ranks_sha256"] = hashlib.sha256(ranks).hexdigest()
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ScratchError, match="ranks.tiktoken:301: not a `base64 rank` line"):
        Tokenizer.load(d)


def test_truncated_or_gapped_tiktoken_files(shared_data, tmp_path):
    lines = (shared_data / "gpt2" / "r50k_base.tiktoken").read_bytes().splitlines(keepends=True)
    cut = tmp_path / "r50k_base.tiktoken"
    cut.write_bytes(b"".join(lines[:1000]))  # a valid prefix: only the known checksum can tell
    with pytest.raises(ScratchError, match="sha256 differs"):
        from_tiktoken_file(cut)
    gapped = tmp_path / "mine.tiktoken"
    gapped.write_bytes(b"".join(lines[:256] + lines[300:301]))  # ranks 0..255, then 299
    with pytest.raises(ScratchError, match="rank 256 is missing"):
        from_tiktoken_file(gapped)
    # a hole that a special token fills is fine: p50k_base keeps id 50256 for <|endoftext|>
    holed = tmp_path / "holed.tiktoken"
    holed.write_bytes(b"".join(lines[:256] + [lines[256].replace(b" 256", b" 257")]))
    tok = from_tiktoken_file(holed, special_tokens={"<|endoftext|>": 256})
    assert tok.vocab_size == 258 and tok.encode("<|endoftext|>", allowed_special="all") == [256]


def test_bad_constructor_inputs(trained):
    ranks = trained.mergeable_ranks
    for name in ("gpt5", "[a-z]+"):  # an unknown name would be taken as a regex that drops text
        with pytest.raises(ScratchError, match="does not cover every character"):
            Tokenizer(ranks, name)
    with pytest.raises(ScratchError, match="unknown pattern 'gpt5'"):
        train_bpe(["some text"], vocab_size=300, pattern="gpt5")
    with pytest.raises(ScratchError, match="must be integers"):
        Tokenizer(ranks, "gpt2", {"<|endoftext|>": "600"})
    with pytest.raises(ScratchError, match="a list of texts, not one string"):
        train_bpe("some text", vocab_size=300)


def test_vocab_bpe_outside_the_byte_alphabet(shared_data, tmp_path):
    merges = (shared_data / "gpt2" / "vocab.bpe").read_text().splitlines()
    merges[1] = "\u4e00 x"
    (tmp_path / "vocab.bpe").write_text("\n".join(merges))
    with pytest.raises(ScratchError, match="merge 1 .* outside GPT-2's byte alphabet"):
        from_gpt2_files(shared_data / "gpt2" / "encoder.json", tmp_path / "vocab.bpe")


# --------------------------------------------------------------------------------------------- hardening
def _edit_meta(d, **fields):
    meta = json.loads((d / "tokenizer.json").read_text())
    meta.update(fields)
    (d / "tokenizer.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fields, match", [
    ({"special_tokens": ["<|endoftext|>"]}, r"field 'special_tokens' must be a table"),  # was a ValueError
    ({"vocab_size": "three hundred"}, r"field 'vocab_size' must be an integer, got 'three hundred'"),
    ({"vocab_size": 5}, r"'vocab_size' is 5 but the ranks and special tokens give 600 ids"),
    ({"vocab_size": 601}, r"'vocab_size' is 601 but the ranks and special tokens give 600 ids"),
    ({"num_ranks": 12}, r"'num_ranks' is 12 but ranks.tiktoken holds 598 ranks"),
    ({"pattern": 7}, r"field 'pattern' must be a string"),
    ({"pattern": "[a-z]+"}, r" \+ ranks.tiktoken: split pattern .* does not cover"),
    ({"special_tokens": {"<|endoftext|>": "598"}}, r" \+ ranks.tiktoken: special token ids must be"),
    ({"special_tokens": {"<|endoftext|>": 5}}, r" \+ ranks.tiktoken: special token ids \[5\] collide"),
    ({"ranks_sha256": None}, r"field 'ranks_sha256' must be a string"),
    ({"format_version": True}, r"field 'format_version' is missing or not an integer"),
])
def test_every_field_of_tokenizer_json_is_checked_and_named(trained, tmp_path, fields, match):
    d = trained.save(tmp_path / "tok")
    _edit_meta(d, **fields)
    with pytest.raises(ScratchError, match=r"tok/tokenizer.json.*" + match):
        Tokenizer.load(d)


def test_a_missing_vocab_size_and_an_unreadable_ranks_file(trained, tmp_path, monkeypatch):
    d = trained.save(tmp_path / "tok")
    meta = json.loads((d / "tokenizer.json").read_text())
    del meta["vocab_size"]
    (d / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(ScratchError, match="tokenizer.json: required field 'vocab_size' is missing"):
        Tokenizer.load(d)
    d = trained.save(tmp_path / "tok2")
    real = type(d).read_bytes

    def denied(self):
        if self.name == "ranks.tiktoken":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(type(d), "read_bytes", denied)  # chmod 000 does not stop root
    with pytest.raises(ScratchError, match=r"cannot read .*tok2/ranks.tiktoken: Permission denied"):
        Tokenizer.load(d)


def test_a_huge_rank_fails_at_once(shared_data, tmp_path):
    """The hole check built range(largest rank): an edited rank of 4e9 tried to fill memory."""
    import time

    lines = (shared_data / "gpt2" / "r50k_base.tiktoken").read_bytes().splitlines(keepends=True)
    f = tmp_path / "mine.tiktoken"
    f.write_bytes(b"".join(lines[:256] + [lines[256].replace(b" 256", b" 4000000000")]))
    start = time.perf_counter()
    with pytest.raises(ScratchError, match=r"mine.tiktoken: rank 256 is missing \(3999999744 id\(s\)"):
        from_tiktoken_file(f, special_tokens={})
    assert time.perf_counter() - start < 5
    f.write_bytes(b"".join(lines[:256] + [lines[256].replace(b" 256", b" 9999999999")]))
    with pytest.raises(ScratchError, match=r"mine.tiktoken:257: rank 9999999999 is not in \[0, 4294967295\]"):
        from_tiktoken_file(f)
    f.write_bytes(b"".join(lines[:256] + [lines[256].replace(b" 256", b" -1")]))
    with pytest.raises(ScratchError, match=r"mine.tiktoken:257: rank -1 is not in"):
        from_tiktoken_file(f)


def test_constructor_type_errors_are_messages(trained):
    ranks = trained.mergeable_ranks
    with pytest.raises(ScratchError, match=r"special tokens must be a \{token: id\} mapping .* got a list"):
        Tokenizer(ranks, "gpt2", ["<|endoftext|>"])  # was: ValueError from dict()
    with pytest.raises(ScratchError, match="the split pattern must be a string"):
        Tokenizer(ranks, ["gpt2"])
    with pytest.raises(ScratchError, match="ranks must map token bytes to ids"):
        Tokenizer({**ranks, b"xy": "9"}, "gpt2")
    with pytest.raises(ScratchError, match=r"special token ids must be in \[0, 4294967295\]"):
        Tokenizer(ranks, "gpt2", {"<|endoftext|>": 2**40})


def test_gpt2_files_with_bad_values_name_the_file(shared_data, tmp_path):
    enc = json.loads((shared_data / "gpt2" / "encoder.json").read_text())
    enc["!"] = "zero"
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    with pytest.raises(ScratchError, match=r"encoder.json: token '!' has id 'zero', not an integer"):
        from_gpt2_files(tmp_path / "encoder.json", shared_data / "gpt2" / "vocab.bpe")
    (tmp_path / "vocab.bpe").write_bytes(b"#version: 0.2\n\xff\xfe\n")
    with pytest.raises(ScratchError, match=r"vocab.bpe: not UTF-8 text"):
        from_gpt2_files(shared_data / "gpt2" / "encoder.json", tmp_path / "vocab.bpe")


def test_load_tokenizer_says_what_was_given(trained, tmp_path):
    d = trained.save(tmp_path / "tok")
    with pytest.raises(ScratchError, match=r"is the file inside a tokenizer folder: give the folder '.*tok'"):
        load_tokenizer(d / "tokenizer.json")
    with pytest.raises(ScratchError, match=r"vocab.txt' is not a folder or a .tiktoken file"):
        load_tokenizer(d / "vocab.txt")


def test_save_overwrite_replaces_only_a_tokenizer_folder(trained, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.doc").write_text("x")
    with pytest.raises(ScratchError, match=r"mine is not a tokenizer folder of ours \(it holds precious.doc\)"):
        trained.save(mine, overwrite=True)
    assert (mine / "precious.doc").read_text() == "x"
    (tmp_path / "empty").mkdir()
    trained.save(tmp_path / "empty", overwrite=True)
    trained.save(tmp_path / "empty", overwrite=True)  # and again: now it is one of ours
    assert Tokenizer.load(tmp_path / "empty") == trained


def test_tokenizer_cli_checks_before_training(tmp_path, capsys):
    from scratchllm.cli import main

    missing = str(tmp_path / "missing.txt")  # never reached: every check below comes first
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.doc").write_text("x")
    assert main(["tokenizer", "train", "--input", missing, "--vocab-size", "300", "--out", str(mine),
                 "--overwrite"]) == 2
    assert "mine is not a tokenizer folder of ours (it holds precious.doc)" in capsys.readouterr().err
    assert (mine / "precious.doc").read_text() == "x"
    assert main(["tokenizer", "train", "--input", missing, "--vocab-size", "100", "--out", str(tmp_path / "t")]) == 2
    assert "--vocab-size 100 is too small" in capsys.readouterr().err
    assert main(["tokenizer", "train", "--input", missing, "--vocab-size", "300", "--out", str(tmp_path / "t"),
                 "--special", "<|a|>", "<|a|>"]) == 2
    assert "special token '<|a|>' is given twice" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    for cmd in (["encode", "--tokenizer", "gpt2", "--file", "/dev/zero"],
                ["stats", "--tokenizer", "gpt2", "--file", "/dev/zero"],
                ["train", "--input", "/dev/zero", "--vocab-size", "300", "--out", str(tmp_path / "t")]):
        assert main(["tokenizer", *cmd]) == 2
        err = capsys.readouterr().err
        assert "/dev/zero" in err and "is not a regular file (a device, FIFO or socket)" in err


def test_absent_bytes_are_dropped_and_saved(trained, tmp_path):
    """A vocabulary without a token for some bytes (SmolLM2 lacks 21): encoding drops those bytes (as HF
    tokenizers and llama.cpp do), no id reaches vocab_size, and the folder round-trips."""
    ranks = {t: r for t, r in trained.mergeable_ranks.items() if t not in (b"\x04", b"\xff")}
    with pytest.raises(ScratchError, match="lack 2 of the 256 single bytes"):
        Tokenizer(ranks, trained.pattern, {})
    gone = (trained.mergeable_ranks[b"\x04"], trained.mergeable_ranks[b"\xff"])
    ranks = {t: r - sum(g < r for g in gone) for t, r in ranks.items()}  # dense again, same order
    tok = Tokenizer(ranks, trained.pattern, {"<|endoftext|>": len(ranks)}, absent_bytes=[4, 255])
    assert tok.vocab_size == len(ranks) + 1 and not tok.absent_bytes == []
    text = "hello\x04 world<|endoftext|>"
    ids = tok.encode(text, allowed_special="all")
    assert max(ids) < tok.vocab_size and tok.decode(ids) == "hello world<|endoftext|>"
    assert tok.encode_reference(text, allowed_special="all") == ids
    assert tok.encode_batch([text], allowed_special="all") == [ids] and tok.encode_ordinary("\x04") == []
    assert tok.fingerprint() != Tokenizer(ranks | {b"\x04": len(ranks) + 1, b"\xff": len(ranks) + 2}, trained.pattern,
                                          {"<|endoftext|>": len(ranks)}).fingerprint()
    back = Tokenizer.load(tok.save(tmp_path / "tok"))
    assert back == tok and back.absent_bytes == [4, 255] and back.encode(text, allowed_special="all") == ids
    assert "absent bytes" in (tmp_path / "tok" / "vocab.txt").read_text()
    with pytest.raises(ScratchError, match="absent bytes must be"):
        Tokenizer(trained.mergeable_ranks, trained.pattern, {}, absent_bytes=[4])  # 0x04 has a token
