"""shards.py: the shard stream equals tiktoken's encoding of the same documents (the reference), decodes
back to the text, is identical with 1 or 2 workers, splits validation by the documented rules, never
truncates ids, refuses a foreign tokenizer, and leaves nothing behind on Ctrl-C."""

import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchllm.data.shards as shards_mod
from scratchllm.cli import main
from scratchllm.common import ScratchError
from scratchllm.data.shards import (
    open_shards,
    prepare,
    report,
    shard_tokenizer,
    split_for_encoding,
    token_dtype,
)
from scratchllm.data.sources import iter_documents
from scratchllm.tokenizer import PATTERNS, Tokenizer, load_tokenizer

EOT = 50256


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture()
def corpus(shared_data):
    return [str(shared_data / "the-verdict.txt"), str(shared_data / "gutenberg" / "pg11.txt"),
            str(shared_data / "tinystories" / "tinystories_sample_cs336.txt")]


def stream(folder, split="train"):
    ds = open_shards(folder)
    arrays = ds.train if split == "train" else ds.val
    return np.concatenate([np.asarray(a) for a in arrays]) if arrays else np.zeros(0, dtype=np.int64)


def reference(docs, enc):
    """tiktoken's own encoding of each document, each followed by <|endoftext|>."""
    out = []
    for d in docs:
        out += enc.encode_ordinary(d) + [EOT]
    return out


def test_stream_equals_tiktoken_on_whole_documents(corpus, gpt2, gpt2_tiktoken, tmp_path):
    docs = [d.text for d in iter_documents(corpus)]
    # tiny tasks: the 147 kB book is cut into ~36 pieces, each encoded alone
    index = prepare(corpus, gpt2, tmp_path / "s", val_fraction=0.0, chunk_chars=4096, progress=False)
    got = stream(tmp_path / "s")
    assert got.tolist() == reference(docs, gpt2_tiktoken)
    assert index["train_tokens"] == len(got) and index["val_tokens"] == 0 and index["val_rule"] == "none"
    assert index["dtype"] == "uint16" and got.dtype == np.uint16
    # decodes back to the source documents
    text = gpt2_tiktoken.decode(got.tolist())
    assert text.split("<|endoftext|>") == docs + [""]


def test_two_workers_write_the_same_bytes(corpus, tmp_path):
    a = prepare(corpus, "gpt2", tmp_path / "a", val_fraction=0.3, chunk_chars=2048, progress=False)
    b = prepare(corpus, "gpt2", tmp_path / "b", val_fraction=0.3, chunk_chars=2048, workers=2, progress=False)
    for split in ("train", "val"):
        assert stream(tmp_path / "a", split).tobytes() == stream(tmp_path / "b", split).tobytes()
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def test_spawned_workers_load_a_trained_tokenizer(shared_data, tmp_path, monkeypatch):
    from scratchllm.tokenizer import train_bpe

    text = (shared_data / "the-verdict.txt").read_text()
    tok = train_bpe([text], vocab_size=300, special_tokens=["<|endoftext|>"])
    monkeypatch.setattr(shards_mod.mp, "get_all_start_methods", lambda: ["spawn"])
    prepare([str(shared_data / "the-verdict.txt")], tok, tmp_path / "s", val_fraction=0.0, workers=2,
            chunk_chars=2000, progress=False)
    assert stream(tmp_path / "s").tolist() == tok.encode_ordinary(text) + [tok.eot_token]


def test_validation_by_documents(shared_data, gpt2_tiktoken, tmp_path):
    src = [str(shared_data / "tinystories" / "tinystories_sample_cs336.txt")]
    docs = [d.text for d in iter_documents(src)]
    index = prepare(src, "gpt2", tmp_path / "s", val_fraction=0.2, progress=False)
    assert index["val_rule"] == "documents" and index["documents"]["val"] == 1  # floor(5 * 0.2)
    assert stream(tmp_path / "s", "val").tolist() == reference(docs[4:], gpt2_tiktoken)  # the 5th document
    assert stream(tmp_path / "s", "train").tolist() == reference(docs[:4], gpt2_tiktoken)


