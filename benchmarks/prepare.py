"""Benchmark `prepare` throughput (MB of text per second) with the GPT-2 tokenizer on all of
../shared/data's English text (Gutenberg, Tiny Shakespeare, the TinyStories sample, The Verdict).

Compared in one run, interleaved so that load from other jobs hits every mode alike:
  plain    a single-threaded tiktoken loop: read each file, encode_ordinary, append <|endoftext|>,
           write uint16 tokens (what you would write by hand, with no cleaning, splitting or index)
  w1, w2   scratchllm's `prepare(..., workers=1|2)` into a fresh folder
  plain-x2 two plain loops at once in two processes, each over the whole corpus (so twice the text):
           the speedup this machine can give two processes right now, the ceiling for w2 / w1
Targets (issue 3): w2 >= 1.7x w1, and w1 >= 0.8x plain. Best-of-N wall time is reported, with the
CPU seconds used (parent + workers) so a busy machine can be told apart from a slow pipeline. Both
tokenizers are loaded before timing starts (a fixed ~0.2 s in a real run, whatever the corpus size).

    python benchmarks/prepare.py [--repeat 5] [--scale 1] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def corpus(data: Path) -> list[str]:
    files = sorted((data / "gutenberg").glob("*.txt")) + [
        data / "tinyshakespeare.txt", data / "tinystories" / "tinystories_sample_2MiB.txt",
        data / "tinystories" / "tinystories_sample_cs336.txt", data / "the-verdict.txt"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"missing data files: {missing} (pass --data)")
    return [str(f) for f in files]


def plain_loop(files: list[str], out: Path, enc) -> None:
    with open(out / "plain.bin", "wb") as f:
        for path in files:
            ids = enc.encode_ordinary(Path(path).read_text(encoding="utf-8"))
            ids.append(enc.eot_token)
            np.array(ids, dtype=np.uint16).tofile(f)


def plain_twice(files: list[str], out: Path, enc) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=plain_loop, args=(files, Path(tempfile.mkdtemp(dir=out)), enc)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def ours(files: list[str], out: Path, tok, workers: int) -> None:
    from scratchllm.data.shards import prepare

    prepare(files, tok, out / f"w{workers}", workers=workers, progress=False)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children)."""
    t0, c0 = time.perf_counter(), os.times()
    fn()
    t1, c1 = time.perf_counter(), os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) \
        + (c1.children_system - c0.children_system)
    return t1 - t0, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("SCRATCHLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))
    ap.add_argument("--repeat", type=int, default=5, help="runs per mode (best is reported)")
    ap.add_argument("--scale", type=int, default=1, help="use the corpus this many times over")
    args = ap.parse_args()
    data = Path(args.data)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(data / "tiktoken_cache"))
    files = corpus(data) * args.scale
    mb = sum(Path(f).stat().st_size for f in files) / 1e6
    print(f"corpus: {len(files)} files, {mb:.2f} MB; {os.cpu_count()} CPUs; load average "
          f"{os.getloadavg()[0]:.2f} at start", flush=True)
    # both tokenizers are loaded once, outside the timings (tiktoken caches its encoding in-process;
    # our Tokenizer caches its fingerprint), so the numbers compare the pipelines, not file loading
    import tiktoken

    from scratchllm.tokenizer import load_tokenizer

    enc, tok = tiktoken.get_encoding("gpt2"), load_tokenizer("gpt2")
    tok.fingerprint()
    modes = {"plain": lambda out: plain_loop(files, out, enc), "w1": lambda out: ours(files, out, tok, 1),
             "w2": lambda out: ours(files, out, tok, 2), "plain-x2": lambda out: plain_twice(files, out, enc)}
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for name, fn in modes.items():
            tmp = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
            try:
                results[name].append(timed(lambda: fn(tmp)))  # noqa: B023 (called at once)
            finally:
                shutil.rmtree(tmp)
    print(f"load average {os.getloadavg()[0]:.2f} at end\n")
    best = {m: min(r) for m, r in results.items()}
    print("| mode | best wall s | median wall s | MB/s (best) | CPU s (best run) |")
    print("|---|---|---|---|---|")
    for m, r in results.items():
        walls = sorted(w for w, _ in r)
        text = 2 * mb if m == "plain-x2" else mb
        print(f"| {m} | {best[m][0]:.2f} | {walls[len(walls) // 2]:.2f} | {text / best[m][0]:.2f} | {best[m][1]:.2f} |")
    w1_vs_plain = best["plain"][0] / best["w1"][0]
    w2_vs_w1 = best["w1"][0] / best["w2"][0]
    print(f"\n2 workers vs 1 worker: {w2_vs_w1:.2f}x (target >= 1.7x)")
    print(f"1 worker vs plain tiktoken loop: {w1_vs_plain:.2f}x (target >= 0.8x)")
    print(f"machine ceiling, two plain loops at once vs one: {2 * best['plain'][0] / best['plain-x2'][0]:.2f}x")
    cpu1, cpu2 = min(c for _, c in results["w1"]), min(c for _, c in results["w2"])
    print(f"estimate for two idle cores from CPU seconds, w1 CPU / (w2 CPU / 2): {2 * cpu1 / cpu2:.2f}x")


if __name__ == "__main__":
    main()
