"""Typed run configs: dataclasses with defaults, overridden by a TOML file, overridden by CLI flags.

What it does: `resolve(PretrainConfig, toml_path, overrides)` builds a config with the precedence
defaults < TOML file (`--config run.toml`, read with tomllib) < flags (`overrides`, dotted field names
such as "train.lr" mapped from argparse, None meaning "flag not given"). Unknown keys and values of the
wrong type raise ScratchError naming the file and field; each dataclass validates itself in
__post_init__. `to_toml(cfg)` writes the fully resolved config (each run folder's `config.toml`) and
`diff(a, b)` lists differing fields (for resume checks).
What it does not do: know any stage's logic; stages read fields and act.

    cfg = resolve(PretrainConfig, "run.toml", {"train.lr": 3e-4, "out": "runs/x"})
    Path("runs/x/config.toml").write_text(to_toml(cfg))
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchllm.common import ScratchError

SCHEDULES = ("cosine", "linear", "constant")
TRAINABLE = ("head", "last-block", "all", "lora")  # what a classifier trains (model/heads.set_trainable)
LORA_TARGETS = ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]  # every Linear of every block (model/lora.py)


@dataclass
class TrainConfig:
    """What the Trainer needs, for every stage."""

    max_steps: int = 1000  # optimizer steps in the whole run (derived from `epochs` when that is > 0)
    epochs: int = 0  # passes over the training data instead of max_steps (stages that count epochs); 0 = off
    batch_size: int = 8  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step per rank (derived when batch_tokens > 0)
    batch_tokens: int = 0  # global batch in tokens per step; 0 = batch_size * block_size * grad_accum * ranks
    lr: float = 6e-4  # peak learning rate
    min_lr: float = 6e-5  # floor of the cosine/linear decay
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1  # AdamW decay on >= 2-dim tensors only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 20  # validation micro-batches per pass and process; 0 = the whole validation set
    best_metric: str = "loss"  # validation metric that picks RUN_DIR/best/ ("" = keep no best model)
    best_mode: str = "min"  # min | max: which direction of best_metric is better
    patience: int = 0  # stop after this many evaluations without a better best_metric; 0 = never stop early
    sample_every: int = 0  # steps between text samples; 0 = never
    sample_prompt: str = "The"  # the fixed prompt of those samples
    sample_tokens: int = 32  # new tokens per sample
    checkpoint_every: int = 500  # steps between checkpoints; 0 = only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 3  # checkpoints kept; older ones are deleted
    log_every: int = 1  # steps between metrics.jsonl lines
    max_bad_steps: int = 5  # abort after this many non-finite steps in a row
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: str = "auto"  # auto | on | off (torch.compile; auto = on for CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 1337
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on GPU)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ScratchError(f"train.{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("epochs", "batch_tokens", "warmup_steps", "eval_every", "eval_batches", "sample_every",
                     "sample_tokens", "checkpoint_every", "patience"):
            if getattr(self, name) < 0:
                raise ScratchError(f"train.{name} must be >= 0 (got {getattr(self, name)})")
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ScratchError(f"train.{name} must be a finite number (got {getattr(self, name)})")
        if self.weight_decay < 0:
            raise ScratchError(f"train.weight_decay must be >= 0 (got {self.weight_decay})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ScratchError(f"train.beta1 and train.beta2 must be in [0, 1) (got {self.beta1}, {self.beta2})")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ScratchError(f"train.lr must be > 0 and 0 <= train.min_lr <= lr (got lr={self.lr}, "
                               f"min_lr={self.min_lr})")
        if self.schedule not in SCHEDULES:
            raise ScratchError(f"train.schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ScratchError(f"train.precision {self.precision!r}: expected auto, fp32, bf16 or fp16")
        if self.compile not in ("auto", "on", "off"):
            raise ScratchError(f"train.compile {self.compile!r}: expected auto, on or off")
        if self.grad_clip < 0:
            raise ScratchError(f"train.grad_clip must be >= 0 (got {self.grad_clip})")
        if self.best_mode not in ("min", "max"):
            raise ScratchError(f"train.best_mode {self.best_mode!r}: expected min or max")
        if self.patience and not self.best_metric:
            raise ScratchError("train.patience needs train.best_metric (the validation metric to watch)")
        if self.patience and not self.eval_every:
            raise ScratchError("train.patience counts evaluations: it needs train.eval_every > 0")


@dataclass
class PretrainConfig:
    """`scratchllm pretrain`: data + tokenizer + model + output, and the Trainer's settings."""

    data: str = ""  # a shard folder (from `scratchllm data prepare`)
    input: list[str] = field(default_factory=list)  # or raw sources to prepare into OUT/shards first
    tokenizer: str = ""  # tokenizer folder or "gpt2" (needed with `input`; checked against shards)
    model_preset: str = ""  # start from scratch with this preset (tiny, small, gpt2, ...)
    model: str = ""  # or continue from this checkpoint / run / HF folder / .gguf file / registry name
    out: str = ""  # run folder
    block_size: int = 0  # training context length; 0 = the model's
    fsdp: bool = False  # shard with FSDP2 under torchrun instead of DDP
    sampler: str = "random"  # random: random windows, fresh offsets per epoch | sliding: the book's fixed windows
    stride: int = 0  # sliding windows start every `stride` tokens; 0 = block_size (no overlap)
    eval_train: bool = False  # also evaluate on training windows at each evaluation (the book's train curve)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields for a preset
    lora_rank: int = 0  # with --model: train LoRA adapters of this rank instead of every weight; 0 = off
    lora_alpha: float = 16.0  # the adapters' scale alpha (the update is alpha / r * B A)
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # Linear names to adapt
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = from_dict(TrainConfig, self.train, "train")
        if self.lora_rank < 0 or (self.lora_rank and not self.model):
            raise ScratchError(f"--lora-rank {self.lora_rank}: LoRA adapts a pretrained --model (rank >= 1)")
        if self.lora_rank and ("lm_head" in self.lora_targets or not self.lora_alpha > 0):
            raise ScratchError("pretrain LoRA: alpha must be > 0 and lm_head cannot be a target (the loss reads its "
                               "weight directly)")
        if bool(self.data) == bool(self.input):
            raise ScratchError("give exactly one of --data SHARDS_DIR or --input SRC... (with --tokenizer)")
        if self.input and not self.tokenizer:
            raise ScratchError("--input needs --tokenizer (a tokenizer folder or `gpt2`)")
        if bool(self.model_preset) == bool(self.model):
            raise ScratchError("give exactly one of --model-preset NAME or --model DIR")
        if self.model and self.model_overrides:
            raise ScratchError(f"model options ({', '.join(sorted(self.model_overrides))}) shape a new model from "
                               "--model-preset; a --model keeps its own config")
        if not self.out:
            raise ScratchError("--out RUN_DIR is required")
        if self.block_size < 0:
            raise ScratchError(f"block_size must be >= 0 (got {self.block_size})")
        if self.sampler not in ("random", "sliding"):
            raise ScratchError(f"sampler {self.sampler!r}: expected random or sliding")
        if self.stride < 0 or (self.stride and self.sampler != "sliding"):
            raise ScratchError(f"stride {self.stride}: give a stride >= 1 only with --sampler sliding")


