"""The lab (src/scratchllm/lab/): every experiment runs with --quick through the real command and writes
its result.json (claim, a verdict, rows), result.md and result.png; bad input is refused. The numbers
themselves are the experiments' output (docs/lab.md), not asserted here, except the parameter count of
weight tying, which is exact."""

from __future__ import annotations

import json
import math

import pytest

from scratchllm.cli import main
from scratchllm.common import ScratchError
from scratchllm.lab import experiments
from scratchllm.lab.attention import slope
from scratchllm.lab.core import VERDICTS, Result, markdown_table, write
from scratchllm.lab.grad_clip import spikes

NAMES = ["norm-position", "mlp-activation", "weight-tying", "grad-clip", "lr-schedule", "tokenization", "attention",
         "kv-cache", "compile-bf16", "lora", "prompt-masking", "freezing"]
NEED_DATA = {"lora", "prompt-masking", "freezing"}  # data:sms-spam / data:instruction-data, via ../shared


def test_list_names_every_experiment_in_the_books_order(capsys):
    assert main(["lab", "list"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == NAMES == list(experiments())


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_experiment_runs_quick_and_writes_its_results(name, tmp_path, capsys, monkeypatch, request):
    if name in NEED_DATA:
        monkeypatch.setenv("SCRATCHLLM_MIRROR", str(request.getfixturevalue("shared_data")))
    out = tmp_path / name
    assert main(["lab", "run", name, "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["name"] == name and result["verdict"] in VERDICTS and result["why"]
    assert result["rows"] and result["settings"]["quick"] is True and result["settings"]["seconds"] < 90
    assert experiments()[name].CLAIM in (out / "result.md").read_text()
    assert (out / "result.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"verdict: {result['verdict']}" in printed
    if name == "weight-tying":  # the one exact number: tying saves vocab_size x n_embd = 256 x 64
        tied, untied = result["rows"]
        assert untied["parameters"] - tied["parameters"] == 256 * 64 and result["settings"]["gpt2 saved"] == 50257 * 768


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ScratchError, match="unknown experiment 'nope'.*weight-tying"):
        main_raise(["lab", "run", "nope"])


def main_raise(argv):
    """main() prints errors; the lab's commands raise them, which is what these tests check."""
    from scratchllm.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def _fake_result(out, name):
    write(Result(name, "a claim", {"seed": 0}, [{"x": 1}], "holds", "because"), out)


def test_out_holding_another_experiment_is_refused_unless_overwrite(tmp_path, monkeypatch):
    import scratchllm.lab.weight_tying as tying

    out = tmp_path / "o"
    _fake_result(out, "attention")
    with pytest.raises(ScratchError, match="holds the results of experiment 'attention'.*--overwrite"):
        main_raise(["lab", "run", "weight-tying", "--out", str(out)])
    (tmp_path / "f").write_text("x")
    with pytest.raises(ScratchError, match="is a file"):
        main_raise(["lab", "run", "weight-tying", "--out", str(tmp_path / "f")])
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ScratchError, match="files that are not a lab result"):
        main_raise(["lab", "run", "weight-tying", "--out", str(other)])
    # --overwrite replaces it; a rerun of the same experiment needs no flag
    monkeypatch.setattr(tying, "run", lambda quick, out: Result(tying.NAME, tying.CLAIM, {}, [{"a": 1.5}], "depends", "w"))
    assert main_raise(["lab", "run", "weight-tying", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "result.json").read_text())["name"] == "weight-tying"
    assert main_raise(["lab", "run", "weight-tying", "--out", str(out)]) == 0
    assert not (out / "result.png").exists()  # no plot given, none written


def test_result_checks_its_verdict_and_tables_render():
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        Result("n", "c", {}, [], "maybe", "w")
    assert markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "b": float("nan")}]) == \
        "| a | b |\n|---|---|\n| 1 | 0.1235 |\n| 2 | nan |\n"


def test_spikes_and_slopes_by_hand():
    assert spikes([3.0, 2.9, 3.5, 3.4, float("nan"), 2.0]) == 2  # +0.6 is a spike, so is a non-finite loss
    assert spikes([3.0, 3.4, 3.0]) == 0
    assert slope([1, 2, 4], [3, 12, 48]) == pytest.approx(2.0)  # y = 3 x^2
    assert slope([10, 100], [5, 5]) == pytest.approx(0.0)
    assert math.isclose(slope([2, 4, 8], [2, 4, 8]), 1.0)
