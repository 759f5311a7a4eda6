"""Training throughput: our Trainer's step vs transformers' GPT2LMHeadModel, in the same run.

What it does: measures the matmul ceilings of this device first (square matmuls in each precision used), then
for each model size times full training steps (forward, backward, gradient clipping, AdamW) of ours
(`Trainer.train_step`: fused AdamW, chunked lm_head + cross-entropy) and of Hugging Face's
GPT2LMHeadModel (fused AdamW, same clipping) in every setting asked for (precision x torch.compile),
and prints tokens/s, MFU against the ceiling of the precision used, and ours/HF for the best
setting of each. Sizes: S (6 layers, 6 heads, 384 dims, block 256, vocab 50304, batch 8) and GPT-2
124M (block 256, batch 4). Step time is the median over the timed steps after warm-up (and after
compilation). Each setting runs in a fresh process: in one long process the order of the settings
moved a setting's time by up to 1.5x (allocator and cache state left by the one before).
By default bf16 settings run only where `precision=auto` would pick bf16 (CUDA with bf16, CPUs with
AMX / AVX512-BF16); elsewhere they are printed as skipped, with the reason, unless named in
`--settings`. What it does not do: data loading (synthetic batches) or evaluation.

    python benchmarks/train.py --quick                         # S only, a few steps, fp32 (+ bf16)
    python benchmarks/train.py --sizes s gpt2 --settings fp32 bf16 bf16+compile   # bf16 even if emulated
    python benchmarks/train.py --device cuda --sizes gpt2-1024  # GPU: GPT-2 124M at block 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _precision import choose_settings, print_skipped  # noqa: E402  (benchmarks/_precision.py)

from scratchllm.configs import TrainConfig  # noqa: E402
from scratchllm.model import GPT, ModelConfig  # noqa: E402
from scratchllm.train.core import Trainer  # noqa: E402
from scratchllm.train.flops import gpt_train_flops_per_token, matmul_peak_flops  # noqa: E402
from scratchllm.train.objectives import next_token_objective  # noqa: E402

SIZES = {  # name -> (ModelConfig fields, batch size)
    "s": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=50304), 8),
    "gpt2": (dict(n_layer=12, n_head=12, n_embd=768, block_size=256, vocab_size=50304), 4),
    "gpt2-1024": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304), 8),
}


class RandomBatches:
    def __init__(self, B, T, V, device):
        g = torch.Generator().manual_seed(0)
        self.batches = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(4)]
        self.k, self.device = 0, device

    def next_batch(self):
        seq = self.batches[self.k % len(self.batches)].to(self.device)
        self.k += 1
        return seq[:, :-1], seq[:, 1:]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, device, warmup, steps) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ours(fields, B, precision, compile_, device, warmup, steps) -> float:
    torch.manual_seed(0)
    model = GPT(ModelConfig(**fields))
    cfg = TrainConfig(max_steps=10**6, batch_size=B, lr=1e-4, min_lr=1e-5, warmup_steps=0, precision=precision,
                      compile="on" if compile_ else "off", device=device, eval_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, cfg, next_token_objective, RandomBatches(B, fields["block_size"],
                                                                          fields["vocab_size"], device), out_dir=tmp)
        return time_steps(trainer.train_step, device, warmup, steps)


def hf(fields, B, precision, compile_, device, warmup, steps) -> float:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=fields["n_layer"], n_head=fields["n_head"], n_embd=fields["n_embd"],
                        n_positions=fields["block_size"], vocab_size=fields["vocab_size"], resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fwd = torch.compile(model) if compile_ else model
    batches = RandomBatches(B, fields["block_size"], fields["vocab_size"], device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step():
        x, _ = batches.next_batch()
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = fwd(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return time_steps(step, device, warmup, steps)


def runners_seconds(impl, setting, fields, B, device, warmup, steps) -> float:
    precision, compile_ = setting.split("+")[0], setting.endswith("+compile")
    return {"ours": ours, "hf": hf}[impl](fields, B, precision, compile_, device, warmup, steps)


def in_subprocess(impl, setting, size, args) -> float:
    cmd = [sys.executable, __file__, "--worker", impl, setting, size, "--device", args.device,
           "--warmup", str(args.warmup), "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip())
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["s", "gpt2"], choices=list(SIZES))
    ap.add_argument("--settings", nargs="+",
                    help="precision[+compile] combinations to try for both (best of each is compared); "
                         "default fp32 bf16 bf16+compile, the bf16 ones only where precision=auto picks bf16")
    ap.add_argument("--impls", nargs="+", default=["ours", "hf"], choices=["ours", "hf"])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per setting")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="S only, 3 steps, fp32 and bf16 (no compile) by default")
    ap.add_argument("--in-process", action="store_true",
                    help="run every setting in this process (default: each in a fresh one, so that one "
                         "setting's allocations and compiled code cannot slow or speed up the next)")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "SETTING", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:  # child process: time one setting, print its seconds per step
        impl, setting, size = args.worker
        fields, B = SIZES[size]
        print(json.dumps(runners_seconds(impl, setting, fields, B, args.device, args.warmup, args.steps)))
        return 0
    defaults = ["fp32", "bf16", "bf16+compile"]
    if args.quick:
        args.sizes, args.steps, args.warmup, defaults = ["s"], 3, 1, ["fp32", "bf16"]
    dev = args.device
    settings, skipped = choose_settings(args.settings or defaults, dev, explicit=args.settings is not None)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    used = sorted({s.split("+")[0] for s in settings}, key=list(dtypes).index)
    ceilings = {p: matmul_peak_flops(dev, dtypes[p], n=None, repeats=5) for p in used}
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print_skipped(skipped, "--settings {setting}")
    print("matmul ceilings: " + ", ".join(f"{p} {c / 1e9:,.0f} GFLOP/s" for p, c in ceilings.items()))
    for size in args.sizes:
        fields, B = SIZES[size]
        T = fields["block_size"]
        flops = gpt_train_flops_per_token(ModelConfig(**fields))
        print(f"\n== {size}: {fields}, batch {B} ({B * T} tokens/step), {flops / 1e6:,.0f} MFLOP/token")
        best = {}
        for impl in args.impls:
            for setting in settings:
                precision = setting.split("+")[0]
                try:
                    if args.in_process:
                        dt = runners_seconds(impl, setting, fields, B, dev, args.warmup, args.steps)
                    else:
                        dt = in_subprocess(impl, setting, size, args)
                except Exception as e:  # a setting this machine cannot run: report it, keep going
                    print(f"{impl:5s} {setting:14s} failed: {type(e).__name__}: {str(e)[-300:]}")
                    continue
                tps = B * T / dt
                mfu = tps * flops / ceilings[precision]
                print(f"{impl:5s} {setting:14s} {dt * 1e3:8.1f} ms/step {tps:9,.0f} tokens/s  MFU {mfu:6.1%}",
                      flush=True)
                if tps > best.get(impl, (0, ""))[0]:
                    best[impl] = (tps, setting)
        if "ours" in best and "hf" in best:
            (o, os_), (h, hs) = best["ours"], best["hf"]
            print(f"best: ours {o:,.0f} tok/s ({os_}) vs HF {h:,.0f} tok/s ({hs}): {o / h:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