def classify_train_defaults() -> TrainConfig:
    """The book's chapter 6 settings: AdamW lr 5e-5, weight decay 0.1, batch 8, 5 epochs, constant lr;
    evaluations (eval_every 0) at each epoch's end, over the whole validation set; the best model by
    validation accuracy."""
    return TrainConfig(epochs=5, batch_size=8, lr=5e-5, min_lr=0.0, warmup_steps=0, schedule="constant",
                       weight_decay=0.1, eval_every=0, eval_batches=0, best_metric="accuracy", best_mode="max",
                       checkpoint_every=0)


@dataclass
class ClassifyConfig:
    """`scratchllm classify train`: a pretrained model + labelled texts -> a classifier."""

    model: str = ""  # the pretrained backbone: run / HF folder, .gguf file or registry name
    data: str = ""  # labelled texts: .tsv/.csv (label, text), .jsonl, or data:NAME (data:sms-spam)
    val_data: str = ""  # separate validation file (with test_data: no split of `data`)
    test_data: str = ""  # separate test file
    text_field: str = "text"  # JSONL field / CSV/TSV header column of the text
    label_field: str = "label"  # ... and of the label
    balance: bool = False  # undersample every class to the smallest one (the book: 747 spam + 747 ham)
    split: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])  # train/val/test fractions of `data`
    max_length: int = 0  # tokens per text, longer ones truncated; 0 = the model's block_size
    truncate: str = "right"  # which end a long text loses: right (keep the start) or left (keep the end)
    pool: str = "last"  # the hidden state classified: last real token, or mean over tokens
    trainable: str = "last-block"  # head | last-block | all | lora (`--train`)
    train_blocks: int = 1  # with last-block: how many of the last blocks train (with the final norm)
    lora_rank: int = 16  # with lora: adapter rank r
    lora_alpha: float = 16.0  # ... scale alpha (the update is alpha / r * B A)
    lora_dropout: float = 0.0  # ... dropout on the adapter's input
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # Linear names to adapt
    out: str = ""  # run folder
    train: TrainConfig = field(default_factory=classify_train_defaults)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = from_dict(TrainConfig, _merge(to_dict(classify_train_defaults()), self.train), "train")
        if not self.model:
            raise ScratchError("--model is required: the pretrained model to fine-tune (e.g. smollm2-135m-instruct)")
        if not self.data:
            raise ScratchError("--data FILE is required (labelled texts: .tsv, .csv, .jsonl or data:sms-spam)")
        if bool(self.val_data) != bool(self.test_data):
            raise ScratchError("give both --val-data and --test-data, or neither (then --split divides --data)")
        if not self.out:
            raise ScratchError("--out RUN_DIR is required")
        if self.trainable not in TRAINABLE:
            raise ScratchError(f"--train {self.trainable!r}: expected one of {', '.join(TRAINABLE)}")
        if len(self.split) != 3 or any(not isinstance(f, int | float) or f <= 0 for f in self.split) \
                or abs(sum(self.split) - 1) > 1e-6:
            raise ScratchError(f"--split {' '.join(map(str, self.split))}: give three fractions train val test, each "
                               "> 0 (a classifier needs validation and test examples), summing to 1 (e.g. 0.7 0.1 0.2)")
        if self.truncate not in ("left", "right"):
            raise ScratchError(f"--truncate {self.truncate!r}: expected left or right")
        if self.pool not in ("last", "mean"):
            raise ScratchError(f"--pool {self.pool!r}: expected last or mean")
        for name in ("max_length",):
            if getattr(self, name) < 0:
                raise ScratchError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.train_blocks < 1:
            raise ScratchError(f"--train-blocks must be >= 1 (got {self.train_blocks})")
        if self.lora_rank < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise ScratchError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 (got rank {self.lora_rank}, "
                               f"alpha {self.lora_alpha}, dropout {self.lora_dropout})")
        if not self.lora_targets:
            raise ScratchError("lora_targets is empty: name the Linear layers to adapt (e.g. c_attn)")


