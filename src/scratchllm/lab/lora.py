"""Claim 10: LoRA trains a small fraction of the parameters, so the optimizer's state shrinks by the
same factor, and reaches an accuracy close to full fine-tuning.

Measures: SmolLM2-135M-Instruct as a spam classifier (the classification stage, `--train lora` at
ranks 4, 8, 16 and 64, alpha = rank, and `--train all`), on the same balanced SMS subset, split and
steps: trainable parameters and AdamW's state bytes (measured after one step), and test accuracy.
"""

from __future__ import annotations

from pathlib import Path

from scratchllm.lab.core import Result
from scratchllm.lab.finetune import backbone, classify_run, spam_subset, trainable_and_optimizer_bytes

NAME = "lora"
CLAIM = ("LoRA trains a small fraction of the parameters (and needs that fraction of optimizer memory) "
         "at an accuracy close to full fine-tuning.")


def run(quick: bool, out: Path) -> Result:
    per_class, epochs = (40, 1) if quick else (250, 1)  # full: 5 runs of SmolLM2 in under 10 minutes
    ranks = [4, 16] if quick else [4, 8, 16, 64]
    data = spam_subset(out, per_class)
    model = backbone(out, data, quick)
    rows = []
    for name, mode, rank, lr in [*((f"lora r={r}", "lora", r, 5e-4) for r in ranks), ("full", "all", 0, 5e-5)]:
        test = classify_run(model, data, out / "runs" / name.replace(" ", "").replace("=", ""), mode, lora_rank=rank or 16,
                            epochs=epochs, lr=lr)
        n, state = trainable_and_optimizer_bytes(model, mode, rank or 16)
        rows.append({"setting": name, "lr": lr, "trainable params": n, "AdamW state MiB": state / 2**20,
                     "test accuracy": test["accuracy"]})
    full = rows[-1]
    best_lora = max(rows[:-1], key=lambda r: r["test accuracy"])
    small = max(r["trainable params"] for r in rows[:-1]) < full["trainable params"] / 5
    close = best_lora["test accuracy"] >= full["test accuracy"] - 0.03
    verdict = "holds" if small and close else "depends"
    why = (f"LoRA at rank {ranks[0]}..{ranks[-1]} trains {rows[0]['trainable params']:,}..{rows[-2]['trainable params']:,} "
           f"parameters against {full['trainable params']:,} (AdamW state {rows[0]['AdamW state MiB']:.1f}.."
           f"{rows[-2]['AdamW state MiB']:.1f} MiB vs {full['AdamW state MiB']:.0f} MiB); best LoRA test accuracy "
           f"{best_lora['test accuracy']:.1%} ({best_lora['setting']}) vs full {full['test accuracy']:.1%}, on "
           f"{2 * per_class} texts, {epochs} epoch(s).")

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        names = [r["setting"] for r in rows]
        ax1.bar(names, [r["AdamW state MiB"] for r in rows])
        ax1.set_yscale("log")
        ax1.set_ylabel("AdamW state (MiB)")
        ax2.bar(names, [r["test accuracy"] for r in rows])
        ax2.set_ylim(0.5, 1.0)
        ax2.set_ylabel("test accuracy")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelrotation=30)

    return Result(NAME, CLAIM, {"model": "a random 2x32 GPT (quick: the numbers mean nothing)" if quick else model, "data": f"data:sms-spam, {per_class} per class",
                                "split": "0.7/0.1/0.2", "epochs": epochs, "max length": 48, "seed": 0}, rows,
                  verdict, why, plot)
