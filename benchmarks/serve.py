"""Serving: `scratchllm serve` under 1, 8 and 32 concurrent streaming clients, against `scratchllm
generate` on the same model, in the same run.

What it measures: for each model (the tiny preset with random weights and GPT-2's tokenizer (its vocab_size 50304), then
SmolLM2-135M-Instruct from its GGUF when it is installed), it starts `scratchllm serve --max-batch 32`
(a subprocess, as a user runs it) and lets C clients (threads, each its own HTTP connection) send R
streaming /v1/completions requests one after another: greedy, ignore_eos, a prompt of about 32
tokens, max_tokens varying around M so that the clients drift apart as real ones do, the clients
joining one after another over about one request's time. Per level:
aggregate completion tokens/s (all tokens / wall time), p50/p95 time to first token (request sent ->
first text) and p50/p95 inter-token latency (gaps between text chunks). Before that, the single
stream against `scratchllm generate --max-new-tokens M` on the same prompt, the two alternating
(tokens/s including the prefill on both sides, best of 3 each): the server's overhead. Precision is what `precision=auto` picks here
(bf16 only on CPUs with native bf16), passed to both commands.
Targets (docs/benchmarks.md): 8 clients >= 4x the 1-client tokens/s; p95 time to first token at 8
clients < 2x the 1-client one; overhead vs generate < 10%.
What it does not do: measure quality, or long prompts (a long prefill holds up every decode step).

    python benchmarks/serve.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/serve.py --quick    # smoke run: tiny model, 1 and 4 clients, a few tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import torch
from _precision import bf16_reason, print_skipped

from scratchllm.common import ScratchError, select_precision

TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps as his father had "
        "taught him, and at the top he wiped the glass, trimmed the wick and watched the ships pass by.")


def tiny_model(folder: Path) -> str:
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer import load_tokenizer
    from scratchllm.weights.folder import save_model

    torch.manual_seed(0)
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), vocab_size=50304)  # GPT-2's ids, padded to 64
    save_model(GPT(config), load_tokenizer("gpt2"), folder / "tiny")
    return str(folder / "tiny")


def start_server(model: str, precision: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "scratchllm", "serve", "--model", model, "--port", str(port), "--max-batch", "32",
           "--max-queue", "256", "--precision", precision, "--device", "cpu", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScratchError(f"scratchllm serve exited: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise ScratchError("scratchllm serve did not start within 300 s")


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, tokens = [], 0
    with client.stream("POST", url, json=body, timeout=600) as r:
        if r.status_code != 200:
            raise ScratchError(f"HTTP {r.status_code}: {r.read()[:300]}")
        for line in r.iter_lines():  # parsed as little as possible: the clients share the server's cores
            if not line.startswith("data: {"):
                continue
            if '"choices": []' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
            elif '"text": ""' not in line:
                times.append(time.perf_counter())
    end = time.perf_counter()
    return {"ttft": times[0] - t0 if times else end - t0, "gaps": [b - a for a, b in zip(times, times[1:])],
            "tokens": tokens, "seconds": end - t0}


def load_level(base: str, clients: int, requests: int, max_tokens: int, step_s: float, seed: int) -> dict:
    rng = random.Random(seed)
    plans = [[(f"Client {c}, request {r}: {TEXT}", max(2, int(max_tokens * rng.uniform(0.5, 1.5))))
              for r in range(requests)] for c in range(clients)]
    results, errors = [], []

    def run(plan, delay):
        time.sleep(delay)
        with httpx.Client() as client:
            for prompt, n in plan:
                try:
                    results.append(one_request(client, base + "/v1/completions", prompt, n))
                except Exception as e:  # noqa: BLE001  (reported below)
                    errors.append(repr(e))

    # clients join one after another over about one request's time (as real ones arrive), not all at once:
    # a burst of C prompts at t=0 would be prefilled one after another and time that burst, not the server
    ramp = max_tokens * step_s
    threads = [threading.Thread(target=run, args=(p, ramp * c / clients)) for c, p in enumerate(plans)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise ScratchError(f"{len(errors)} of {clients * requests} requests failed: {errors[:3]}")
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft": [r["ttft"] for r in results], "itl": gaps or [0.0]}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def generate_speed(model: str, precision: str, prompt: str, n: int) -> float:
    cmd = [sys.executable, "-m", "scratchllm", "generate", "--model", model, "--prompt", prompt, "--max-new-tokens",
           str(n), "--temperature", "0", "--ignore-eot", "--no-echo", "--precision", precision, "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    m = re.search(r"\(([\d.]+) tokens/s\)", proc.stderr)
    if proc.returncode != 0 or not m:
        raise ScratchError(f"scratchllm generate failed: {proc.stderr[-1000:]}")
    return float(m.group(1))


def bench_model(name: str, model: str, precision: str, levels: list[tuple[int, int]], max_tokens: int,
                repeats: int) -> None:
    port = 8700 + os.getpid() % 1000
    proc = start_server(model, precision, port)
    base = f"http://127.0.0.1:{port}"
    prompt = f"Client 0, request 0: {TEXT}"
    try:
        with httpx.Client() as client:
            one_request(client, base + "/v1/completions", "warm up", 4)
            # single stream against `scratchllm generate`, alternating so that both see the same machine
            served, gen = 0.0, 0.0
            for _ in range(repeats):
                gen = max(gen, generate_speed(model, precision, prompt, max_tokens))
                r = one_request(client, base + "/v1/completions", prompt, max_tokens)
                served = max(served, r["tokens"] / r["seconds"])
                step_s = (r["seconds"] - r["ttft"]) / max(1, r["tokens"] - 1)
        rows = [load_level(base, c, r, max_tokens, step_s, seed=c) for c, r in levels]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"\n{name} ({precision}), max_tokens ~{max_tokens} (x0.5-1.5), greedy, ignore_eos")
    print(f"{'clients':>8} {'tokens/s':>10} {'vs 1':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8}")
    one = rows[0]
    for row in rows:
        print(f"{row['clients']:>8} {row['tokens_per_s']:>10.1f} {row['tokens_per_s'] / one['tokens_per_s']:>5.2f}x "
              f"{pct(row['ttft'], 50) * 1e3:>7.0f}ms {pct(row['ttft'], 95) * 1e3:>7.0f}ms "
              f"{pct(row['itl'], 50) * 1e3:>6.1f}ms {pct(row['itl'], 95) * 1e3:>6.1f}ms")
    eight = next((r for r in rows if r["clients"] == 8), rows[-1])
    print(f"{eight['clients']} clients: aggregate {eight['tokens_per_s'] / one['tokens_per_s']:.2f}x the 1-client "
          f"tokens/s (target >= 4x); p95 TTFT {pct(eight['ttft'], 95) / pct(one['ttft'], 95):.2f}x the 1-client one "
          f"(target < 2x)")
    print(f"single stream: served {served:.1f} tokens/s, scratchllm generate {gen:.1f} tokens/s: overhead vs "
          f"scratchllm generate {(1 - served / gen) * 100:+.1f}% (target < 10%)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 and 4 clients, a few tokens: a smoke run")
    ap.add_argument("--precision", choices=["fp32", "bf16"], help="default: what precision=auto picks here")
    ap.add_argument("--skip-smollm2", action="store_true", help="time the tiny preset only")
    args = ap.parse_args(argv)
    precision = args.precision or select_precision("auto", "cpu")
    if args.precision is None and bf16_reason("cpu"):
        print_skipped({"bf16": bf16_reason("cpu")}, "--precision bf16")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_model(Path(tmp))
        if args.quick:
            bench_model("tiny preset", tiny, precision, [(1, 2), (4, 1)], 8, 1)
            return
        levels = [(1, 4), (8, 3), (32, 2)]
        bench_model("tiny preset", tiny, precision, levels, 48, 3)
    if args.skip_smollm2:
        return
    try:
        from scratchllm.weights.checkpoint import resolve_model_dir

        resolve_model_dir("smollm2-135m-instruct")
    except ScratchError as e:
        print(f"\nskipped SmolLM2-135M: {e}")
        return
    bench_model("SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)", "smollm2-135m-instruct", precision, levels, 64, 3)


if __name__ == "__main__":
    main()
