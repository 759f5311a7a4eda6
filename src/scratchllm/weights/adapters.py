"""LoRA runs as models: load base + adapters as one model, and `scratchllm merge` them into a folder.

What it does: a checkpoint of a LoRA run of a language model (`pretrain --lora-rank R`, later SFT)
holds only the adapters, `adapter.json` ({"base": the --model it started from, "lora": rank, alpha,
dropout, targets}), config.json, tokenizer/ and a meta.json with the base's fingerprint.
`load_adapter_model(folder)` rebuilds the base (anything `--model` accepts), swaps the same adapters
in, loads them (train/checkpointing.load_partial checks files and fingerprint) and merges them, so
`--model RUN` anywhere gives the fine-tuned model. `merge_cmd` writes that merged model as a plain
model folder (export, generate and pretrain take it like any other); for a classifier run (LoRA or
any partial run) it writes a standalone classifier folder that `classify eval/predict` loads without
the base.
What it does not do: the LoRA math (model/lora.py) or training (train/).

    loaded = open_model("runs/lora")                     # base + adapters, merged (checkpoint.py)
    scratchllm merge --model runs/lora --out merged/ && scratchllm export --model merged/ --out hf/
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from scratchllm.common import ScratchError, atomic_dir, clear_for_overwrite, print0, read_json

ADAPTER_FILE = "adapter.json"
MODEL_MARKERS = ("config.json", "model.safetensors")  # what --overwrite may replace: a model folder


def write_adapter_files(folder: Path, state: dict, base: str, lora: dict, model_config, tokenizer) -> None:
    """A LoRA checkpoint's model files: the adapters (`state`), adapter.json, config.json, tokenizer/."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / ADAPTER_FILE).write_text(json.dumps({"base": base, "lora": lora}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer")


def load_adapter_model(folder: Path, device="cpu"):
    """checkpoint.LoadedModel of base + the folder's adapters, merged into plain Linear weights."""
    from scratchllm.model.lora import apply_lora, merge_lora
    from scratchllm.train.checkpointing import load_partial
    from scratchllm.weights.checkpoint import LoadedModel, open_model

    path = Path(folder) / ADAPTER_FILE
    spec = read_json(path)
    lora = spec.get("lora") if isinstance(spec, dict) else None
    if not isinstance(spec.get("base"), str) or not isinstance(lora, dict) or not {"rank", "alpha", "targets"} <= set(lora):
        raise ScratchError(f"{path}: damaged adapter description (needs base and lora {{rank, alpha, targets}})")
    base = open_model(spec["base"], device=device)
    apply_lora(base.model, lora["rank"], lora["alpha"], lora.get("dropout", 0.0), tuple(lora["targets"]))
    load_partial(base.model, folder)
    model = merge_lora(base.model).eval()
    tokenizer = base.tokenizer
    if (Path(folder) / "tokenizer").is_dir():
        from scratchllm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(Path(folder) / "tokenizer")
    return LoadedModel(model, tokenizer, base.chat, Path(folder))


def _merge_classifier(source: str, out: Path) -> None:
    from scratchllm.infer.classifier import Classifier
    from scratchllm.model.lora import merge_lora
    from scratchllm.train.checkpointing import write_meta
    from scratchllm.weights.state import state_to_save

    clf = Classifier.load(source)
    if clf.spec.lora:
        merge_lora(clf.model.backbone)
    spec = clf.spec
    spec.trainable, spec.lora = "all", None  # the folder now holds every tensor
    with atomic_dir(out) as tmp:
        state = state_to_save(clf.model)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(clf.model.backbone.config.to_dict(), indent=2) + "\n")
        clf.tokenizer.save(tmp / "tokenizer")
        spec.save(tmp)
        write_meta(tmp, {"merged_from": str(clf.folder)})
    print0(f"merged classifier {clf.folder} -> {out} (labels {', '.join(spec.labels)}; "
           f"`scratchllm classify predict --model {out} ...`)")


def merge_cmd(args) -> int:
    """`scratchllm merge --model RUN --out DIR [--overwrite]`."""
    from scratchllm.infer.classifier import SPEC_FILE
    from scratchllm.weights.checkpoint import open_model, resolve_model_dir
    from scratchllm.weights.folder import save_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ScratchError(f"--out {out} exists: choose another folder or pass --overwrite")
    if args.overwrite:
        clear_for_overwrite(out, MODEL_MARKERS, "model folder")
    source = Path(args.model)
    if source.is_dir() and ((source / SPEC_FILE).is_file() or (source / "best" / SPEC_FILE).is_file()
                            or (source / "labels.json").is_file()):
        _merge_classifier(args.model, out)
        return 0
    folder = resolve_model_dir(args.model)
    if not (folder / ADAPTER_FILE).is_file():
        raise ScratchError(f"{folder} holds no {ADAPTER_FILE}: not a LoRA run, so there is nothing to merge (it "
                           "is already a full model: export or generate take it as it is)")
    loaded = open_model(folder)
    save_model(loaded.model, loaded.tokenizer, out, chat=loaded.chat, extra={"source.json": {
        "merged_from": str(folder), "base": read_json(folder / ADAPTER_FILE)["base"]}})
    print0(f"merged {folder} (base + LoRA adapters) -> {out}")
    return 0
