"""Kill a training process (SIGKILL: no chance to clean up) or stop it (SIGTERM: checkpoint and exit),
resume it, and check that it ends with bit-identical weights and identical logged metrics compared
with an uninterrupted run (CPU, fp32). The runs are subprocesses of tests/trainer_helpers.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

HERE = Path(__file__).parent
SCRIPT = HERE / "trainer_helpers.py"
ENV = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}


def start(out, *extra):
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *extra], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pred, proc, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        time.sleep(0.02)
    raise AssertionError("timed out")


def train_lines(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["tokens"], r["loss"], r.get("lr"), r.get("grad_norm")) for r in recs]


def final_weights(out):
    return load_file(str(out / (out / "latest").read_text().strip() / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    proc = start(out)
    assert proc.wait(120) == 0, proc.stdout.read()
    return out


def assert_same_run(a, b):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), f"{k} differs after resume"
    assert train_lines(a) == train_lines(b)


def test_sigkill_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = start(out, "--sleep", "0.03")
    latest = out / "latest"
    wait_for(lambda: latest.is_file() and latest.read_text().strip() >= "step_0000010", proc)
    time.sleep(0.1)  # die somewhere after the step-10 checkpoint, mid-way through later steps
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    stopped = int(latest.read_text().strip()[5:])
    assert 10 <= stopped < 30, stopped
    resumed = start(out, "--resume")
    assert resumed.wait(120) == 0, resumed.stdout.read()
    assert_same_run(uninterrupted, out)


def test_sigterm_checkpoints_and_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "stopped"
    proc = start(out, "--sleep", "0.03")
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count('"train"') >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143  # 128 + SIGTERM: what shells and schedulers expect
    log = proc.stdout.read()
    assert "signal SIGTERM" in log and "continue with --resume" in log
    last_step = max(r[0] for r in train_lines(out))
    assert (out / "latest").read_text().strip() == f"step_{last_step:07d}" and last_step < 30
    resumed = start(out, "--resume")
    assert resumed.wait(120) == 0, resumed.stdout.read()
    assert_same_run(uninterrupted, out)
