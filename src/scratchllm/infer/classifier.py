"""A trained classifier, loaded back and used: `Classifier.load(RUN).predict(texts)`.

What it does: a classifier folder (a checkpoint of `scratchllm classify train`, its `best/`, or a
`scratchllm merge` output) holds `classifier.json` (the labels, pooling, what trained, LoRA settings,
the base model, max length and truncation side), `tokenizer/`, `config.json` (the backbone's shape),
`model.safetensors` and `meta.json`. A run that trained only part of the model (a head, the last
blocks, adapters) saves only those tensors plus the fingerprint of its base: loading rebuilds the
base model (`--model` as given to training), the same trainable structure, and checks the fingerprint
(weights/partial.load_partial). `Classifier.load` accepts the run folder itself (its `best/`, else
its newest checkpoint). `predict` tokenizes, pads on the tokenizer's side with its pad id, and returns
label + probability per text, in batches.
What it does not do: train (train/classify.py) or compute metrics (eval/classification.py).

    clf = Classifier.load("runs/spam")
    clf.predict(["You won a prize! Call now", "See you at 5?"])   # [Prediction('spam', 0.99..), ...]
    scratchllm classify predict --model runs/spam "You won a prize! Call now"
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from scratchllm.common import ScratchError, read_json, select_precision, torch_dtype

SPEC_FILE = "classifier.json"
SPEC_VERSION = 1


@dataclass
class ClassifierSpec:
    """What classifier.json records: enough to rebuild the model before its weights are loaded."""

    labels: list[str]
    base: str  # the --model the backbone came from (needed to load a partial checkpoint)
    pool: str = "last"
    trainable: str = "all"  # head | last-block | all | lora: decides which tensors the folder holds
    train_blocks: int = 1
    lora: dict | None = None  # {"rank", "alpha", "dropout", "targets"} while the adapters are unmerged
    max_length: int = 0
    truncate: str = "right"
    version: int = SPEC_VERSION
    extra: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        (Path(folder) / SPEC_FILE).write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> ClassifierSpec:
        path = Path(folder) / SPEC_FILE
        d = read_json(path)
        if not isinstance(d, dict) or d.get("version", 0) > SPEC_VERSION:
            raise ScratchError(f"{path}: not a classifier description this scratchllm reads (version "
                               f"{d.get('version') if isinstance(d, dict) else '?'}); upgrade scratchllm")
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown or not isinstance(d.get("labels"), list) or not isinstance(d.get("base"), str):
            raise ScratchError(f"{path}: damaged classifier description (unknown keys {unknown}, or labels/base "
                               "missing); restore it from the run folder")
        return cls(**d)


def cut_rows(rows: list[list[int]], max_length: int, truncate: str, pad_id: int) -> list[list[int]]:
    """Each row cut to max_length tokens from the right (keep the start) or the left (keep the end); an
    empty row (a text of only dropped bytes) becomes one pad position."""
    cut = [(ids[:max_length] if truncate == "right" else ids[-max_length:]) if len(ids) > max_length else ids
           for ids in rows]
    return [ids or [pad_id] for ids in cut]


def encode_texts(tokenizer, texts: list[str], max_length: int, truncate: str) -> list[list[int]]:
    """Token ids of each text, cut by `cut_rows`."""
    return cut_rows([tokenizer.encode_ordinary(t) for t in texts], max_length, truncate, tokenizer.pad_id)


def write_classifier_files(folder: Path, state: dict, backbone_config: dict, tokenizer, spec: ClassifierSpec) -> None:
    """A classifier folder's model files: model.safetensors (`state`), config.json (the backbone's shape),
    tokenizer/ and classifier.json (a checkpoint's meta.json is the caller's)."""
    from scratchllm.train.core import write_safetensors

    folder = Path(folder)
    write_safetensors(folder, state)
    (folder / "config.json").write_text(json.dumps(backbone_config, indent=2) + "\n")
    tokenizer.save(folder / "tokenizer")
    spec.save(folder)


def require_pad_id(tokenizer, source: str) -> int:
    pad = tokenizer.pad_id
    if pad is None:
        raise ScratchError(f"the tokenizer of {source} has no pad token and no <|endoftext|>: batches cannot be "
                           "padded; add a pad token to it (Tokenizer.add_special_tokens + pad_token)")
    return pad


def classifier_folder(path: str | Path) -> Path:
    """A classifier checkpoint folder itself, or a run folder's best/ (else its newest checkpoint)."""
    from scratchllm.train.checkpointing import BEST, resolve_checkpoint

    path = Path(path)
    if not path.exists():
        raise ScratchError(f"{path} does not exist (give a classify run folder, one of its checkpoints or a merged "
                           "classifier folder)")
    if (path / SPEC_FILE).is_file():
        return path
    if (path / BEST / SPEC_FILE).is_file():
        return path / BEST
    folder = resolve_checkpoint(path)
    if not (folder / SPEC_FILE).is_file():
        raise ScratchError(f"{folder} holds no {SPEC_FILE}: not a classifier (train one with `scratchllm classify "
                           "train`)")
    return folder


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict[str, float]


