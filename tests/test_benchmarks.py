"""The benchmark scripts still run: each one's smoke mode (tiny shapes, a few steps) as a user would run
it. Timings are not checked here (they live in docs/benchmarks.md); that each script completes and
its built-in equality checks hold is. Slow (about a minute): it compiles and trains a little."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SMOKE = {  # script -> (smoke-mode arguments, the line that reports its ratio against the peer)
    "tokenizer": (["--quick"], "ratio vs tiktoken"),
    "prepare": (["--repeat", "1"], "1 worker vs plain tiktoken loop"),
    "generate": (["--quick"], "best: ours"),
    "train": (["--quick"], "best: ours"),
    "model_step": (["--quick", "--repeats", "1"], "x HF)"),
}


@pytest.mark.parametrize("name", list(SMOKE))
def test_benchmark_smoke_run(name, shared_data):
    env = {**os.environ, "SCRATCHLLM_SHARED_DATA": str(shared_data)}
    argv, ratio_line = SMOKE[name]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *argv], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ratio_line in proc.stdout, proc.stdout[-2000:]