def sft_train_defaults() -> TrainConfig:
    """The book's chapter 7 settings: AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs, constant lr;
    a validation pass every 25 steps over the whole validation set, the best model by validation loss,
    sample answers to fixed validation instructions every 50 steps."""
    return TrainConfig(epochs=2, batch_size=8, lr=5e-5, min_lr=0.0, warmup_steps=0, schedule="constant",
                       weight_decay=0.1, eval_every=25, eval_batches=0, best_metric="loss", best_mode="min",
                       sample_every=50, sample_tokens=48, checkpoint_every=100)


@dataclass
class SFTConfig:
    """`scratchllm sft`: a pretrained model + instruction data -> a model that follows instructions."""

    model: str = ""  # the pretrained model: run / HF folder, .gguf file or registry name
    data: str = ""  # instruction records: .json array / .jsonl (instruction/input/output or messages), data:NAME
    val_data: str = ""  # separate validation file (with test_data: no split of `data`)
    test_data: str = ""  # separate test file
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])  # train/val/test (the book's 935/55/110)
    template: str = ""  # chat format: alpaca | chatml | llama3 | phi3 | markers; "" = the model's own, else alpaca
    add_tokens: bool = False  # add the template's missing special tokens to the tokenizer (grows the embedding)
    mask_prompt: bool = True  # train only on the assistant's answers (False: on every token, the book's main text)
    max_length: int = 0  # tokens per example (longer ones cut, and counted); 0 = the model's block_size
    pack: bool = False  # put several examples in rows of max_length tokens (attention never crosses between them)
    lora_rank: int = 0  # train LoRA adapters of this rank instead of every weight; 0 = full fine-tuning
    lora_alpha: float = 16.0  # the adapters' scale alpha (the update is alpha / r * B A)
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # Linear names to adapt
    samples: int = 2  # validation instructions answered at every sample step (train.sample_every)
    out: str = ""  # run folder
    train: TrainConfig = field(default_factory=sft_train_defaults)

    def __post_init__(self):
        from scratchllm.tokenizer.chat import NAMES

        if isinstance(self.train, dict):
            self.train = from_dict(TrainConfig, _merge(to_dict(sft_train_defaults()), self.train), "train")
        if not self.model:
            raise ScratchError("--model is required: the pretrained model to fine-tune (e.g. smollm2-135m-instruct)")
        if not self.data:
            raise ScratchError("--data FILE is required (instruction records: .json, .jsonl or data:instruction-data)")
        if bool(self.val_data) != bool(self.test_data):
            raise ScratchError("give both --val-data and --test-data, or neither (then --split divides --data)")
        if not self.out:
            raise ScratchError("--out RUN_DIR is required")
        if self.template and self.template not in NAMES:
            raise ScratchError(f"--template {self.template!r}: expected one of {', '.join(NAMES)}")
        if len(self.split) != 3 or any(not isinstance(f, int | float) or f <= 0 for f in self.split) \
                or abs(sum(self.split) - 1) > 1e-6:
            raise ScratchError(f"--split {' '.join(map(str, self.split))}: give three fractions train val test, each "
                               "> 0, summing to 1 (e.g. the book's 0.85 0.05 0.10)")
        if self.pack and not self.max_length:
            raise ScratchError("--pack needs --max-length N: the length of the packed rows (e.g. 1024; --batch-size "
                               "then counts rows of N tokens)")
        if self.max_length < 0 or self.samples < 0:
            raise ScratchError(f"max_length and samples must be >= 0 (got {self.max_length}, {self.samples})")
        if self.lora_rank < 0 or (self.lora_rank and (not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1)):
            raise ScratchError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 (got rank {self.lora_rank}, "
                               f"alpha {self.lora_alpha}, dropout {self.lora_dropout})")
        if self.lora_rank and ("lm_head" in self.lora_targets or not self.lora_targets):
            raise ScratchError("sft LoRA: name the Linear layers to adapt; lm_head cannot be one (the loss reads its "
                               "weight directly)")


