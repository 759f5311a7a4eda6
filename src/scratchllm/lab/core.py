"""What every lab experiment shares: its result, the files it writes, and a small language-model run.

What it does: an experiment (one module of lab/) has NAME, CLAIM and `run(quick, out) -> Result`.
`Result` holds what was measured: the settings (sizes, seeds, steps), a table (rows of dicts), a
verdict ("holds", "does not hold here" or "depends") with one sentence of why, and a `plot(fig)`
that draws the picture on a matplotlib Figure (`loss_curves` makes the common one).
`write(result, out)` writes `result.json`, `result.md` (the claim, the settings, the table, the
verdict) and `result.png`. `train_lm(config, ...)` trains a GPT of the
package on bytes of Python's own documentation (builtin:pydocs, always on the machine) with the
shared Trainer and the pretraining objective, and returns its loss curve, gradient norms and final
validation loss: what the claims about architecture and optimisation compare.
What it does not do: the experiments themselves (one module each) or the command (commands.py).

    r = train_lm(ModelConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64), steps=100,
                 out=tmp / "run")
    r.val_loss, r.losses[:3], r.grad_norms[:3]
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from scratchllm.common import atomic_write_text
from scratchllm.model import GPT, ModelConfig

VERDICTS = ("holds", "does not hold here", "depends")
MARKER = "result.json"


@dataclass
class Result:
    name: str
    claim: str
    settings: dict  # what a rerun needs: sizes, seeds, steps, the machine
    rows: list[dict]  # the table: one dict per measured setting, same keys in each
    verdict: str  # one of VERDICTS
    why: str  # one or two sentences: what the numbers say and, for "depends", on what
    plot: Callable | None = None  # plot(fig) draws the picture on a matplotlib Figure
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r}: expected one of {VERDICTS}")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def _cell(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(result: Result, out: Path) -> None:
    """result.json, result.md and result.png in `out` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"name": result.name, "claim": result.claim, "verdict": result.verdict, "why": result.why,
            "settings": result.settings, "rows": result.rows, "notes": result.notes}
    atomic_write_text(out / MARKER, json.dumps(data, indent=1, default=float) + "\n")
    md = [f"# {result.name}", "", f"**Claim.** {result.claim}", "", f"**Verdict: {result.verdict}.** {result.why}",
          "", markdown_table(result.rows), "![result](result.png)", "", "Settings: " +
          ", ".join(f"{k} = {v}" for k, v in result.settings.items())]
    md += [""] + [f"- {n}" for n in result.notes] if result.notes else []
    atomic_write_text(out / "result.md", "\n".join(md) + "\n")
    if result.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(8, 4.5))
        result.plot(fig)
        fig.suptitle(result.name)
        fig.tight_layout()
        fig.savefig(out / "result.png", dpi=100)
        plt.close(fig)


def loss_curves(curves: dict, ylabel: str = "train loss (nats/byte)") -> Callable:
    """A Result.plot drawing one line per {label: losses per step}."""
    def plot(fig):
        ax = fig.add_subplot(1, 1, 1)
        for label, losses in curves.items():
            ax.plot(losses, label=str(label))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend()

    return plot


# --------------------------------------------------------------------------------------------- a small LM run
_TEXT: np.ndarray | None = None


def corpus_bytes(n: int = 1_500_000) -> np.ndarray:
    """The first n bytes of builtin:pydocs as token ids 0..255 (a byte-level model needs no tokenizer)."""
    global _TEXT
    if _TEXT is None or len(_TEXT) < n:
        from scratchllm.data.sources import pydocs_documents

        text = "\n\n".join(pydocs_documents()).encode("utf-8")[:n]
        _TEXT = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    return _TEXT[:n]


def unigram_entropy(n: int = 1_500_000) -> float:
    """Nats per byte of the corpus's byte frequencies: the loss of a model that learned those and nothing
    else, the line a run must get below to have learned anything about context."""
    counts = np.bincount(corpus_bytes(n), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class RunResult:
    losses: list[float]  # training loss per step
    grad_norms: list[float]  # global gradient norm per step, before clipping
    val_loss: float  # on held-out bytes, after the last step
    params: int
    seconds: float


def byte_config(**overrides) -> ModelConfig:
    """The lab's small byte-level GPT: 2 blocks x 64 wide, 64 bytes of context (overrides change it)."""
    base = dict(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    return ModelConfig(**{**base, **overrides})


def train_lm(config: ModelConfig, *, steps: int, out: Path, lr: float = 3e-3, warmup: int = 10,
             schedule: str = "cosine", grad_clip: float = 1.0, batch_size: int = 16, seed: int = 0,
             precision: str = "fp32", compile: bool = False, data_bytes: int = 1_500_000) -> RunResult:
    """Train `config` from scratch (seeded) on pydocs bytes with the shared Trainer; 5% held out."""
    from scratchllm.configs import TrainConfig
    from scratchllm.data.loaders import RandomWindowSampler, eval_batches
    from scratchllm.train.core import Trainer
    from scratchllm.train.objectives import next_token_objective
    from scratchllm.train.runlog import read_metrics

    data = corpus_bytes(data_bytes)
    cut = int(len(data) * 0.95)
    train, val = data[:cut], data[cut:]
    torch.manual_seed(seed)
    model = GPT(config)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10, warmup_steps=warmup,
                      schedule=schedule, grad_clip=grad_clip, eval_every=0, eval_batches=8, checkpoint_every=0,
                      keep_last=1, precision=precision, compile="on" if compile else "off", device="cpu",
                      seed=seed, best_metric="", max_bad_steps=steps + 1)
    batches = RandomWindowSampler([train], config.block_size, batch_size, seed=seed)
    trainer = Trainer(model, cfg, next_token_objective, batches, out_dir=out,
                      val_batches=lambda: eval_batches([val], config.block_size, batch_size, max_batches=8))
    summary = trainer.fit()
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train"]
    val_loss = summary["val"]["loss"] if summary["val"] else float("nan")
    return RunResult([r["loss"] for r in records], [r["grad_norm"] for r in records], val_loss,
                     model.num_params(), trainer.elapsed)


def replace(config: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(config, **changes)
