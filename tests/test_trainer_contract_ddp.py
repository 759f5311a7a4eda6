"""A non-LM objective under DDP: the toy classification stage of classify_helpers.py (frozen backbone,
adapter and head reached through `model.classify`, accuracy as a metric) on 2 gloo processes with 4
rows each equals 1 process with 8 rows: losses and accuracies per step and evaluation, and the saved
adapter + head. If the objective's call skipped DDP's gradient sync, the ranks' weights would drift
apart from the single process's. Slow: one torchrun start-up."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent
ENV = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}


def run(out, nproc):
    script = [str(HERE / "classify_helpers.py"), str(out), "--global-batch", "8", "--max-steps", "6"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
           if nproc > 1 else [sys.executable, *script])
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_classification_equals_one_process(tmp_path):
    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    assert {r["split"] for r in one} == {"train", "val"}
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert a["accuracy"] == b["accuracy"] and a["count"] == b["count"]
    wa = load_file(str(tmp_path / "one" / "step_0000006" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "step_0000006" / "model.safetensors"))
    assert set(wa) == {"adapter.A.weight", "adapter.B.weight", "head.weight", "head.bias"} == set(wb)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-5)
    assert (tmp_path / "two" / "best" / "model.safetensors").is_file()