def _check_pair_stage(cfg, name: str) -> None:
    """What the reward, DPO and PPO configs check alike: a model, an output folder, splits, LoRA settings."""
    from scratchllm.tokenizer.chat import NAMES

    if not cfg.model:
        raise ScratchError(f"{name}: --model is required (an sft run folder, a model folder or a registry name)")
    if not cfg.out:
        raise ScratchError(f"{name}: --out RUN_DIR is required")
    if cfg.template and cfg.template not in NAMES:
        raise ScratchError(f"--template {cfg.template!r}: expected one of {', '.join(NAMES)}")
    split = cfg.split
    if len(split) != 3 or any(not isinstance(f, int | float) or f <= 0 for f in split) or abs(sum(split) - 1) > 1e-6:
        raise ScratchError(f"--split {' '.join(map(str, split))}: give three fractions train val test, each > 0, "
                           "summing to 1 (e.g. the book's 0.85 0.05 0.10)")
    if cfg.max_length < 0:
        raise ScratchError(f"max_length must be >= 0 (got {cfg.max_length})")
    rank = getattr(cfg, "lora_rank", 0)
    if rank < 0 or (rank and (not cfg.lora_alpha > 0 or not 0 <= cfg.lora_dropout < 1)):
        raise ScratchError(f"LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1 (got rank {rank}, alpha "
                           f"{cfg.lora_alpha}, dropout {cfg.lora_dropout})")
    if rank and ("lm_head" in cfg.lora_targets or not cfg.lora_targets):
        raise ScratchError(f"{name} LoRA: name the Linear layers to adapt; lm_head cannot be one")


