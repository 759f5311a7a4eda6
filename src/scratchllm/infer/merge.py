"""`scratchllm merge`: a run that saved only what trained (LoRA adapters, a head, the last blocks) becomes
a standalone model folder.

What it does: for a LoRA run of a language model (`pretrain --lora-rank`; its checkpoints hold
adapter.json) it loads base + adapters merged (weights/checkpoint.open_model) and writes a plain model
folder that export, generate and pretrain take like any other; for a classifier run (classify train,
any --train) it loads the classifier (infer/classifier.py), folds LoRA adapters into their weights and
writes a classifier folder holding every tensor, so `classify eval/predict` load it without the base.
What it does not do: the LoRA math (model/lora.py) or training (train/).

    scratchllm merge --model runs/lora --out merged/ && scratchllm export --model merged/ --out hf/
    scratchllm merge --model runs/spam --out spam-classifier/
"""

from __future__ import annotations

from pathlib import Path

from scratchllm.common import ScratchError, atomic_dir, clear_for_overwrite, print0, read_json

MODEL_MARKERS = ("config.json", "model.safetensors")  # what --overwrite may replace: a model folder


def _merge_classifier(source: str, out: Path, overwrite: bool) -> None:
    from scratchllm.infer.classifier import Classifier, write_classifier_files
    from scratchllm.model.lora import merge_lora
    from scratchllm.train.checkpointing import write_meta
    from scratchllm.weights.state import state_to_save

    clf = Classifier.load(source)
    if clf.spec.lora:
        merge_lora(clf.model.backbone)
    spec = clf.spec
    spec.trainable, spec.lora = "all", None  # the folder now holds every tensor
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_classifier_files(tmp, state_to_save(clf.model), clf.model.backbone.config.to_dict(), clf.tokenizer, spec)
        write_meta(tmp, {"merged_from": str(clf.folder)})
    print0(f"merged classifier {clf.folder} -> {out} (labels {', '.join(spec.labels)}; "
           f"`scratchllm classify predict --model {out} ...`)")


def merge_cmd(args) -> int:
    """`scratchllm merge --model RUN --out DIR [--overwrite]`."""
    from scratchllm.infer.classifier import SPEC_FILE
    from scratchllm.weights.checkpoint import ADAPTER, open_model, resolve_model_dir, save_model

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ScratchError(f"--out {out} exists: choose another folder or pass --overwrite")
    if args.overwrite:  # checked now, replaced only once the merged folder is complete (atomic_dir)
        clear_for_overwrite(out, MODEL_MARKERS, "model folder", delete=False)
    source = Path(args.model)
    if source.is_dir() and ((source / SPEC_FILE).is_file() or (source / "best" / SPEC_FILE).is_file()
                            or (source / "labels.json").is_file()):
        _merge_classifier(args.model, out, args.overwrite)
        return 0
    folder = resolve_model_dir(args.model)
    if not (folder / ADAPTER).is_file():
        raise ScratchError(f"{folder} holds no {ADAPTER}: not a LoRA run, so there is nothing to merge (it "
                           "is already a full model: export or generate take it as it is)")
    loaded = open_model(folder)
    save_model(loaded.model, loaded.tokenizer, out, overwrite=args.overwrite, chat=loaded.chat, extra={"source.json": {
        "merged_from": str(folder), "base": read_json(folder / ADAPTER)["base"]}})
    print0(f"merged {folder} (base + LoRA adapters) -> {out}")
    return 0
