"""Training checkpoints: atomic `RUN_DIR/step_XXXXXXX/` folders, `RUN_DIR/latest`, verification, pruning,
and the RNG state of every generator.

What it does: `save_checkpoint` writes the model files (through the stage's `write_model(folder)`),
`train_state.pt` (optimizer, scaler, step, RNGs, sampler position: plain containers and tensors only,
so it loads with `torch.load(weights_only=True)`) and `meta.json` (step, tokens seen, metrics and the
size + sha256 of every file) into a temp folder renamed into place; only then is `latest` rewritten and
old checkpoints pruned, so a failed write (full disk, Ctrl-C) leaves the previous checkpoint loadable.
`verify_checkpoint` re-hashes every file and names the one that does not match.
What it does not do: decide when to save (the Trainer does) or build models (weights/ does).

    ckpt = save_checkpoint(run, 100, write_model, train_state, {"tokens_seen": 1e6}, keep_last=3)
    meta = verify_checkpoint(resolve_checkpoint(run))        # follows run/latest
    state = load_train_state(ckpt)
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from scratchllm.common import ScratchError, atomic_dir, atomic_write_text
from scratchllm.weights.partial import (  # noqa: F401  (re-exported: the Trainer's partial saves use them)
    base_fingerprint,
    check_base,
    load_partial,
    trainable_state_names,
)
from scratchllm.weights.state import (
    folder_digests,
    listed_files,
    read_latest,
    resolve_latest,
    verify_files,
    write_latest,
)

STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
BEST = "best"  # RUN_DIR/best/: the model files of the best evaluation (not a step folder: never pruned)
_STEP_RE = re.compile(r"^step_(\d{7})$")


def step_name(step: int) -> str:
    """12 -> 'step_0000012'."""
    return f"step_{step:07d}"


def write_meta(folder: Path, meta: dict) -> None:
    """folder/meta.json: `meta` plus the size and sha256 of every file already in the folder."""
    atomic_write_text(folder / META_FILE, json.dumps({**meta, "files": folder_digests(folder)}, indent=2) + "\n")


def save_checkpoint(run_dir: str | Path, step: int, write_model: Callable[[Path], None], train_state: dict,
                    meta: dict, keep_last: int) -> Path:
    """Write RUN_DIR/step_XXXXXXX atomically, then point `latest` at it and keep the newest `keep_last`."""
    run_dir = Path(run_dir)
    final = run_dir / step_name(step)
    remove_temp_folders(run_dir)
    with atomic_dir(final, overwrite=True) as tmp:
        write_model(tmp)
        torch.save(train_state, tmp / STATE_FILE)
        write_meta(tmp, {**meta, "step": step})
    write_latest(run_dir, final.name)
    prune_checkpoints(run_dir, keep_last)
    return final


_TEMP_RE = re.compile(rf"^\.(step_\d{{7}}|{BEST})\.(tmp|old)-")


def remove_temp_folders(run_dir: str | Path) -> list[str]:
    """Delete the half-written `.step_XXXXXXX.tmp-*` / `.best.tmp-*` folders (and `.old-*` ones) that a
    process killed during a save leaves behind; only those names, nothing else. Returns what went."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    gone = [p.name for p in run_dir.iterdir() if p.is_dir() and _TEMP_RE.match(p.name)]
    for name in gone:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    return gone


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete-looking step folders of a run, oldest first (temp folders start with '.')."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    ckpts = list_checkpoints(run_dir)
    latest = read_latest(run_dir)
    for p in ckpts[: max(len(ckpts) - keep_last, 0)]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder (follows its `latest` file)."""
    return resolve_latest(path, META_FILE)


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Check every file listed in meta.json (sizes, then sha256, all re-hashed: no cache on resume);
    return the meta dict. An empty `files` table is refused (state.listed_files)."""
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ScratchError(f"{ckpt / META_FILE}: unreadable checkpoint metadata ({e})") from None
    verify_files(ckpt, listed_files(meta, ckpt / META_FILE), ckpt / META_FILE)
    return meta


def load_train_state(ckpt: str | Path) -> dict:
    try:
        return torch.load(Path(ckpt) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ScratchError(f"{Path(ckpt) / STATE_FILE}: cannot load training state ({e})") from None


# ---------------------------------------------------------------------------------------------
# RNG state of every generator, as weights_only-loadable containers


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
