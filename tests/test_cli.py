"""The command line: help, version, every subcommand wired to an importable function, and the
tokenizer subcommands end to end (in-process)."""

import argparse
import subprocess
import sys

import pytest

from scratchllm import __version__
from scratchllm.cli import build_parser, main


def _leaf_parsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaf_parsers(sub, (*prefix, name))
            return
    yield prefix, parser


def test_every_subcommand_maps_to_a_callable():
    leaves = list(_leaf_parsers(build_parser()))
    assert ("tokenizer", "train") in [p for p, _ in leaves]
    for prefix, parser in leaves:
        func = parser.get_default("func")
        assert callable(func), f"`scratchllm {' '.join(prefix)}` has no handler"


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "scratchllm", "--help"], capture_output=True, text=True, check=True)
    assert "tokenizer" in out.stdout and "demo" in out.stdout
    out = subprocess.run([sys.executable, "-m", "scratchllm", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"scratchllm {__version__}"


def test_tokenizer_commands(tmp_path, capsys, shared_data):
    book = shared_data / "the-verdict.txt"
    assert main(["tokenizer", "train", "--input", str(book), "--vocab-size", "400", "--out", str(tmp_path / "t"),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(tmp_path / "t"), "Hello world"]) == 0
    ids = capsys.readouterr().out.split()
    assert main(["tokenizer", "decode", "--tokenizer", str(tmp_path / "t"), *ids]) == 0
    assert capsys.readouterr().out == "Hello world\n"
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "Hello world", "--pieces"]) == 0
    assert capsys.readouterr().out == "15496\t'Hello'\n995\t' world'\n"
    assert main(["tokenizer", "stats", "--tokenizer", str(tmp_path / "t"), "--file", str(book)]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "gpt2 (50257)" in out and "t (400)" in out
    # existing output folder is refused, special tokens need --allow-special
    assert main(["tokenizer", "train", "--input", str(book), "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "x<|endoftext|>"]) == 2
    assert "--allow-special" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "x<|endoftext|>", "--allow-special"]) == 0
    assert capsys.readouterr().out == "87 50256\n"


def test_tokenizer_train_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello wor\xffld and more text")
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.txt: invalid UTF-8 at byte offset 9" in err and "--errors replace" in err
    assert main(["tokenizer", "train", "--input", str(bad), "--vocab-size", "262", "--out", str(tmp_path / "o"),
                 "--errors", "replace", "--quiet"]) == 0
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an existing --out is refused before any training (here: before the missing input is even looked at)
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "o")]) == 2
    assert "o already exists" in capsys.readouterr().err
    # encode and stats take --errors too
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "--file", str(bad)]) == 2
    assert "bad.txt: invalid UTF-8 at byte offset 9" in capsys.readouterr().err
    assert main(["tokenizer", "encode", "--tokenizer", "gpt2", "--file", str(bad), "--errors", "replace"]) == 0
    assert main(["tokenizer", "stats", "--tokenizer", "gpt2", "--file", str(bad), "--errors", "replace"]) == 0
    assert "tokens/word" in capsys.readouterr().out
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["tokenizer", "train", "--input", str(empty), "--vocab-size", "300", "--out", str(tmp_path / "o3")]) == 2
    assert "corpus is empty" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()


def test_small_corpus_warning_is_one_clean_line(tmp_path, capsys):
    f = tmp_path / "tiny.txt"
    f.write_text("abcd")
    assert main(["tokenizer", "train", "--input", str(f), "--vocab-size", "1000", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: the corpus only supports 3 merges" in err and "UserWarning" not in err


@pytest.mark.parametrize("argv", [["tokenizer"], ["nope"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