def reward_train_defaults() -> TrainConfig:
    """A reward model on preference pairs: AdamW lr 3e-5, batch 8 pairs, 1 epoch, linear decay; the
    whole validation set every 25 steps, best/ by validation pairwise accuracy."""
    return TrainConfig(epochs=1, batch_size=8, lr=3e-5, min_lr=0.0, warmup_steps=0, schedule="linear",
                       weight_decay=0.0, eval_every=25, eval_batches=0, best_metric="accuracy", best_mode="max",
                       checkpoint_every=100)


@dataclass
class RewardConfig:
    """`scratchllm reward train`: a model + preference pairs -> a reward model (a scalar score of prompt + answer)."""

    model: str = ""  # the backbone: an sft run folder, a model folder, a .gguf file or a registry name
    data: str = ""  # preference records: .json/.jsonl with chosen + rejected, or data:instruction-data-with-preference
    val_data: str = ""  # separate validation file (with test_data: no split of `data`)
    test_data: str = ""  # separate test file
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])  # train/val/test (the book's)
    template: str = ""  # chat format the texts are rendered in; "" = the model's own, else alpaca
    max_length: int = 0  # tokens per prompt + answer (longer ones cut, counted); 0 = the model's block_size
    center_coef: float = 0.0  # weight of (r_chosen + r_rejected)^2 in the loss (keeps rewards near 0)
    trainable: str = "all"  # head | last-block | all | lora (`--train`): what trains besides the new head
    train_blocks: int = 1  # with last-block: how many of the last blocks train (with the final norm)
    lora_rank: int = 16  # with lora: adapter rank r
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    out: str = ""  # run folder
    train: TrainConfig = field(default_factory=reward_train_defaults)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = from_dict(TrainConfig, _merge(to_dict(reward_train_defaults()), self.train), "train")
        _check_pair_stage(self, "reward train")
        if not self.data:
            raise ScratchError("--data FILE is required (preference records with chosen and rejected answers)")
        if bool(self.val_data) != bool(self.test_data):
            raise ScratchError("give both --val-data and --test-data, or neither (then --split divides --data)")
        if self.trainable not in TRAINABLE:
            raise ScratchError(f"--train {self.trainable!r}: expected one of {', '.join(TRAINABLE)}")
        if self.train_blocks < 1 or self.center_coef < 0:
            raise ScratchError(f"--train-blocks must be >= 1 and --center-coef >= 0 (got {self.train_blocks}, "
                               f"{self.center_coef})")


