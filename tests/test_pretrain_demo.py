"""The `make demo` path on a tiny budget: tokenizer, shards, unigram baseline, pretraining, samples from
the untrained and trained model, and a run folder with loss.png and report.md (slow: ~30 s)."""

import pytest

from scratchllm.cli import main

pytestmark = pytest.mark.slow


def test_demo_tiny_budget(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--vocab-size", "320", "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    for expected in ("[2] tokenizing", "unigram baseline", "untrained samples", "trained samples",
                     "[4] validation loss", "Run folder:"):
        assert expected in out, expected
    run = tmp_path / "run"
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "final validation**: loss" in (run / "report.md").read_text()
    assert (run / "latest").read_text().strip() == "step_0000003"
