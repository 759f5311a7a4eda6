"""Partial checkpoints: only what trains (a new head, LoRA adapters, the last blocks), on top of base
weights identified by a fingerprint.

What it does: `trainable_state_names(model)` names what a partial checkpoint keeps (trainable
parameters and buffers); `base_fingerprint(model)` is a sha256 over everything else (name, dtype,
shape, bytes), so a checkpoint can refuse a different base (`check_base`); `load_partial(model,
folder)` checks the folder's files against its meta.json, the fingerprint and the tensor names, then
loads the trained tensors onto `model` (the base with the same trainable structure in place).
What it does not do: decide what trains (model/heads.py, model/lora.py) or write checkpoints (the
Trainer, train/checkpointing.py).

    keep = trainable_state_names(clf)                 # {'head.weight', 'head.bias', ...}
    load_partial(rebuilt_classifier, "runs/spam/best")
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from scratchllm.common import ScratchError, read_json
from scratchllm.weights import state
from scratchllm.weights.folder import META, WEIGHTS


def trainable_state_names(model: torch.nn.Module) -> set[str]:
    """State-dict names a partial checkpoint keeps: trainable parameters and persistent buffers."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    buffers = set(model.state_dict()) - params
    return {n for n, p in model.named_parameters() if p.requires_grad} | buffers


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the name, dtype, shape and bytes of every tensor a partial checkpoint leaves out (the
    frozen base weights), each aliased tensor once. Two models with this fingerprint share a base."""
    keep = trainable_state_names(model)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=False).items()):
        if name in keep:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def check_base(saved: str | None, current: str | None, folder: Path) -> None:
    """Refuse a partial checkpoint whose base weights are not the model's (or a full one in a partial run)."""
    if saved == current:
        return
    if saved is None:
        raise ScratchError(f"{folder} holds a full model, but this run saves only its trainable parameters "
                           "(a head or adapters): resume it with the same settings it was started with")
    if current is None:
        raise ScratchError(f"{folder} holds only trainable parameters (adapters or a head) trained on base "
                           f"{saved}; load it on top of that base model")
    raise ScratchError(f"{folder} was trained on a different base model: its base fingerprint is {saved}, the "
                       f"base given now is {current}. Use the base model the run was started from")


def load_partial(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """Load a partial checkpoint (or a run folder's latest / best one) onto `model`, the base with the
    same trainable parts (head, adapters) in place: checks every file, the base fingerprint and that the
    folder holds exactly the model's trainable tensors. Returns the model, now one trained model."""
    folder = state.resolve_latest(folder, META)
    meta_path = folder / META
    meta = read_json(meta_path)
    state.verify_files(folder, state.listed_files(meta, meta_path), meta_path)
    check_base(meta.get("base_fingerprint"), base_fingerprint(model), folder)
    state.load_state_dict_checked(model, state.read_safetensors(folder / WEIGHTS), str(folder / WEIGHTS),
                                  expected=trainable_state_names(model))
    return model
