"""The command line: help, version, every subcommand wired to a function that really exists (the
module and name its handler imports lazily), and the tokenizer subcommands end to end (in-process)."""

import argparse
import ast
import functools
import importlib
import importlib.util
import inspect
import subprocess
import sys
import textwrap

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


def lazy_targets(func) -> list[tuple[str, str]]:
    """What a handler imports in its body, as (module, name): `from X import Y` -> (X, "Y"); `import X`
    -> (X, "") plus (X, "f") for each `X.f` it uses (or `m.f`, with `import X as m`).

    >>> def h(args):
    ...     from scratchllm.data.shards import run
    ...     return run(args)
    >>> lazy_targets(h)
    [('scratchllm.data.shards', 'run')]
    """
    while isinstance(func, functools.partial):
        func = func.func
    func = inspect.unwrap(func)
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    package = func.__module__.rpartition(".")[0]
    targets, modules = [], {}  # modules: the name a module is bound to in the handler -> the module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            targets += [(module, a.name) for a in node.names if a.name != "*"]
        elif isinstance(node, ast.Import):
            for a in node.names:
                targets.append((a.name, ""))
                modules[a.asname or a.name] = a.name
    for node in ast.walk(tree):  # m.f (import X as m) and a.b.f (import a.b)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in modules:
            targets.append((modules[ast.unparse(node.value)], node.attr))
    return targets


def missing_targets(func) -> list[str]:
    """The lazy imports of a handler that fail: a module that cannot be imported, a name it lacks."""
    problems = []
    for module, name in lazy_targets(func):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            problems.append(f"cannot import {module} ({type(e).__name__}: {e})")
            continue
        if not name or hasattr(mod, name):
            continue
        try:  # `from package import submodule`
            importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError:
            problems.append(f"{module} has no {name!r}")
    return problems


def test_every_subcommand_imports_a_real_target():
    """For every leaf subcommand, import what its handler imports lazily: a renamed or moved stage
    function fails here, not when a user first runs the command."""
    leaves = list(_leaf_parsers(build_parser()))
    assert {("tokenizer", "train"), ("prepare",), ("pretrain",)} <= {p for p, _ in leaves}
    problems = []
    for prefix, parser in leaves:
        cmd = f"scratchllm {' '.join(prefix)}"
        func = parser.get_default("func")
        if not callable(func):
            problems.append(f"{cmd}: no handler")
        elif not lazy_targets(func) and func.__module__ == "scratchllm.cli":
            problems.append(f"{cmd}: handler {func.__name__} imports no stage function")
        else:
            problems += [f"{cmd}: {p}" for p in missing_targets(func)]
    assert not problems, "\n".join(problems)


def _renamed(args):
    from scratchllm.data.shards import run_prepare  # the real one is `run`

    return run_prepare(args)


def _moved(args):
    import scratchllm.data.no_such_module as m

    return m.run(args)


def _attribute(args):
    import scratchllm.data.shards
    import scratchllm.data.shards as shards

    return shards.run(args) if args else scratchllm.data.shards.prepare_all(args)


def test_a_renamed_target_is_caught():
    assert missing_targets(_renamed) == ["scratchllm.data.shards has no 'run_prepare'"]
    assert missing_targets(_moved)[0].startswith("cannot import scratchllm.data.no_such_module (ModuleNotFoundError")
    assert missing_targets(_attribute) == ["scratchllm.data.shards has no 'prepare_all'"]
    assert missing_targets(functools.partial(_renamed)) != []


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