def test_one_book_gets_the_tail_rule_across_shards(shared_data, gpt2_tiktoken, tmp_path, capsys):
    src = str(shared_data / "the-verdict.txt")
    assert main(["prepare", "--input", src, "--tokenizer", "gpt2", "--out", str(tmp_path / "s"),
                 "--val-fraction", "0.1", "--shard-tokens", "100", "--quiet"]) == 0
    assert "the tail of the token stream" in capsys.readouterr().out
    full = reference([open(src).read()], gpt2_tiktoken)
    assert len(full) == 5146  # README: 5145 GPT-2 tokens, + <|endoftext|>
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["val_rule"] == "tail" and index["val_tokens"] == 515  # round(0.1 * 5146)
    assert stream(tmp_path / "s", "train").tolist() + stream(tmp_path / "s", "val").tolist() == full
    assert max(index["train_shard_tokens"]) == 100 and len(index["val_shards"]) == 6
    assert index["train_shards"][:2] == ["train_0000.bin", "train_0001.bin"]
    assert index["sources"] == [{"path": src, "bytes": 20479,
                                 "sha256": "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"}]
    assert index["tokenizer"]["fingerprint"] == load_tokenizer("gpt2").fingerprint()


def test_large_vocabulary_uses_uint32_and_keeps_ids(shared_data, tmp_path):
    gpt2 = load_tokenizer("gpt2")
    big = Tokenizer(gpt2.mergeable_ranks, gpt2.pattern, {"<|endoftext|>": 70_000}, name="big")
    assert big.vocab_size == 70_001 and token_dtype(big.vocab_size) == np.uint32
    index = prepare([str(shared_data / "the-verdict.txt")], big, tmp_path / "s", val_fraction=0, progress=False)
    got = stream(tmp_path / "s")
    assert index["dtype"] == "uint32" and got.dtype == np.uint32
    assert got[-1] == 70_000  # would be 4464 if cut to 16 bits
    assert (tmp_path / "s" / "train_0000.bin").stat().st_size == 4 * index["train_tokens"]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_id_that_does_not_fit_is_refused_not_truncated(shared_data, tmp_path, workers):
    class Liar(Tokenizer):  # claims a small vocabulary, emits ids up to 50256
        vocab_size = 1000

    gpt2 = load_tokenizer("gpt2")
    liar = Liar(gpt2.mergeable_ranks, gpt2.pattern, {"<|endoftext|>": 70_000})
    with pytest.raises(ScratchError, match="token id 70000 does not fit the shard dtype uint16.*refusing"):
        prepare([str(shared_data / "the-verdict.txt")], liar, tmp_path / "s", workers=workers, progress=False)
    assert not (tmp_path / "s").exists()


