"""What every training stage repeats before and after `Trainer.fit()`, written once.

What it does: `config_from_args` resolves a stage's typed config with the precedence defaults < the
saved config of the run being resumed < --config TOML < flags (the Trainer's flags map onto
`TrainConfig` fields by name: `--max-steps` -> `train.max_steps`). `start` checks the output folder
(`--overwrite` replaces only an empty folder or one of our runs; `--resume` continues one), checks that
a resumed run's config changed only in fields that do not change the math of a step (and lists the
ones that did), starts the process group under torchrun and seeds every RNG. `write_config` writes the
resolved `config.toml`; `finish` tears the process group down and turns the Trainer's summary into
the command's exit code (0 for a finished or early-stopped run, 128 + the signal for one stopped by
a signal: 130 after Ctrl-C, 143 after SIGTERM).
What it does not do: build models, data or objectives (each stage does), or train (core.py).

    run = stage.start(cfg, resume=resume, overwrite=overwrite, resume_free=RESUME_FREE)
    ... build model, batches, Trainer(..., out_dir=run.out); trainer.resume(run.resume_from) ...
    stage.write_config(run)
    summary = trainer.fit()
    return stage.finish(summary)
"""

from __future__ import annotations

import dataclasses
import signal
import tomllib
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from scratchllm.common import (
    ScratchError,
    atomic_write_text,
    clear_for_overwrite,
    holds_marker,
    print0,
    seed_everything,
    some_entries,
)
from scratchllm.configs import TrainConfig, diff, resolve, to_dict, to_toml
from scratchllm.train import checkpointing as ckpt
from scratchllm.train.core import init_distributed
from scratchllm.weights.state import LATEST

# TrainConfig fields that may change when a run is resumed: they do not change the math of a step
TRAIN_RESUME_FREE = {f"train.{k}" for k in (
    "max_steps", "epochs", "eval_every", "eval_batches", "sample_every", "sample_prompt", "sample_tokens",
    "checkpoint_every", "keep_last", "log_every", "max_bad_steps", "compile", "device", "patience")}
RESUME_FREE = {"out"} | TRAIN_RESUME_FREE
# what marks a folder as one of our runs (glob patterns of entry names): its files or a checkpoint folder
RUN_MARKERS = ("config.toml", "metrics.jsonl", LATEST, "step_" + "[0-9]" * 7)


def train_overrides(args) -> dict:
    """The Trainer's flags given on the command line, as dotted TrainConfig fields (None = not given)."""
    out = {f"train.{f.name}": getattr(args, f.name, None) for f in dataclasses.fields(TrainConfig)}
    if isinstance(out["train.compile"], bool):  # --compile / --no-compile
        out["train.compile"] = "on" if out["train.compile"] else "off"
    if out["train.max_steps"] is not None and out["train.epochs"] is None:  # --max-steps alone: steps, not epochs
        out["train.epochs"] = 0
    return out


def resume_source(resume, out: str | Path | None) -> Path | None:
    """The checkpoint folder to resume from: `--resume` alone continues --out (None while it has no
    checkpoint yet: the run starts afresh), `--resume PATH` a checkpoint or run folder."""
    if not resume:
        return None
    if resume is True:
        if not out:
            raise ScratchError("--resume needs --out RUN_DIR (or --resume PATH)")
        if not ckpt.list_checkpoints(out):
            return None
        return ckpt.resolve_checkpoint(out)
    return ckpt.resolve_checkpoint(resume)


def saved_config(folder: Path | None) -> dict | None:
    """The config.toml of the run a checkpoint folder belongs to, as a dict (None when there is none)."""
    if folder is None:
        return None
    saved = folder.parent / "config.toml"
    try:
        return tomllib.loads(saved.read_text()) if saved.is_file() else None
    except tomllib.TOMLDecodeError as e:
        raise ScratchError(f"{saved}: invalid TOML ({e}); fix it or start a new run") from None


def config_from_args(cls, args, flags: dict[str, str]):
    """defaults < the resumed run's saved config < --config TOML < flags. `flags` maps the stage's own
    argparse dests to config fields; the Trainer's flags are added by name."""
    overrides = {field: getattr(args, dest, None) for dest, field in flags.items()}
    overrides.update(train_overrides(args))
    base = saved_config(resume_source(getattr(args, "resume", None), getattr(args, "out", None)))
    return resolve(cls, getattr(args, "config", None), overrides, base=base)