def dpo_train_defaults() -> TrainConfig:
    """The book's chapter 7 DPO settings: AdamW lr 5e-6, weight decay 0.01, batch 8 pairs, 1 epoch,
    constant lr; the whole validation set every 20 steps, best/ by validation loss."""
    return TrainConfig(epochs=1, batch_size=8, lr=5e-6, min_lr=0.0, warmup_steps=0, schedule="constant",
                       weight_decay=0.01, eval_every=20, eval_batches=0, best_metric="loss", best_mode="min",
                       sample_every=50, sample_tokens=48, checkpoint_every=100)


DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig:
    """`scratchllm dpo`: an SFT model + preference pairs -> a model that prefers the chosen answers."""

    model: str = ""  # the starting (and reference) model: an sft run's best/, a model folder, a registry name
    data: str = ""  # preference records (see RewardConfig.data)
    val_data: str = ""
    test_data: str = ""
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])
    template: str = ""  # chat format; "" = the model's own, else alpaca
    max_length: int = 0  # tokens per prompt + answer; 0 = the model's block_size
    beta: float = 0.1  # strength of the pull towards the reference (DPO's beta; IPO's tau)
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0  # the chance a label is flipped (conservative DPO); sigmoid loss only
    logp_mean: bool = False  # average the answer's log-probs over its tokens (the book) instead of summing
    precompute_ref: bool = False  # compute the reference log-probs once, cache them, load no reference model
    lora_rank: int = 0  # train LoRA adapters (the reference is then the model with them off); 0 = full
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    samples: int = 2  # validation prompts answered at every sample step (train.sample_every)
    out: str = ""
    train: TrainConfig = field(default_factory=dpo_train_defaults)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = from_dict(TrainConfig, _merge(to_dict(dpo_train_defaults()), self.train), "train")
        _check_pair_stage(self, "dpo")
        if not self.data:
            raise ScratchError("--data FILE is required (preference records with chosen and rejected answers)")
        if bool(self.val_data) != bool(self.test_data):
            raise ScratchError("give both --val-data and --test-data, or neither (then --split divides --data)")
        if self.loss not in DPO_LOSSES:
            raise ScratchError(f"--loss {self.loss!r}: expected one of {', '.join(DPO_LOSSES)}")
        if not self.beta > 0:
            raise ScratchError(f"--beta must be > 0 (got {self.beta})")
        if not 0 <= self.label_smoothing < 0.5 or (self.label_smoothing and self.loss != "sigmoid"):
            raise ScratchError(f"--label-smoothing must be in [0, 0.5) and needs --loss sigmoid (got "
                               f"{self.label_smoothing}, {self.loss})")
        if self.samples < 0:
            raise ScratchError(f"samples must be >= 0 (got {self.samples})")


def ppo_train_defaults() -> TrainConfig:
    """PPO: max_steps counts rollout batches of batch_size prompts; AdamW lr 1e-5 without weight decay,
    constant; held-out prompts scored every 10 rollout batches, best/ by their mean score."""
    return TrainConfig(max_steps=40, batch_size=8, lr=1e-5, min_lr=0.0, warmup_steps=0, schedule="constant",
                       weight_decay=0.0, eval_every=10, eval_batches=0, best_metric="score", best_mode="max",
                       checkpoint_every=10, log_every=1)


KL_KINDS = ("k1", "k3")
VALUE_HEADS = ("shared", "separate")