def test_fingerprint_mismatch_and_damaged_folders(shared_data, tmp_path):
    prepare([str(shared_data / "the-verdict.txt")], "gpt2", tmp_path / "s", progress=False)
    ds = open_shards(tmp_path / "s", tokenizer="gpt2")
    assert ds.vocab_size == 50257 and all(isinstance(a, np.memmap) for a in ds.train + ds.val)
    assert (ds.train_tokens, ds.val_tokens, ds.dtype) == (5120, 26, np.uint16)  # tail: round(0.005 * 5146)
    gpt2 = load_tokenizer("gpt2")
    other = Tokenizer(gpt2.mergeable_ranks, PATTERNS["gpt4"], gpt2.special_tokens, name="other")
    with pytest.raises(ScratchError, match="made with tokenizer 'gpt2'.*not with 'other'.*prepare the data again"):
        open_shards(tmp_path / "s", tokenizer=other)
    with pytest.raises(ScratchError, match="already exists"):
        prepare([str(shared_data / "the-verdict.txt")], "gpt2", tmp_path / "s", progress=False)
    with open(tmp_path / "s" / "train_0000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ScratchError, match="train_0000.bin is missing or truncated"):
        open_shards(tmp_path / "s")
    with pytest.raises(ScratchError, match="has no index.json"):
        open_shards(tmp_path)
    (tmp_path / "s" / "index.json").write_text('{"dtype": "uint16", ')  # cut off mid-write
    with pytest.raises(ScratchError, match=r"s/index.json is damaged \(JSONDecodeError.*prepare. again"):
        open_shards(tmp_path / "s")


def test_the_folder_remembers_its_tokenizer(shared_data, tmp_path):
    """GPT-2 by name, any other tokenizer as a copy in tokenizer/; checked by fingerprint on loading."""
    from scratchllm.tokenizer import train_bpe

    book = [str(shared_data / "the-verdict.txt")]
    prepare(book, "gpt2", tmp_path / "g", progress=False)
    assert not (tmp_path / "g" / "tokenizer").exists()  # the name is enough: index.json spec "gpt2"
    assert shard_tokenizer(tmp_path / "g") == load_tokenizer("gpt2")

    trained = train_bpe([(shared_data / "the-verdict.txt").read_text()], vocab_size=300,
                        special_tokens=["<|endoftext|>"], name="verdict300")
    trained.save(tmp_path / "tok")
    prepare(book, str(tmp_path / "tok"), tmp_path / "s", progress=False)
    prepare(book, trained, tmp_path / "m", progress=False)  # an in-memory Tokenizer is kept the same way
    for sub in ("tok", "s/tokenizer", "m/tokenizer"):
        assert {p.name for p in (tmp_path / sub).iterdir()} == {"ranks.tiktoken", "tokenizer.json", "vocab.txt"}
    assert (tmp_path / "s" / "tokenizer").stat().st_mode & 0o777 == (tmp_path / "s").stat().st_mode & 0o777
    (tmp_path / "tok" / "ranks.tiktoken").unlink()  # the shard folder does not need the original
    for name in ("s", "m"):
        tok = shard_tokenizer(tmp_path / name)
        assert tok == trained and tok.name == "verdict300"
        assert open_shards(tmp_path / name, tokenizer=tok).train_tokens == index_tokens(tmp_path / name)
    with pytest.raises(ScratchError, match="made with tokenizer 'verdict300'.*not with 'gpt2'"):
        open_shards(tmp_path / "s", tokenizer="gpt2")  # a mismatching explicit tokenizer stays refused

    index = json.loads((tmp_path / "m" / "index.json").read_text())
    index["tokenizer"]["fingerprint"] = load_tokenizer("gpt2").fingerprint()
    (tmp_path / "m" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ScratchError, match=r"m/tokenizer \(fingerprint .*\) is not the tokenizer .*damaged"):
        shard_tokenizer(tmp_path / "m")

    # a folder from before: no tokenizer/ (index.json spec: the folder's path then); still opens
    shutil.rmtree(tmp_path / "s" / "tokenizer")
    assert shard_tokenizer(tmp_path / "s") is None
    assert open_shards(tmp_path / "s").train_tokens == index_tokens(tmp_path / "s")


def index_tokens(folder):
    return json.loads((folder / "index.json").read_text())["train_tokens"]


def test_a_tokenizer_without_endoftext_is_refused(shared_data, tmp_path):
    gpt2 = load_tokenizer("gpt2")
    bare = Tokenizer(gpt2.mergeable_ranks, gpt2.pattern, {}, name="bare")
    with pytest.raises(ScratchError, match=r"'bare' has no <\|endoftext\|> token.*--special '<\|endoftext\|>'"):
        prepare([str(shared_data / "the-verdict.txt")], bare, tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_too_few_tokens_for_validation_is_its_own_rule(tmp_path):
    class Mute(Tokenizer):  # every text encodes to nothing: the stream is one <|endoftext|> per document
        def encode_ordinary(self, text):
            return []

    gpt2 = load_tokenizer("gpt2")
    (tmp_path / "one.txt").write_text("one short document")
    index = prepare([str(tmp_path / "one.txt")], Mute(gpt2.mergeable_ranks, gpt2.pattern, gpt2.special_tokens),
                    tmp_path / "s", val_fraction=0.1, progress=False)
    assert (index["train_tokens"], index["val_tokens"], index["val_rule"]) == (1, 0, "too_few_tokens")
    text = report(index, tmp_path / "s")
    assert "validation: none: only 1 token(s) in all, too few" in text and "val_fraction 0.1)" in text
    assert "val_fraction 0)" not in text


def test_data_inputs_are_fetched_once(shared_data, tmp_path, monkeypatch):
    """prepare expands its inputs once: a data:NAME input is fetched and verified once, not twice."""
    import scratchllm.data.registry as registry

    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCRATCHLLM_MIRROR", str(shared_data))
    real, calls = registry.get, []
    monkeypatch.setattr(registry, "get", lambda name: calls.append(name) or real(name, progress=False))
    index = prepare(["data:the-verdict"], "gpt2", tmp_path / "s", val_fraction=0, progress=False)
    assert calls == ["the-verdict"]
    assert index["sources"][0]["path"] == str(tmp_path / "cache" / "datasets" / "the-verdict.txt")
    assert index["train_tokens"] == 5146  # README: 5145 GPT-2 tokens, + <|endoftext|>


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_leaves_nothing_behind(corpus, tmp_path, monkeypatch, workers):
    real = shards_mod.iter_documents

    def interrupted(*args, **kwargs):
        for i, doc in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(shards_mod, "iter_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, "gpt2", tmp_path / "out", workers=workers, chunk_chars=1000, progress=False)
    assert list(tmp_path.iterdir()) == []  # no out/, no temp folder


def _die(task):
    import os

    os._exit(1)  # as if the OOM killer struck


def test_a_dying_worker_is_an_error_not_a_hang(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "_encode_task", _die)
    with pytest.raises(ScratchError, match="a tokenizer worker process died"):
        prepare(corpus, "gpt2", tmp_path / "out", workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["prepare", "--input", str(tmp_path / "missing.txt"), "--tokenizer", "gpt2",
                 "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err


_TEXT = st.lists(st.sampled_from(list("ab Z9\n\t.,'!é\u00b2") + ["\r\n", "  ", "'s", "123", "\n\n"]),
                 max_size=120).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=_TEXT, chunk=st.integers(1, 40))
def test_cut_points_never_change_the_encoding(text, chunk):
    pieces = split_for_encoding(text, chunk)
    assert "".join(pieces) == text
    for name, tok in _toks().items():
        assert sum((tok.encode_ordinary(p) for p in pieces), []) == tok.encode_ordinary(text), name


_CACHE = {}


def _toks():
    """GPT-2, plus tokenizers trained here on text full of the alphabet's pieces with each pattern, so
    that cross-boundary merges such as ".\n" (GPT-4 pattern) exist and a bad cut would change ids."""
    if not _CACHE:
        from scratchllm.tokenizer import train_bpe

        _CACHE["gpt2"] = load_tokenizer("gpt2")
        sample = ["ab Z9.\n\n\t'sé 123,!\r\n  ab.\nZ9!\n\u00b2 \n\nab's 9\n" * 20]
        for name in ("gpt2", "gpt4"):
            _CACHE[f"{name}-trained"] = train_bpe(sample, vocab_size=270, pattern=name)
    return _CACHE


def test_cli_cleaning_options_reach_the_index(shared_data, tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text('{"body": "a dup"}\n{"body": "a dup"}\n{"body": "x"}\n{"body": "caf\\u00e9 fine"}\n')
    book = str(shared_data / "gutenberg" / "pg1342.txt")
    assert main(["prepare", "--input", str(src), book, "--tokenizer", "gpt2", "--out", str(tmp_path / "s"),
                 "--text-field", "body", "--dedup", "--min-chars", "2", "--strip-gutenberg", "--quiet",
                 "--val-fraction", "0"]) == 0
    assert "skipped 1 too short, 1 duplicates" in capsys.readouterr().out
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["options"] == {"val_fraction": 0.0, "shard_tokens": 100_000_000, "text_field": "body",
                                "errors": "strict", "strip_gutenberg": True, "min_chars": 2, "dedup": True,
                                "normalize_newlines": True}
    text = load_tokenizer("gpt2").decode(stream(tmp_path / "s").tolist())
    docs = text.split("<|endoftext|>")
    assert docs[:2] == ["a dup", "café fine"] and docs[2].startswith("[Illustration")
    assert "Project Gutenberg" not in docs[2][-3000:]


@pytest.mark.slow
def test_real_sigint_during_prepare_leaves_nothing(shared_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    story = str(shared_data / "tinystories" / "tinystories_sample_2MiB.txt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "scratchllm", "prepare", "--input", *[story] * 40,
                             "--tokenizer", "gpt2", "--out", str(tmp_path / "out"), "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            # a shell without job control starts background jobs with SIGINT ignored, and a
                            # Python started that way keeps ignoring it: give the child the default back
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the ~80 MB of work
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()[-2000:]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- --overwrite and --out
def test_overwrite_replaces_only_a_shard_folder(shared_data, tmp_path, capsys):
    """`prepare --out DIR --overwrite` deleted any folder, whatever it held."""
    book = str(shared_data / "the-verdict.txt")
    mine = tmp_path / "u"
    mine.mkdir()
    (mine / "precious.doc").write_text("x")
    assert main(["prepare", "--input", book, "--tokenizer", "gpt2", "--out", str(mine), "--overwrite",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "u is not a shard folder of ours (it holds precious.doc); --overwrite would delete" in err
    assert (mine / "precious.doc").read_text() == "x"
    (tmp_path / "empty").mkdir()  # an empty folder and one of ours are replaced
    for _ in range(2):
        prepare([book], "gpt2", tmp_path / "empty", overwrite=True, progress=False)
    assert open_shards(tmp_path / "empty").train_tokens == 5120
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_is_checked_before_any_work(shared_data, tmp_path, monkeypatch):
    """`prepare --out . --overwrite` failed with "PosixPath('.') has an empty name" after the work."""
    def no_work(*args, **kwargs):
        raise AssertionError("the output folder must be checked before any work")

    monkeypatch.setattr(shards_mod, "expand_inputs", no_work)
    monkeypatch.setattr("scratchllm.tokenizer.load_tokenizer", no_work)
    book = str(shared_data / "the-verdict.txt")
    here = tmp_path / "here"
    (here / "sub").mkdir(parents=True)
    (here / "index.json").write_text("{}")  # even a shard folder: it is the folder we work in
    monkeypatch.chdir(here / "sub")
    for out, match in [(".", "is the current folder;"), ("", "is the current folder;"),
                       ("..", "is the current folder or holds it;")]:
        with pytest.raises(ScratchError, match=match):
            prepare([book], "gpt2", out, overwrite=True, progress=False)
    with pytest.raises(ScratchError, match=r"--out \. already exists \(pass --overwrite"):
        prepare([book], "gpt2", ".", progress=False)
    (here / "sub" / "f").write_text("x")
    with pytest.raises(ScratchError, match="f is a file, not a shard folder"):
        prepare([book], "gpt2", "f", overwrite=True, progress=False)
    (here / "sub" / "link").symlink_to(here)
    with pytest.raises(ScratchError, match="link is a symbolic link"):
        prepare([book], "gpt2", "link", overwrite=True, progress=False)
    assert sorted(p.name for p in here.iterdir()) == ["index.json", "sub"]


def test_an_input_inside_out_is_refused(shared_data, tmp_path):
    """Rerunning into corpus/shards would read the earlier output (tokenizer/vocab.txt) as text."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(shared_data / "the-verdict.txt", corpus / "book.txt")
    prepare([str(corpus)], "gpt2", corpus / "shards", progress=False)  # gpt2: no tokenizer/ copy inside
    tok = load_tokenizer("gpt2")
    (corpus / "shards" / "notes.txt").write_text("not a document")
    with pytest.raises(ScratchError, match=r"notes.txt is inside --out .*shards"):
        prepare([str(corpus)], tok, corpus / "shards", overwrite=True, progress=False)


@pytest.mark.parametrize("edit, match", [
    ({"train_shard_tokens": ["5120"]}, "must be lists of the same length"),
    ({"train_shards": ["../../etc/passwd"]}, "must be lists of the same length"),
    ({"dtype": "float64"}, "'dtype' is 'float64', not uint16 or uint32"),
    ({"val_tokens": None}, "'val_tokens' is None, not a count"),
    ({"train_tokens": 7}, "'train_shard_tokens' add up to 5120, not 'train_tokens' 7"),
])
def test_a_hand_edited_index_names_the_field(shared_data, tmp_path, edit, match):
    prepare([str(shared_data / "the-verdict.txt")], "gpt2", tmp_path / "s", progress=False)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    (tmp_path / "s" / "index.json").write_text(json.dumps({**index, **edit}))
    with pytest.raises(ScratchError, match=match):
        open_shards(tmp_path / "s")


def test_not_a_shard_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ScratchError, match="is not a shard folder \\(a file\\)"):
        open_shards(tmp_path / "f")
    with pytest.raises(ScratchError, match="is not a shard folder \\(it does not exist\\)"):
        open_shards(tmp_path / "nope")


def test_prepare_input_dev_zero_is_not_called_missing(tmp_path, capsys):
    assert main(["prepare", "--input", "/dev/zero", "--tokenizer", "gpt2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "/dev/zero is not a regular file" in err and "does not exist" not in err
    assert not (tmp_path / "o").exists()


def test_bad_options_fail_before_work(tmp_path, monkeypatch):
    monkeypatch.setattr("scratchllm.tokenizer.load_tokenizer", lambda spec: pytest.fail("no work before the checks"))
    with pytest.raises(ScratchError, match="--min-chars must be an integer >= 0, got -1"):
        prepare(["x.txt"], "gpt2", tmp_path / "o", min_chars=-1)
    with pytest.raises(ScratchError, match="--errors must be 'strict' or 'replace'"):
        prepare(["x.txt"], "gpt2", tmp_path / "o", errors="ignore")


def test_one_overwrite_rule_for_runs_shards_and_tokenizers(tmp_path, monkeypatch):
    """stage.check_out_dir (runs), prepare (shards) and Tokenizer.save (tokenizers) share
    common.clear_for_overwrite: `pretrain --out . --overwrite` inside a run folder deleted the folder
    the shell stood in."""
    from pathlib import Path

    from scratchllm.common import clear_for_overwrite
    from scratchllm.train.stage import check_out_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("")
    monkeypatch.chdir(run)
    with pytest.raises(ScratchError, match="is the current folder; --overwrite would delete the folder you are working"):
        check_out_dir(Path("."), None, True)
    assert (run / "config.toml").exists()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(run)
    with pytest.raises(ScratchError, match="link is a symbolic link"):
        check_out_dir(Path("link"), None, True)
    check_out_dir(Path("run"), None, True)  # one of ours: deleted
    assert not run.exists()
    many = tmp_path / "many"
    many.mkdir()
    for i in range(7):
        (many / f"f{i}").write_text("x")
    with pytest.raises(ScratchError, match=r"\(it holds f0, f1, f2, f3, f4 and 2 more\)"):
        clear_for_overwrite(many, ["index.json"], "shard folder")
    (many / "step_0000001").mkdir()  # a checkpoint marks a run
    assert clear_for_overwrite(many, ["config.toml", "step_" + "[0-9]" * 7], "run folder", delete=False)
    assert many.exists() and not clear_for_overwrite(tmp_path / "nope", ["index.json"], "shard folder")