def check_resume_config(cfg, saved: dict, saved_toml: Path, resume_free: set[str] = RESUME_FREE) -> None:
    """Refuse to resume when a field that changes the math of a step differs from the saved run."""
    now = to_dict(cfg)
    changed = [f for f in diff(saved, now) if f not in resume_free]
    if not changed:
        return

    def get(d, dotted):
        for part in dotted.split("."):
            d = d.get(part) if isinstance(d, dict) else None
        return d

    details = "; ".join(f"{f}: {get(saved, f)!r} -> {get(now, f)!r}" for f in changed)
    raise ScratchError(f"cannot resume: the config differs from {saved_toml} in {len(changed)} field(s): "
                       f"{details}. Use the same settings, or start a new run (--overwrite / another --out)")


def check_out_dir(out: Path, resume, overwrite: bool) -> None:
    """Refuse a non-empty --out that is not ours to continue. --overwrite replaces only one of our run
    folders (config.toml, metrics.jsonl or checkpoints inside): never a folder of someone's files (the
    shared rule, `common.clear_for_overwrite`)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ScratchError(f"--out {out} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    is_run = holds_marker(entries, RUN_MARKERS)
    if resume and is_run:
        return
    if overwrite:
        clear_for_overwrite(out, RUN_MARKERS, "run folder")
        return
    shown = some_entries(entries)
    if resume:
        raise ScratchError(f"--out {out} holds no run to resume (it holds {shown}): choose another --out")
    raise ScratchError(f"--out {out} holds another run (config.toml): pass --resume to continue that run or "
                       "--overwrite to replace it" if is_run else
                       f"--out {out} is not empty (it holds {shown}): choose another --out")


@dataclass
class Run:
    """What `start` resolved: the config, the output folder, this process's device and rank, and the
    checkpoint to resume from (None for a new run)."""

    cfg: object
    out: Path
    device: str
    rank: int
    world: int
    resume_from: Path | None


def start(cfg, *, resume=None, overwrite: bool = False, resume_free: set[str] = RESUME_FREE) -> Run:
    """Before building anything: resume checks, distributed init, the out-dir check (rank 0), seeding.
    `cfg` has `out` and `train` (a TrainConfig)."""
    out, tc = Path(cfg.out), cfg.train
    resume_from = resume_source(resume, out)
    saved = saved_config(resume_from)
    if saved is not None:
        check_resume_config(cfg, saved, resume_from.parent / "config.toml", resume_free)
    device = init_distributed(tc.device)  # before the rank is read; the Trainer picks the same device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        check_out_dir(out, resume, overwrite)
        if resume is True and resume_from is None:
            print0(f"--resume: no checkpoint in {out} yet, starting a new run")
    if dist.is_initialized():
        dist.barrier()
    seed_everything(tc.seed)  # the same initial weights on every rank (DDP/FSDP rely on it)
    return Run(cfg, out, device, rank, world, resume_from)


def steps_for_epochs(tc: TrainConfig, batches_per_epoch: int) -> None:
    """With train.epochs > 0, set train.max_steps to cover that many passes (micro-batches per epoch
    / grad_accum, rounded up), so the learning-rate schedule spans the epochs."""
    if tc.epochs:
        tc.max_steps = max(1, -(-tc.epochs * batches_per_epoch // tc.grad_accum))


def write_config(run: Run) -> None:
    """RUN_DIR/config.toml: the fully resolved config (rank 0)."""
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "config.toml", to_toml(run.cfg))


def finish(summary: dict) -> int:
    """Tear down the process group (every rank together) and return the exit code of the run."""
    if dist.is_initialized():
        # a rank that exits while another is still writing outputs can abort in gloo's worker threads
        # ("terminate called without an active exception"): wait for all, then destroy
        dist.barrier()
        dist.destroy_process_group()
    if not summary["interrupted"]:
        return 0
    return 128 + (summary.get("signal") or signal.SIGINT)  # what shells expect: 130 for Ctrl-C, 143 for SIGTERM
