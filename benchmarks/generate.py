"""Decode throughput: our Engine against transformers' GPT2LMHeadModel.generate, in the same run.

What it measures: batch 1, GPT-2 124M shape with random weights (the same weights in both models),
a 32-token prompt, greedy decoding of 200 new tokens, in fp32 and in bf16 where `precision=auto`
would pick it (or when asked: `--precision fp32 bf16`); a skipped precision is printed with the
reason. "ours" is the Engine's default (oneDNN-packed weights in bf16 where oneDNN has bf16
kernels, plain in fp32); the other packing is timed beside it. The
decode time per token is (time for 200 new tokens - time for 1 new token) / 199, so the prefill is
left out; each setting is timed `--repeats` times and the best run counts (the machine is shared).
Both sides use their KV cache.
It also checks that both produce the same tokens in fp32 (they run the same weights).
When bf16 is timed, it then measures the memory read bandwidth and prints the bf16 floor it implies
(the bytes of the weights read once per token).
What it does not do: measure quality, or prefill speed for long prompts.

    python benchmarks/generate.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/generate.py --quick    # smoke run: tiny shapes, a few seconds
    python benchmarks/generate.py --precision fp32 bf16   # bf16 even where it is emulated (slow)
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _precision import choose_settings, print_skipped

from scratchllm.infer.engine import Engine
from scratchllm.infer.packed import can_pack
from scratchllm.model import GPT, ModelConfig
from scratchllm.weights.hf import config_to_hf, state_dict_to_hf


def hf_model(ours: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(ours.config)))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours), strict=False)
    assert not unexpected and all("lm_head" in k or k.endswith("attn.bias") for k in missing), (missing, unexpected)
    hf.tie_weights()
    return hf.eval()


def run_ours(engine: Engine, prompt: list[int], n: int) -> list[int]:
    return list(engine.generate(prompt, n, temperature=0))


def run_hf(model, prompt: list[int], n: int) -> list[int]:
    idx = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ms_per_token(run, model, prompt, n, repeats) -> float:
    run(model, prompt, 2)  # warm-up
    t_n = best_time(lambda: run(model, prompt, n), repeats)
    t_1 = best_time(lambda: run(model, prompt, 1), repeats)
    return (t_n - t_1) / (n - 1) * 1e3


def read_bandwidth(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Bytes per second that torch's threads can stream from memory (best of a few sums of a big
    bf16 tensor): what bounds decoding, which reads every weight once per token."""
    x = torch.ones(n_bytes // 2, dtype=torch.bfloat16)
    return n_bytes / best_time(x.sum, repeats)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and few tokens: a smoke run")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--precision", "--dtypes", dest="precision", nargs="+", choices=["fp32", "bf16"],
                    help="precisions to time (default: fp32, plus bf16 where precision=auto picks it)")
    args = ap.parse_args(argv)
    precisions, skipped = choose_settings(args.precision or ["fp32", "bf16"], "cpu", args.precision is not None)
    preset, n, repeats = ("tiny", 20, 1) if args.quick else ("gpt2", args.new_tokens, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset(preset)).eval()
    hf = hf_model(model)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt_tokens,)).tolist()
    print(f"model {preset} ({model.num_params() / 1e6:.1f}M params), prompt {len(prompt)} tokens, {n} new tokens, "
          f"greedy, batch 1, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print_skipped(skipped, "--precision fp32 bf16")

    same = run_ours(Engine(model), prompt, n) == run_hf(hf, prompt, n)
    print(f"fp32 tokens identical to transformers: {same}")
    results = {}
    for name in precisions:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        model, hf = model.to(dtype), hf.to(dtype)
        ours = Engine(model)  # its default: oneDNN-packed weights for bf16, plain for fp32
        packed = ours.runner is not ours.model
        settings = {"ours": ours}
        if packed or can_pack(model):  # the other packing, where this torch build has oneDNN
            settings["ours-unpacked" if packed else "ours-packed"] = Engine(model, pack=not packed)
        settings["transformers"] = hf
        for who, target in settings.items():
            run = run_hf if who == "transformers" else run_ours
            results[(who, name)] = ms_per_token(run, target, prompt, n, repeats)
        hf_ms = results[("transformers", name)]
        print(f"{name}: " + "   ".join(f"{who} {results[(who, name)]:7.2f} ms/token" for who in settings)
              + f"   speedup {hf_ms / results[('ours', name)]:.2f}x")
    best_hf = min(v for (who, _), v in results.items() if who == "transformers")
    best_ours = min(v for (who, _), v in results.items() if who == "ours")
    print(f"best: ours {best_ours:.2f} ms/token ({1e3 / best_ours:.1f} tok/s), transformers {best_hf:.2f} ms/token "
          f"({1e3 / best_hf:.1f} tok/s): {best_hf / best_ours:.2f}x (target >= 2x)")
    if "bf16" in precisions:
        gbps = read_bandwidth()
        floor = model.num_params() * 2 / gbps * 1e3  # every bf16 weight is read once per token
        print(f"bf16 floor on this machine: {model.num_params() * 2 / 1e6:.0f} MB of weights / {gbps / 1e9:.1f} "
              f"GB/s measured read bandwidth = {floor:.1f} ms/token; ours is {results[('ours', 'bf16')] / floor:.2f}x "
              f"the floor (2x transformers' best would be {best_hf / 2:.1f} ms/token)")
    if not same:
        raise SystemExit("error: our greedy tokens differ from transformers' in fp32")


if __name__ == "__main__":
    main()