@dataclass
class PPOConfig:
    """`scratchllm ppo`: an SFT policy + a reward (a reward model or a rule) + prompts -> RLHF with PPO."""

    model: str = ""  # the starting policy (and the frozen reference): an sft run's best/, a model folder
    prompts: str = ""  # JSONL with a prompt field, chat JSONL, or the book's instruction JSON
    reward_model: str = ""  # a `scratchllm reward train` run (its best/)
    reward: str = ""  # or a rule: module:function(prompt, response) -> float, imported from the Python path
    retokenize: bool = False  # let a reward model whose tokenizer differs read the decoded text, re-tokenized
    split: list[float] = field(default_factory=lambda: [0.85, 0.05, 0.10])  # of the prompts: train/val/test
    template: str = ""  # the policy's chat format; "" = its own, else alpaca
    max_length: int = 0  # prompt tokens kept (longer prompts lose their start); 0 = block_size - max_new_tokens - 1
    max_new_tokens: int = 48  # response length cap
    temperature: float = 1.0  # of the rollouts, applied to the logits the log-probs are computed from
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ends its turn
    kl_coef: float = 0.05  # per-token KL penalty coefficient (the start value when adaptive)
    kl_kind: str = "k1"  # k1 | k3 estimator of KL(policy || reference) per token
    target_kl: float = 0.0  # > 0: adapt kl_coef towards this KL per response (Ziegler et al.); 0 = fixed
    kl_horizon: int = 10000  # responses over which the adaptive controller acts
    max_kl: float = 20.0  # stop when the mean KL per response exceeds this (the policy ran away)
    gamma: float = 1.0
    lam: float = 0.95
    ppo_epochs: int = 4  # passes over each rollout batch
    mini_batch_size: int = 4  # responses per optimizer step inside those passes
    clip_range: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value clip
    vf_coef: float = 0.1  # weight of the value loss
    value_head: str = "shared"  # shared (a head on the policy) | separate (its own network)
    value_init: str = "zero"  # zero | reward (from the reward model: a separate value network only)
    whiten_rewards: bool = False  # whiten the per-token rewards of a batch before GAE
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    eval_prompts: int = 32  # held-out prompts answered (greedy) and scored at every evaluation
    samples: int = 3  # held-out answers shown in the report at every evaluation
    out: str = ""
    train: TrainConfig = field(default_factory=ppo_train_defaults)

    def __post_init__(self):
        if isinstance(self.train, dict):
            self.train = from_dict(TrainConfig, _merge(to_dict(ppo_train_defaults()), self.train), "train")
        _check_pair_stage(self, "ppo")
        if not self.prompts:
            raise ScratchError("--prompts FILE is required (JSONL with a prompt field, chats, or instruction records)")
        if bool(self.reward_model) == bool(self.reward):
            raise ScratchError("give exactly one of --reward-model RM_RUN (a learned reward) and --reward "
                               "module:function (a rule)")
        if self.reward and (self.reward.count(":") != 1 or not all(self.reward.split(":"))):
            raise ScratchError(f"--reward {self.reward!r}: expected module:function, e.g. myrules:short_answer")
        if self.kl_kind not in KL_KINDS:
            raise ScratchError(f"--kl-kind {self.kl_kind!r}: expected one of {', '.join(KL_KINDS)}")
        if self.value_head not in VALUE_HEADS or self.value_init not in ("zero", "reward"):
            raise ScratchError(f"--value-head {self.value_head!r} / --value-init {self.value_init!r}: expected "
                               "shared|separate and zero|reward")
        if self.value_init == "reward" and (self.value_head != "separate" or not self.reward_model):
            raise ScratchError("--value-init reward needs --value-head separate and --reward-model (the value "
                               "network starts as a copy of the reward model)")
        for name in ("max_new_tokens", "ppo_epochs", "mini_batch_size", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ScratchError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.train.batch_size % self.mini_batch_size:
            raise ScratchError(f"--batch-size {self.train.batch_size} (prompts per rollout batch) must be a multiple "
                               f"of --mini-batch-size {self.mini_batch_size}")
        if not self.temperature > 0 or self.kl_coef < 0 or self.target_kl < 0 or not self.max_kl > 0:
            raise ScratchError(f"need temperature > 0, kl_coef >= 0, target_kl >= 0, max_kl > 0 (got "
                               f"{self.temperature}, {self.kl_coef}, {self.target_kl}, {self.max_kl})")
        if not 0 < self.clip_range < 1 or self.value_clip < 0 or self.vf_coef < 0 or not 0 <= self.lam <= 1 \
                or not 0 < self.gamma <= 1:
            raise ScratchError("need 0 < clip_range < 1, value_clip >= 0, vf_coef >= 0, 0 <= lam <= 1, 0 < gamma <= 1")
        if self.eval_prompts < 0 or self.samples < 0:
            raise ScratchError("eval_prompts and samples must be >= 0")
        if self.lora_dropout:
            raise ScratchError("ppo keeps dropout off (the log-probs of the rollouts and of the updates must match): "
                               "leave --lora-dropout at 0")


# ---------------------------------------------------------------------------------------------
# dict/TOML <-> dataclass


def _check_type(value, tp, where: str):
    """Accept `value` for annotation `tp` (int for float is fine, bool for int is not)."""
    origin = typing.get_origin(tp)
    if origin in (list, typing.List):  # noqa: UP006
        if not isinstance(value, list):
            raise ScratchError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, typing.get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            raise ScratchError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    raise ScratchError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass `cls` from a (possibly nested) dict, rejecting unknown keys by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    prefix = f"{where}." if where else ""
    if unknown:
        raise ScratchError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                           f"known keys: {', '.join(sorted(names))}")
    kwargs = {}
    factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                 if f.default_factory is not dataclasses.MISSING}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ScratchError(f"{prefix}{k}: expected a table [{prefix}{k}], got {v!r}")
            if k in factories:  # a stage's own defaults (classify's TrainConfig), then what is given
                v = _merge(to_dict(factories[k]()), v)
            kwargs[k] = from_dict(tp, v, prefix + k)
        else:
            kwargs[k] = _check_type(v, tp, prefix + k)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve(cls, toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None,
            base: dict | None = None):
    """defaults < base (e.g. a resumed run's saved config) < TOML file < overrides (dotted keys; None
    values are skipped)."""
    d: dict = copy.deepcopy(base or {})
    if toml_path:
        path = Path(toml_path)
        if path.is_dir():
            raise ScratchError(f"--config {path} is a folder; give a TOML file (a run's config.toml works)")
        if path.exists() and not path.is_file():  # /dev/zero would never end
            raise ScratchError(f"--config {path} is not a regular file (a device, FIFO or socket); give a TOML file")
        try:
            d = _merge(d, tomllib.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise ScratchError(f"--config {path}: file not found") from None
        except OSError as e:
            raise ScratchError(f"--config {path}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ScratchError(f"--config {path}: not UTF-8 text (byte offset {e.start}); TOML files are UTF-8, "
                               "is this really a TOML file?") from None
        except tomllib.TOMLDecodeError as e:
            raise ScratchError(f"--config {path}: invalid TOML: {e}") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, leaf = key.split(".")
        node = d
        for i, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):  # e.g. `train = 5` in the file and --lr on the command line
                where = ".".join(parents[:i + 1])
                raise ScratchError(f"{toml_path or 'config'}: {where}: expected a table [{where}], got {node!r}")
        node[leaf] = value
    try:
        return from_dict(cls, d)
    except ScratchError as e:
        raise ScratchError(f"{toml_path}: {e}" if toml_path else str(e)) from None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to TOML")


def to_toml(cfg) -> str:
    """The config as TOML: scalars first, then one [table] per nested dataclass or dict field."""
    d = cfg if isinstance(cfg, dict) else to_dict(cfg)

    def emit(d: dict, prefix: str) -> list[str]:
        lines = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
        for k, v in d.items():
            if isinstance(v, dict):
                lines += ["", f"[{prefix}{k}]"] + emit(v, f"{prefix}{k}.")
        return lines

    return "\n".join(emit(d, "")) + "\n"


def diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out
