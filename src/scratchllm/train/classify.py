"""`scratchllm classify train|eval|predict`: fine-tune a pretrained LM into a text classifier (the book's
chapter 6, with its appendix E's LoRA as one option), on the shared Trainer.

What it does: reads labelled texts (data/labelled.py), optionally balances them, splits them into
train/val/test by seed (or takes --val-data/--test-data), maps the labels to ids in sorted order
(RUN_DIR/labels.json) and keeps the held-out test split (RUN_DIR/test.jsonl). It puts a new
`Linear(n_embd, num_classes)` head on the backbone's hidden state at the last real token (or the mean:
model/heads.py), freezes what `--train` leaves out (head | last-block | all | lora) and trains with
cross-entropy (train/objectives.classification_objective), evaluating loss and accuracy on the
validation set and a same-sized fixed sample of the training set at each epoch's end (or every
--eval-every steps), keeping RUN_DIR/best/ by validation accuracy, stopping early with --patience.
A run that trains part of the model saves only those tensors (plus the base's fingerprint). At the
end it evaluates RUN_DIR/best/ on the test split: test_metrics.json, confusion.png, curves.png (loss
and accuracy, training vs validation, against epochs) and a test section in report.md.
`classify eval` and `classify predict` load a run through infer/classifier.Classifier.
What it does not do: the loop (core.py), the metrics (eval/classification.py) or file parsing.

    scratchllm classify train --model smollm2-135m-instruct --data data:sms-spam --balance --out runs/spam
    scratchllm classify eval --model runs/spam --errors 5
    scratchllm classify predict --model runs/spam "You won a prize! Call now"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scratchllm.common import ScratchError, atomic_write_text, print0
from scratchllm.configs import ClassifyConfig
from scratchllm.train import stage

FLAGS = {k: k for k in ("model", "data", "val_data", "test_data", "text_field", "label_field", "balance", "split",
                        "max_length", "truncate", "pool", "train_blocks", "lora_rank", "lora_alpha",
                        "lora_dropout", "lora_targets", "out")} | {"trainable": "trainable"}
LABELS_FILE, TEST_FILE = "labels.json", "test.jsonl"


def load_splits(cfg: ClassifyConfig):
    """(train, val, test) lists of data.labelled.Example and the sorted label names."""
    from scratchllm.data import labelled

    def read(spec):
        return labelled.read_labelled(spec, cfg.text_field, cfg.label_field)

    if cfg.val_data:
        train = read(cfg.data)
        val, test = read(cfg.val_data), read(cfg.test_data)
        labels = labelled.label_names(train)  # the training file defines the classes
        if cfg.balance:
            train = labelled.balance(train, cfg.train.seed)
    else:
        examples = read(cfg.data)
        labels = labelled.label_names(examples)  # one class only, too many classes: said before splitting
        if cfg.balance:
            examples = labelled.balance(examples, cfg.train.seed)
        train, val, test = labelled.split(examples, tuple(cfg.split), seed=cfg.train.seed)
    labelled.check_splits(train, val, test, labels)  # a class the training split lacks, one only val/test hold
    return train, val, test, labels


def write_run_files(out: Path, labels: list[str], test) -> None:
    """labels.json (id order) and test.jsonl (the held-out split `classify eval` uses by default);
    a resumed run must find the same labels."""
    path = out / LABELS_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != labels:
            raise ScratchError(f"{path} holds labels {saved}, the data now gives {labels}: resume with the same data")
    atomic_write_text(path, json.dumps(labels, ensure_ascii=False) + "\n")
    atomic_write_text(out / TEST_FILE, "".join(json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False)
                                               + "\n" for e in test))


class Encoded:
    """Token rows + label ids of one split, and `collate(indices) -> batch dict` for the objective."""

    def __init__(self, examples, labels: list[str], tokenizer, max_length: int, truncate: str, pad_id: int):
        from scratchllm.infer.classifier import cut_rows

        ids = {name: i for i, name in enumerate(labels)}
        full = [tokenizer.encode_ordinary(e.text) for e in examples]
        self.truncated = sum(len(r) > max_length for r in full)
        self.rows = cut_rows(full, max_length, truncate, pad_id)
        self.labels = [ids[e.label] for e in examples]
        self.pad_id, self.side = pad_id, tokenizer.padding_side

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int]) -> dict:
        from scratchllm.data.collate import pad_rows

        idx, mask = pad_rows([self.rows[i] for i in indices], self.pad_id, self.side)
        return {"idx": idx, "attention_mask": mask, "labels": torch.tensor([self.labels[i] for i in indices])}


def classify(cfg: ClassifyConfig, *, resume=None, overwrite: bool = False) -> dict:
    """Fine-tune as configured; returns the Trainer's summary plus "test" (the test-set metrics)."""
    from scratchllm.data.collate import ExampleBatches, in_order
    from scratchllm.infer.classifier import ClassifierSpec, require_pad_id, write_classifier_files
    from scratchllm.model.heads import SequenceClassifier, set_trainable
    from scratchllm.model.lora import count_lora_parameters
    from scratchllm.train.core import Trainer
    from scratchllm.train.objectives import classification_objective
    from scratchllm.weights.checkpoint import load_model

    run = stage.start(cfg, resume=resume, overwrite=overwrite, resume_free=stage.RESUME_FREE)
    tc, out = cfg.train, run.out
    train, val, test, labels = load_splits(cfg)
    backbone, tokenizer = load_model(cfg.model)
    if tokenizer is None:
        raise ScratchError(f"--model {cfg.model} has no tokenizer: give a model folder that holds one")
    pad_id = require_pad_id(tokenizer, cfg.model)
    block = backbone.config.block_size
    max_length = min(cfg.max_length or block, block)
    splits = {name: Encoded(ex, labels, tokenizer, max_length, cfg.truncate, pad_id)
              for name, ex in (("train", train), ("val", val), ("test", test))}
    lora = ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
             "targets": list(cfg.lora_targets)} if cfg.trainable == "lora" else None)
    model = set_trainable(SequenceClassifier(backbone.train(), len(labels), cfg.pool), cfg.trainable,
                          cfg.train_blocks, lora)
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    spec = ClassifierSpec(labels=labels, base=base, pool=cfg.pool, trainable=cfg.trainable,
                          train_blocks=cfg.train_blocks, lora=lora, max_length=max_length, truncate=cfg.truncate)

    tr = splits["train"]
    batches = ExampleBatches(len(tr), tc.batch_size, tr.collate, seed=tc.seed, rank=run.rank, world_size=run.world)
    stage.steps_for_epochs(tc, batches.batches_per_epoch)
    if not tc.eval_every:  # classify's default: evaluate at the end of every epoch
        tc.eval_every = -(-batches.batches_per_epoch // tc.grad_accum)
    va = splits["val"]
    g = torch.Generator().manual_seed(tc.seed)
    sample = sorted(torch.randperm(len(tr), generator=g)[:len(va)].tolist())  # a fixed training sample

    backbone_config = backbone.config.to_dict()

    def write_model(folder: Path, state: dict) -> None:
        write_classifier_files(folder, state, backbone_config, tokenizer, spec)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    info = {"model": cfg.model, "trainable": f"{cfg.trainable}: {trainable:,} of {total:,} parameters"
            + (f" ({count_lora_parameters(model):,} in LoRA adapters, rank {cfg.lora_rank})" if lora else ""),
            "data": f"{cfg.data}: {len(train)} train / {len(val)} val / {len(test)} test examples"
                    + (" (balanced)" if cfg.balance else ""),
            "labels": ", ".join(labels), "max length": f"{max_length} tokens ({cfg.truncate} truncation; "
            f"{tr.truncated} training texts cut)", "pooling": cfg.pool,
            "epochs": f"{tc.epochs} ({tc.max_steps} steps of {tc.batch_size * tc.grad_accum * run.world})"
            if tc.epochs else f"{tc.max_steps} steps"}
    trainer = Trainer(model, tc, classification_objective, batches, out_dir=out,
                      val_batches=lambda: in_order(len(va), tc.batch_size, va.collate),
                      train_eval_batches=lambda: in_order(len(sample), tc.batch_size,
                                                          lambda ix: tr.collate([sample[i] for i in ix])),
                      write_model=write_model, info=info, save="all" if cfg.trainable == "all" else "trainable")
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    stage.write_config(run)  # first: it marks --out as a run folder (a refused run before here left nothing)
    if run.rank == 0:
        write_run_files(out, labels, test)
    print0(f"fine-tuning {cfg.model} as a {len(labels)}-class classifier ({', '.join(labels)}): {info['trainable']}; "
           f"{len(train)} training examples; {trainer.precision} on {trainer.device}; run folder {out}")
    summary = trainer.fit()
    summary["test"] = None
    device, precision = trainer.device, trainer.precision
    del trainer, model, backbone  # the test evaluation loads best/ afresh: do not hold two models
    if not summary["interrupted"] and run.rank == 0:
        summary["test"] = finish_run(out, test, tc.batch_size, batches.batches_per_epoch / tc.grad_accum, device,
                                     precision)
    summary["exit_code"] = stage.finish(summary)
    return summary


def finish_run(out: Path, test, batch_size: int, steps_per_epoch: float, device: str, precision: str) -> dict:
    """Evaluate the best model on the test split; write test_metrics.json, confusion.png, curves.png and
    the test section of report.md."""
    from scratchllm.eval.classification import confusion_table, metrics_table, plot_confusion
    from scratchllm.infer.classifier import Classifier
    from scratchllm.train.runlog import add_report_section, plot_curves, read_metrics

    plot_curves(read_metrics(out / "metrics.jsonl"), out / "curves.png", ("loss", "accuracy"), steps_per_epoch)
    clf = Classifier.load(out, device=device, precision=precision)
    metrics = evaluate(clf, test, batch_size)
    atomic_write_text(out / "test_metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    plot_confusion(metrics["confusion"], metrics["labels"], out / "confusion.png", title="test set")
    report = out / "report.md"
    section = (f"\n## Test set ({clf.folder.name}/, {metrics['n']} examples)\n\n{metrics_table(metrics)}\n\n```\n"
               f"{confusion_table(metrics['confusion'], metrics['labels'])}\n```\n\n![curves](curves.png) "
               "![confusion](confusion.png)\n")
    add_report_section(report, section)
    print0(f"test: accuracy {metrics['accuracy']:.2%}, macro F1 {metrics['macro_f1']:.4f} on {metrics['n']} "
           f"examples ({clf.folder})")
    return metrics


def evaluate(clf, examples, batch_size: int = 16, probs_out: list | None = None) -> dict:
    """classification_metrics of `clf` on examples (labels unknown to the classifier are an error)."""
    from scratchllm.eval.classification import classification_metrics

    ids = {name: i for i, name in enumerate(clf.spec.labels)}
    unknown = sorted({e.label for e in examples} - set(ids))
    if unknown:
        raise ScratchError(f"the data has labels the classifier never learned: {', '.join(unknown)} (it knows "
                           f"{', '.join(clf.spec.labels)})")
    probs = clf.probabilities([e.text for e in examples], batch_size)
    if probs_out is not None:
        probs_out.append(probs)
    return classification_metrics([ids[e.label] for e in examples], probs.argmax(-1).tolist(), clf.spec.labels)


# --------------------------------------------------------------------------------------------- commands
def run(args) -> int:
    """`scratchllm classify train ...`."""
    cfg = stage.config_from_args(ClassifyConfig, args, FLAGS)
    summary = classify(cfg, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
    if summary["interrupted"]:
        return summary["exit_code"]
    val = summary["val"] or {}
    print0(f"done: step {summary['step']}" + (f", val accuracy {val['accuracy']:.2%}" if "accuracy" in val else "")
           + f"; outputs in {cfg.out}")
    return summary["exit_code"]


def _test_examples(clf, data: str | None, text_field: str, label_field: str):
    from scratchllm.data import labelled

    if data:
        return labelled.read_labelled(data, text_field, label_field), data
    for folder in (clf.folder, clf.folder.parent):
        if (folder / TEST_FILE).is_file():
            return labelled.read_labelled(str(folder / TEST_FILE)), str(folder / TEST_FILE)
    raise ScratchError(f"{clf.folder} has no {TEST_FILE} beside it (a merged or copied classifier): pass --data FILE")


def run_eval(args) -> int:
    """`scratchllm classify eval --model RUN [--data FILE] [--errors N] [--json]`."""
    from scratchllm.eval.classification import (
        confusion_table,
        metrics_table,
        most_confident_errors,
        plot_confusion,
    )
    from scratchllm.infer.classifier import Classifier

    clf = Classifier.load(args.model, precision=args.precision)
    examples, source = _test_examples(clf, args.data, args.text_field, args.label_field)
    probs: list = []
    metrics = evaluate(clf, examples, args.batch_size, probs)
    beside = Path(args.model) if Path(args.model).is_dir() else clf.folder  # the run (or merged) folder
    png = Path(args.png) if args.png else beside / ("confusion-eval.png" if args.data is None else
                                                   f"confusion-{Path(args.data).stem}.png")
    plot_confusion(metrics["confusion"], metrics["labels"], png, title=Path(source).name)
    if args.json:
        print(json.dumps({k: metrics[k] for k in ("accuracy", "macro_f1", "per_class", "confusion", "n", "labels")}))
        return 0
    print(f"{source}: {metrics['n']} examples, classifier {clf.folder}\n")
    print(metrics_table(metrics) + "\n")
    print(confusion_table(metrics["confusion"], metrics["labels"]))
    print(f"\nconfusion matrix: {png}")
    if args.errors:
        labels = metrics["labels"]
        worst = most_confident_errors(probs[0], [labels.index(e.label) for e in examples], args.errors)
        print(f"\nthe {len(worst)} most confident mistakes:" if worst else "\nno mistakes")
        for i, pred, p in worst:
            e = examples[i]
            print(f"  {e.where}: predicted {labels[pred]} ({p:.3f}), true {e.label}: {e.text[:100]!r}")
    return 0


def run_predict(args) -> int:
    """`scratchllm classify predict --model RUN "text" ... | --file F`: label, probability, text per line."""
    from scratchllm.infer.classifier import Classifier

    if args.texts and args.file:
        raise ScratchError("give the texts to classify as arguments or --file FILE (one text per line), not both")
    if not args.texts and not args.file:
        raise ScratchError("nothing to classify: give texts as arguments or --file FILE (one text per line)")
    if args.file:
        try:
            texts = [t for t in Path(args.file).read_text(encoding="utf-8").splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ScratchError(f"--file {args.file}: cannot read it as UTF-8 text ({e})") from None
        if not texts:
            raise ScratchError(f"--file {args.file} holds no text (one text per line)")
    else:
        texts = args.texts
    clf = Classifier.load(args.model, precision=args.precision)
    for text, p in zip(texts, clf.predict(texts, args.batch_size)):
        line = f"{p.label}\t{p.probability:.4f}\t{text}"
        print(line, flush=True)
    return 0
