"""`scratchllm lab list` and `scratchllm lab run NAME [--quick] [--out DIR] [--overwrite]`.

What it does: `list` prints each experiment's name and claim; `run` prints the claim, runs the
experiment (--quick: under a minute on 2 cores; the full run: under 10 minutes), prints the table and
the verdict, and writes result.json, result.md and result.png into --out (default lab/NAME). An --out
that holds another experiment's results, or anything that is not a lab result, is refused unless
--overwrite.
What it does not do: the experiments (one module each, see __init__.py).

    scratchllm lab list
    scratchllm lab run weight-tying --quick --out /tmp/tying
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from scratchllm.common import ScratchError, atomic_write_text, read_json
from scratchllm.lab import experiments
from scratchllm.lab.core import MARKER, machine, markdown_table, write


def lab_list(args) -> int:
    for name, mod in experiments().items():
        print(f"{name:22s} {mod.CLAIM}")
    return 0


def check_out(out: Path, name: str, overwrite: bool) -> None:
    """Refuse an --out holding anything but an earlier result of this same experiment (or nothing)."""
    if out.exists() and not out.is_dir():
        raise ScratchError(f"--out {out} is a file: give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    marker = out / MARKER
    other = read_json(marker).get("name") if marker.is_file() else None
    if other == name:
        return  # a rerun of the same experiment replaces its own results
    if not overwrite:
        what = f"the results of experiment {other!r}" if other else "files that are not a lab result"
        raise ScratchError(f"--out {out} holds {what}: pick another folder, or pass --overwrite to replace them")
    shutil.rmtree(out)


def lab_run(args) -> int:
    exps = experiments()
    if args.name not in exps:
        raise ScratchError(f"unknown experiment {args.name!r}; the experiments are: {', '.join(exps)}")
    mod = exps[args.name]
    out = Path(args.out or Path("lab") / args.name)
    check_out(out, args.name, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)  # marked at once: a run that fails halfway can be rerun into it
    atomic_write_text(out / MARKER, json.dumps({"name": args.name, "status": "running"}) + "\n")
    print(f"claim: {mod.CLAIM}\nrunning {args.name}{' (quick)' if args.quick else ''} -> {out}", flush=True)
    t0 = time.perf_counter()
    result = mod.run(args.quick, out)
    result.settings = {**result.settings, "quick": args.quick, "seconds": round(time.perf_counter() - t0, 1),
                       **machine()}
    write(result, out)
    sys.stdout.write("\n" + markdown_table(result.rows))
    print(f"verdict: {result.verdict}. {result.why}\nwrote {out / 'result.md'}, result.json, result.png")
    return 0
