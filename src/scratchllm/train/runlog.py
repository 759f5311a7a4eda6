"""What a run leaves for people to read: `metrics.jsonl`, `loss.png` and `report.md`.

What it does: `MetricsLog` appends one JSON object per line (train lines carry step, tokens, loss, lr,
grad_norm, tokens_per_s, mfu, elapsed; validation lines step, tokens, split="val", loss, ppl) and, on
resume, first drops the lines written after the checkpoint being resumed, so the file reads as one
uninterrupted run. `plot_loss` draws train and validation loss against tokens seen (matplotlib, Agg
backend, written atomically); `write_report` writes report.md.
What it does not do: print progress (the Trainer does) or decide what to log.

    log = MetricsLog(run / "metrics.jsonl", resume_step=None)
    log.write({"step": 1, "loss": 10.2, "tokens_per_s": 3000.0})
    plot_loss(read_metrics(run / "metrics.jsonl"), run / "loss.png")
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from scratchllm.common import atomic_write_bytes, atomic_write_text, format_seconds


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by SIGKILL
            break
    return out


class MetricsLog:
    """Append-only JSON-lines log; `resume_step` keeps only lines with step <= resume_step."""

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step is not None else []
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_loss(records: list[dict], png: str | Path) -> None:
    """Train loss (light) and validation loss (markers) against tokens seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if r.get("split") == "train" and math.isfinite(r["loss"])]
    val = [(r["tokens"], r["loss"]) for r in records if r.get("split") == "val"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def write_report(path: str | Path, records: list[dict], info: dict, config_text: str) -> None:
    """report.md: what was trained on what, final losses, throughput, the plot and the config."""
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    lines = ["# Training report", ""]
    lines += [f"- **{k}**: {v}" for k, v in info.items()]
    if train:
        last = train[-1]
        speeds = sorted(r["tokens_per_s"] for r in train[len(train) // 10:] if r.get("tokens_per_s"))
        lines += [
            f"- **steps**: {last['step']}, **tokens seen**: {last['tokens']:,}",
            f"- **final train loss**: {last['loss']:.4f} (first logged: {train[0]['loss']:.4f})",
            f"- **throughput**: median {speeds[len(speeds) // 2]:,.0f} tokens/s" if speeds else "- **throughput**: n/a",
            f"- **wall time**: {format_seconds(last.get('elapsed', 0.0))}",
        ]
        mfus = [r["mfu"] for r in train if r.get("mfu")]
        if mfus:
            lines.append(f"- **MFU**: median {sorted(mfus)[len(mfus) // 2]:.1%}")
    if val:
        lines.append(f"- **final validation loss**: {val[-1]['loss']:.4f} (perplexity {val[-1]['ppl']:.2f})")
        lines += ["", "| step | tokens | val loss | perplexity |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['tokens']:,} | {r['loss']:.4f} | {r['ppl']:.2f} |" for r in val]
    lines += ["", "![loss](loss.png)", "", "## Config", "", "```toml", config_text.rstrip(), "```", ""]
    atomic_write_text(path, "\n".join(lines))
