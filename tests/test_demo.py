"""`scratchllm demo`: every argument is checked before any work, it deletes nothing of --out but its own
tokenizer/, shards/ and run/, and a second run into the same folder (`make demo` twice) works. The runs
here use a small corpus (The Verdict's paragraphs) in place of the built-in one and skip the samples.
tests/test_pretrain_demo.py runs the real thing once."""

import pytest

import scratchllm.data.sources as sources
from scratchllm.cli import main


@pytest.fixture()
def no_work(monkeypatch):
    def fail():
        raise AssertionError("the arguments must be checked before any work")

    monkeypatch.setattr(sources, "pydocs_documents", fail)


@pytest.fixture()
def small_corpus(shared_data, monkeypatch):
    paragraphs = [p for p in (shared_data / "the-verdict.txt").read_text().split("\n\n") if p.strip()]
    monkeypatch.setattr(sources, "pydocs_documents", lambda: paragraphs * 3)
    monkeypatch.setattr("scratchllm.demo.samples", lambda *args: None)  # seconds each; the slow demo test has them


@pytest.mark.parametrize("flags, message", [
    (["--vocab-size", "100"], "--vocab-size 100 is too small: it must exceed 256 bytes + 1 special token(s) = 257"),
    (["--vocab-size", "257"], "--vocab-size 257 is too small"),
    (["--max-steps", "0"], "--max-steps must be an integer >= 1, got 0"),
    (["--max-steps", "-5"], "--max-steps must be an integer >= 1, got -5"),
])
def test_bad_numbers_fail_before_any_work(no_work, tmp_path, capsys, flags, message):
    """They failed only after 12 s of tokenizer training and left a partial folder."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_foreign_subfolder_or_file_stops_it_before_any_work(no_work, tmp_path, capsys):
    out = tmp_path / "demo"
    (out / "run").mkdir(parents=True)
    (out / "run" / "precious.doc").write_text("x")
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "run is not a run folder of ours (it holds precious.doc); rerunning the demo into this --out" in err
    assert (out / "run" / "precious.doc").read_text() == "x"
    (tmp_path / "f").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "f")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "shards").write_text("x")
    assert main(["demo", "--out", str(tmp_path / "g")]) == 2
    assert "shards is a file, not a shard folder" in capsys.readouterr().err


@pytest.mark.slow  # two short demo runs: about 20 s on 2 cores
def test_a_rerun_replaces_its_own_folders_and_keeps_everything_else(small_corpus, tmp_path, capsys):
    """The demo called save, prepare and pretrain with overwrite=True: whatever --out held was at risk."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "shards").mkdir()  # an empty folder of the demo's names is fine
    for steps in ("2", "3"):
        assert main(["demo", "--out", str(out), "--vocab-size", "300", "--max-steps", steps]) == 0
        assert "Run folder:" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run", "shards", "tokenizer"]
    assert (out / "run" / "latest").read_text().strip() == "step_0000003"
    assert not (out / "run" / "step_0000002").exists()  # the first run was replaced, not mixed in
