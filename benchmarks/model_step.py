"""Training-step throughput of the model: ours (fused chunked loss) vs ours (plain lm_head +
F.cross_entropy) vs transformers' GPT2LMHeadModel, same shapes and weights, in one run.

What it measures: tokens/s of forward + backward (no optimizer step) for a GPT-2-vocabulary model, in
fp32 and under bf16 autocast, best of `--repeats` interleaved runs (the machine is shared; wall time
and, more stable under load, CPU time of the process, on one thread by default), and the
bytes autograd saves for backward (where the fused loss saves the logits). It also checks that the
three losses agree. bf16 is timed only where `precision=auto` would pick it (or when asked:
`--precision fp32 bf16`); a skipped precision is printed with the reason. What it does not do: time
the optimizer, data loading or torch.compile (that is the trainer's benchmark).

    python benchmarks/model_step.py            # 6 x 384 model, vocab 50257, batch 8 x 256
    python benchmarks/model_step.py --quick    # tiny shapes, a few seconds
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _precision import choose_settings, print_skipped

from scratchllm.model import GPT, ModelConfig
from scratchllm.weights.hf import config_to_hf, state_dict_to_hf


def hf_model(ours: GPT):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(ours.config)))
    hf.load_state_dict(state_dict_to_hf(ours), strict=False)
    hf.tie_weights()
    return hf.train()


def saved_bytes(step) -> int:
    """Bytes of the non-parameter tensors autograd keeps for backward during step()."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(seen.values())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: with CPU time it gives stable numbers on a shared box)")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                    help="precisions to time (default: fp32, plus bf16 where precision=auto picks it)")
    args = ap.parse_args(argv)
    precisions, skipped = choose_settings(args.precision or ["fp32", "bf16"], "cpu", args.precision is not None)
    torch.set_num_threads(args.threads)
    L, H, D, B, T = (2, 2, 64, 2, 64) if args.quick else (6, 6, 384, 8, 256)
    torch.manual_seed(0)
    cfg = ModelConfig(block_size=T, vocab_size=50257, n_layer=L, n_head=H, n_embd=D)
    ours = GPT(cfg).train()
    hf = hf_model(ours)
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    print(f"model {L} x {D}, vocab {cfg.vocab_size}, batch {B} x {T}, threads {torch.get_num_threads()}")
    print_skipped(skipped, "--precision fp32 bf16")

    def fused(backward=True):
        _, loss = ours(idx, targets=idx)
        return loss.backward() if backward else loss

    def plain(backward=True):
        logits = ours.lm_head(ours.hidden_states(idx))  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, cfg.vocab_size), idx.view(-1))
        return loss.backward() if backward else loss

    def hf_step(backward=True):
        loss = hf(idx, labels=idx).loss  # HF shifts labels itself: compare timings, not values
        return loss.backward() if backward else loss

    steps = {"ours (fused loss)": fused, "ours (plain CE)": plain, "HF GPT2LMHeadModel": hf_step}
    with torch.no_grad():
        assert abs(fused(False).item() - plain(False).item()) < 1e-4
    for name, step in steps.items():
        print(f"  {name:20s} saves {saved_bytes(step) / 2**20:8.1f} MiB for backward (fp32)")
    for precision in precisions:
        wall = {name: [] for name in steps}
        cpu = {name: [] for name in steps}
        for _ in range(args.repeats + 1):  # the first round warms up and is dropped
            for name, step in steps.items():
                ours.zero_grad(set_to_none=True)
                hf.zero_grad(set_to_none=True)
                t, c = time.perf_counter(), time.process_time()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = step(backward=False)
                loss.backward()
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
        ref_wall, ref_cpu = min(wall["HF GPT2LMHeadModel"][1:]), min(cpu["HF GPT2LMHeadModel"][1:])
        for name in steps:
            w, c = min(wall[name][1:]), min(cpu[name][1:])
            print(f"{precision}  {name:20s} wall {B * T / w:7,.0f} tokens/s ({ref_wall / w:.2f}x HF)   "
                  f"CPU time {B * T / c:7,.0f} tokens/CPU-s ({ref_cpu / c:.2f}x HF)")


if __name__ == "__main__":
    main()
