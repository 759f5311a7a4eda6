"""Claim 12: for classification fine-tuning, training only the last block (and the head) gets most of
the accuracy of training everything, far cheaper; the head alone is not enough.

Measures: SmolLM2-135M-Instruct as a spam classifier (the classification stage with `--train head`,
`--train last-block` and `--train all`), on the same balanced SMS subset, split and steps: trainable
parameters, training time (the Trainer's clock: model loading and evaluation left out) and test
accuracy.
"""

from __future__ import annotations

from pathlib import Path

from scratchllm.lab.core import Result
from scratchllm.lab.finetune import backbone, classify_run, spam_subset, trainable_and_optimizer_bytes
from scratchllm.train.runlog import read_metrics

NAME = "freezing"
CLAIM = "Training the last block gets most of full fine-tuning's accuracy at a fraction of the cost; the head alone does not."


def run(quick: bool, out: Path) -> Result:
    per_class, epochs = (40, 1) if quick else (250, 1)
    data = spam_subset(out, per_class)
    model = backbone(out, data, quick)
    rows = []
    for mode in ("head", "last-block", "all"):
        test = classify_run(model, data, out / "runs" / mode, mode, epochs=epochs, lr=5e-4 if mode == "head" else 5e-5)
        train = [r for r in read_metrics(out / "runs" / mode / "metrics.jsonl") if r.get("split") == "train"]
        n, _ = trainable_and_optimizer_bytes(model, mode)
        rows.append({"trained": mode, "trainable params": n, "train seconds": train[-1]["elapsed"],
                     "test accuracy": test["accuracy"]})
    head, last, full = rows
    verdict = ("holds" if last["test accuracy"] >= full["test accuracy"] - 0.03 and head["test accuracy"] <
               last["test accuracy"] else "depends")
    why = (f"Test accuracy: head {head['test accuracy']:.1%}, last block {last['test accuracy']:.1%}, all layers "
           f"{full['test accuracy']:.1%}; the last block trains {last['trainable params'] / full['trainable params']:.1%} "
           f"of the parameters and trains in {last['train seconds'] / full['train seconds']:.2f}x the time of "
           f"training all ({2 * per_class} texts, {epochs} epoch(s)).")

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        names = [r["trained"] for r in rows]
        ax1.bar(names, [r["train seconds"] for r in rows])
        ax1.set_ylabel("training seconds (the Trainer's clock)")
        ax2.bar(names, [r["test accuracy"] for r in rows])
        ax2.set_ylim(0.5, 1.0)
        ax2.set_ylabel("test accuracy")

    return Result(NAME, CLAIM, {"model": "a random 2x32 GPT (quick: the numbers mean nothing)" if quick else model, "data": f"data:sms-spam, {per_class} per class",
                                "epochs": epochs, "max length": 48, "seed": 0}, rows, verdict, why, plot)
