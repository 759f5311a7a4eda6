"""What a run leaves for people to read: `metrics.jsonl`, `loss.png` and `report.md`.

What it does: `MetricsLog` appends one JSON object per line (train lines carry step, tokens, loss, lr,
grad_norm, tokens_per_s, mfu, elapsed and the objective's metrics; validation lines step, tokens,
split="val" and the objective's metrics) and, on
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


VAL_SKIP = ("step", "tokens", "split", "count")


def val_metric_names(records: list[dict]) -> list[str]:
    """The numeric metrics of the validation lines, loss first (an objective's accuracy, margin, ppl)."""
    names: list[str] = []
    for r in records:
        if r.get("split") == "val":
            names += [k for k, v in r.items() if k not in VAL_SKIP and k not in names
                      and isinstance(v, int | float) and not isinstance(v, bool)]
    return sorted(names, key=lambda k: (k != "loss", k))


def plot_loss(records: list[dict], png: str | Path) -> None:
    """Train loss (light) and validation loss (markers) against tokens seen; a second panel shows the
    other validation metrics (accuracy, margins...) when the objective reports any besides perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["tokens"], r["loss"]) for r in records if r.get("split") == "train" and math.isfinite(r["loss"])]
    val_recs = [r for r in records if r.get("split") == "val"]
    others = [k for k in val_metric_names(records) if k not in ("loss", "ppl")]
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(12 if others else 7, 4), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.8, label="train")
    on_train = [(r["tokens"], r["loss"]) for r in records if r.get("split") == "train_eval"]
    if on_train:
        ax.plot(*zip(*on_train), "s-", ms=4, label="train (eval mode)")
    if val_recs:
        ax.plot([r["tokens"] for r in val_recs], [r["loss"] for r in val_recs], "o-", ms=4, label="validation")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if others:
        ax2 = axes[0][1]
        for k in others:
            pts = [(r["tokens"], r[k]) for r in val_recs if isinstance(r.get(k), int | float)]
            ax2.plot(*zip(*pts), "o-", ms=4, label=f"validation {k}")
        ax2.set_xlabel("tokens seen")
        ax2.grid(alpha=0.3)
        ax2.legend()
    save_png(fig, png)


def save_png(fig, png: str | Path) -> None:
    """Write a matplotlib figure as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())


def write_report(path: str | Path, records: list[dict], info: dict, config_text: str) -> None:
    """report.md: what was trained on what, final metrics, throughput, the plot and the config."""
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
        names = val_metric_names(records)
        final = ", ".join(f"{k} {val[-1][k]:.4f}" for k in names if k in val[-1])
        lines.append(f"- **final validation**: {final}")
        lines += ["", "| step | tokens | " + " | ".join(f"val {k}" for k in names) + " |",
                  "|---:|---:|" + "---:|" * len(names)]
        lines += [f"| {r['step']} | {r['tokens']:,} | " + " | ".join(
            f"{r[k]:.4f}" if isinstance(r.get(k), int | float) else "" for k in names) + " |" for r in val]
    lines += ["", "![loss](loss.png)", "", "## Config", "", "```toml", config_text.rstrip(), "```", ""]
    atomic_write_text(path, "\n".join(lines))


def plot_curves(records: list[dict], png: str | Path, metrics: tuple[str, ...], steps_per_epoch: int) -> None:
    """One panel per metric (the book's chapter 6 figures): its value on training data (eval mode,
    split "train_eval") and on validation data at each evaluation, against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], metrics):
        for split, label, style in (("train_eval", "training", "s-"), ("val", "validation", "o--")):
            pts = [(r["step"] / steps_per_epoch, r[name]) for r in records
                   if r.get("split") == split and isinstance(r.get(name), int | float)]
            if pts:
                ax.plot(*zip(*pts), style, ms=4, label=label)
        ax.set_xlabel("epochs")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    save_png(fig, png)


def add_report_section(report: str | Path, section: str) -> None:
    """Insert a markdown section into report.md before its "## Config" section (or at its end): a
    stage's results after training (test metrics, samples)."""
    report = Path(report)
    text = report.read_text() if report.is_file() else ""
    atomic_write_text(report, text.replace("\n## Config", section + "\n## Config", 1) if "\n## Config" in text
                      else text + section)
