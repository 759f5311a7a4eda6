"""The benchmark scripts still run: each one's smoke mode (tiny shapes, a few steps) as a user would run
it. Timings are not checked here (they live in docs/benchmarks.md); that each script completes and
its built-in equality checks hold is. Slow (a few minutes): it compiles and trains a little.

bf16 follows the product's rule (`precision=auto`): a benchmark times it only where auto picks bf16
or when asked by name. On a CPU without native bf16 (AVX2 only, e.g. an AMD EPYC) bf16 matmuls are
emulated about 100x slower, so the smoke runs are also run here as on such a CPU: with
`scratchllm.common.cpu_has_fast_bf16` forced to False, every bf16 setting must be skipped, and said so."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

SMOKE = {  # script -> (smoke-mode arguments, the line that reports its ratio against the peer)
    "tokenizer": (["--quick"], "ratio vs tiktoken"),
    "prepare": (["--repeat", "1"], "1 worker vs plain tiktoken loop"),
    "generate": (["--quick"], "best: ours"),
    "train": (["--quick"], "best: ours"),
    "model_step": (["--quick", "--repeats", "1"], "x HF)"),
    "open_weights": (["--quick"], "(target >= 1.5x)"),
    "classify": (["--quick", "--repeats", "1"], "ratio ours/peer"),
    "sft": (["--quick", "--steps", "1"], "speed ours/peer"),
    "dpo": (["--quick", "--steps", "1"], "speed precomputed/reference"),
    "serve": (["--quick"], "overhead vs scratchllm generate"),
}
# the scripts that time torch in bf16 -> smoke arguments for the run as on a CPU without fast bf16
# (train: ours only, it is the slowest; the skip decision is the same for both implementations)
WITHOUT_FAST_BF16 = {
    "generate": ["--quick"],
    "train": ["--quick", "--impls", "ours"],
    "model_step": ["--quick", "--repeats", "1"],
    "open_weights": ["--quick"],
    "classify": ["--quick", "--repeats", "1"],
    "sft": ["--quick", "--steps", "1"],
    "dpo": ["--quick", "--steps", "1", "--modes", "lora"],
    "serve": ["--quick"],
}
# run a script as `python benchmarks/NAME.py ARGV` would, but with no fast bf16 on this CPU
AS_ON_AVX2 = """import runpy, sys
import scratchllm.common
scratchllm.common.cpu_has_fast_bf16 = lambda: False
script = sys.argv[1]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def run_script(argv: list[str], shared_data) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCRATCHLLM_SHARED_DATA": str(shared_data)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SMOKE))
def test_benchmark_smoke_run(name, shared_data):
    argv, ratio_line = SMOKE[name]
    proc = run_script([str(BENCH / f"{name}.py"), *argv], shared_data)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ratio_line in proc.stdout, proc.stdout[-2000:]


# lines about bf16 *weights* read by our kernels (model/quant.py), which turn them into fp32 in registers
# (AVX2) and are fast on any x86 CPU: not an emulated bf16 matmul, so they run there too
BF16_WEIGHT_LINES = {"generate": ("ours bf16 ", "target bf16 >= 3x", "batch 8 bf16", "resident model: bf16")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WITHOUT_FAST_BF16))
def test_benchmark_smoke_run_without_fast_bf16_skips_bf16(name, shared_data):
    proc = run_script(["-c", AS_ON_AVX2, str(BENCH / f"{name}.py"), *WITHOUT_FAST_BF16[name]], shared_data)
    out = proc.stdout
    assert proc.returncode == 0, out[-2000:] + proc.stderr[-2000:]
    assert "skipped bf16: precision=auto picks fp32 on this CPU: no native bf16" in out, out[-2000:]
    assert "to time it anyway" in out
    timed = [ln for ln in out.splitlines() if "bf16" in ln and not ln.startswith("skipped")
             and not ln.startswith(BF16_WEIGHT_LINES.get(name, ()))]
    assert timed == [], timed  # no bf16 timing, ceiling or floor line


@pytest.fixture()
def precision_rules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _precision

    return _precision


@pytest.mark.parametrize("fast", [True, False], ids=["fast-bf16", "avx2-only"])
def test_bf16_settings_follow_precision_auto(precision_rules, monkeypatch, fast):
    import scratchllm.common

    monkeypatch.setattr(scratchllm.common, "cpu_has_fast_bf16", lambda: fast)
    settings = ["fp32", "bf16", "bf16+compile"]
    run, skipped = precision_rules.choose_settings(settings, "cpu", explicit=False)
    if fast:
        assert (run, skipped) == (settings, {})
    else:
        assert run == ["fp32"] and list(skipped) == ["bf16", "bf16+compile"]
        assert all("no native bf16" in why for why in skipped.values())
    # asked for by name: run wherever it is asked, however slow
    assert precision_rules.choose_settings(["bf16"], "cpu", explicit=True) == (["bf16"], {})


def test_skipped_settings_are_printed_with_the_flag_that_times_them(precision_rules, capsys):
    precision_rules.print_skipped({"bf16+compile": "no bf16 here"}, "--settings {setting}")
    assert capsys.readouterr().out == "skipped bf16+compile: no bf16 here; pass --settings bf16+compile to time it anyway\n"
