"""What the classification claims (lora.py, freezing.py) share: a balanced SMS-spam subset, one run of
the classification stage (`train/classify.classify`) per setting, and the trainable parameters and
AdamW state bytes of each setting, measured on the model itself.

The backbone is SmolLM2-135M-Instruct (the registry name smollm2-135m-instruct: the GGUF wheel the
project installs); --quick uses a random 2-block GPT with a BPE trained on the subset instead (its
accuracies mean nothing: it only runs the same code in seconds). The data is data:sms-spam (the book's
chapter 6; offline with SCRATCHLLM_MIRROR).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

MODEL = "smollm2-135m-instruct"


def spam_subset(out: Path, per_class: int, seed: int = 0) -> Path:
    """A balanced TSV of per_class ham and per_class spam texts from data:sms-spam (seeded)."""
    from scratchllm.data.labelled import read_labelled

    examples = read_labelled("data:sms-spam")
    rng = random.Random(seed)
    rows = []
    for label in ("ham", "spam"):
        texts = [e.text for e in examples if e.label == label]
        rows += [(label, t) for t in rng.sample(texts, per_class)]
    rng.shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sms-subset.tsv"
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def backbone(out: Path, data: Path, quick: bool) -> str:
    """The model to fine-tune: SmolLM2, or with quick a random tiny GPT (+ a BPE of the data) saved in out."""
    if not quick:
        return MODEL
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer import train_bpe
    from scratchllm.weights.folder import save_model

    tok = train_bpe([data.read_text(encoding="utf-8")], vocab_size=320, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32))
    return str(save_model(model, tok, out / "quick-backbone", overwrite=True))


def classify_run(model: str, data: Path, out: Path, trainable: str, *, lora_rank: int = 16, epochs: int = 1,
                 lr: float = 5e-5, max_length: int = 48, train_blocks: int = 1) -> dict:
    """One `scratchllm classify train` run; returns its test metrics (accuracy, macro_f1, ...)."""
    from scratchllm.configs import ClassifyConfig
    from scratchllm.train.classify import classify

    cfg = ClassifyConfig(model=model, data=str(data), max_length=max_length, trainable=trainable,
                         lora_rank=lora_rank, lora_alpha=float(lora_rank), train_blocks=train_blocks, out=str(out),
                         train={"epochs": epochs, "lr": lr, "compile": "off", "device": "cpu", "seed": 0})
    summary = classify(cfg, overwrite=True)
    return summary["test"]


def trainable_and_optimizer_bytes(model_spec: str, trainable: str, lora_rank: int = 16,
                                  train_blocks: int = 1) -> tuple[int, int]:
    """(trainable parameters, bytes of AdamW's state after one step) of the classifier in this setting,
    measured: one backward and one optimizer step on a short batch, then the state tensors' sizes."""
    from scratchllm.configs import LORA_TARGETS
    from scratchllm.model.heads import SequenceClassifier, set_trainable
    from scratchllm.train.optim import build_optimizer
    from scratchllm.weights.checkpoint import load_model

    backbone, _ = load_model(model_spec)
    lora = {"rank": lora_rank, "alpha": float(lora_rank), "dropout": 0.0, "targets": list(LORA_TARGETS)}
    model = set_trainable(SequenceClassifier(backbone.train(), 2, "last"), trainable, train_blocks,
                          lora if trainable == "lora" else None)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = build_optimizer(model, 1e-5)
    idx = torch.randint(0, backbone.config.vocab_size, (1, 8))
    model(idx).sum().backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return n, state