class Classifier:
    def __init__(self, model, tokenizer, spec: ClassifierSpec, folder: Path, device: str = "cpu",
                 precision: str = "fp32"):
        self.model, self.tokenizer, self.spec, self.folder = model.eval(), tokenizer, spec, folder
        self.device, self.precision = device, precision
        self.pad_id = require_pad_id(tokenizer, str(folder))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", precision: str = "fp32", kind: str = "classifier"
             ) -> Classifier:
        """A classifier folder's model (`kind` "reward": a reward model of train/reward.py, one score)."""
        from scratchllm.model.heads import SequenceClassifier, set_trainable
        from scratchllm.tokenizer import Tokenizer
        from scratchllm.train.checkpointing import verify_checkpoint
        from scratchllm.weights import state
        from scratchllm.weights.checkpoint import load_model
        from scratchllm.weights.partial import load_partial

        folder = classifier_folder(path)
        spec = ClassifierSpec.load(folder)
        found = spec.extra.get("kind", "classifier")
        if found != kind:
            use = ("`scratchllm reward score`, or --reward-model of `scratchllm ppo`" if found == "reward"
                   else "`scratchllm classify eval|predict`")
            raise ScratchError(f"{folder} is a {'reward model' if found == 'reward' else 'text classifier'}, not a "
                               f"{'reward model' if kind == 'reward' else 'text classifier'}: use it with {use}")
        if not (folder / "tokenizer" / "tokenizer.json").is_file():
            raise ScratchError(f"{folder / 'tokenizer'} is missing: the classifier cannot tokenize its inputs; "
                               "restore the folder from the run (every checkpoint holds its tokenizer)")
        tokenizer = Tokenizer.load(folder / "tokenizer")
        meta = verify_checkpoint(folder)
        if meta.get("base_fingerprint"):  # only what trained: rebuild the base, then load on top
            backbone, _ = load_model(spec.base)
            model = set_trainable(SequenceClassifier(backbone, len(spec.labels), spec.pool), spec.trainable,
                                  spec.train_blocks, spec.lora)
            load_partial(model, folder)
        else:
            from scratchllm.model import ModelConfig

            source = str(folder / "config.json")
            config = state.config_from_file(lambda: ModelConfig.from_dict(read_json(folder / "config.json"),
                                                                          source=source), source)
            model = SequenceClassifier(state.empty_model(config), len(spec.labels), spec.pool)
            state.load_state_dict_checked(model, state.read_safetensors(folder / "model.safetensors"),
                                          str(folder / "model.safetensors"))
        model.requires_grad_(False)
        return cls(model.to(device), tokenizer, spec, folder, device, select_precision(precision, device))

    @torch.no_grad()
    def probabilities(self, texts: list[str], batch_size: int = 16) -> torch.Tensor:
        """(N, num_classes) softmax probabilities, float32, on the CPU."""
        from scratchllm.data.collate import pad_rows

        max_length = self.spec.max_length or self.model.config.block_size
        rows = encode_texts(self.tokenizer, list(texts), max_length, self.spec.truncate)
        out = []
        autocast = (torch.autocast(torch.device(self.device).type, dtype=torch_dtype(self.precision))
                    if self.precision != "fp32" else nullcontext())
        for start in range(0, len(rows), batch_size):
            idx, mask = pad_rows(rows[start:start + batch_size], self.pad_id, self.tokenizer.padding_side)
            with autocast:
                logits = self.model(idx.to(self.device), attention_mask=mask.to(self.device))  # (B, K)
            out.append(torch.softmax(logits.float(), -1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.spec.labels))

    def predict(self, texts: list[str], batch_size: int = 16) -> list[Prediction]:
        labels = self.spec.labels
        preds = []
        for p in self.probabilities(texts, batch_size).tolist():
            k = max(range(len(p)), key=p.__getitem__)
            preds.append(Prediction(labels[k], p[k], dict(zip(labels, p))))
        return preds
