"""`scratchllm dpo`: direct preference optimisation (the book's chapter 7), full or LoRA, on the shared Trainer.

What it does: reads preference pairs (data/preferences.py), splits them like SFT (the book's 85/5/10
by seed; the preference file holds the instruction file's records in the same order, so an SFT run
and a DPO run with the same seed hold out the same records), renders prompt + chosen and prompt +
rejected in the model's chat format with SFT's masks (train/pairs.py) and trains the policy to raise
the chosen answer's log-probability relative to a frozen reference (objectives.dpo_objective;
losses.dpo_loss, or losses.ipo_loss with --loss ipo). The reference is one of three:
  - a frozen copy of the starting model (full fine-tuning: a second model in memory);
  - the policy itself with its LoRA adapters off (--lora-rank: no second copy);
  - precomputed (--precompute-ref): the reference log-probs of every training and validation pair,
    computed once before the first step, cached in RUN_DIR/ref_logps.safetensors (keyed by the model's
    files, the token rows and settings; reused on --resume) and read from the batches; no reference
    model is loaded.
Answer log-probs are summed over the answer's tokens, or averaged with --logp-mean (the book's
variant). Metrics carry TRL's names: rewards/chosen, rewards/rejected (beta * (log pi - log ref)),
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, on training and validation pairs
(the book prints the margins without the factor beta, and with --logp-mean). Before the first step
the policy is the reference: the loss is exactly ln 2 and every margin 0. best/ by validation loss;
greedy answers to fixed validation prompts every --sample-every steps; RUN_DIR/test.jsonl keeps
the held-out pairs (`scratchllm reward score` reads it), and at the end best/ is evaluated on them
(test_metrics.json, report.md).
What it does not do: the loop (core.py), the losses (losses.py), or reward models (train/reward.py).

    scratchllm dpo --model runs/sft/best --data data:instruction-data-with-preference --out runs/dpo
    scratchllm dpo --model runs/sft/best --data prefs.jsonl --lora-rank 16 --lr 5e-5 --precompute-ref --out runs/dpo
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from scratchllm.common import ScratchError, print0
from scratchllm.configs import DPOConfig
from scratchllm.train import stage

FLAGS = {k: k for k in ("model", "data", "val_data", "test_data", "split", "template", "max_length", "beta", "loss",
                        "label_smoothing", "logp_mean", "precompute_ref", "lora_rank", "lora_alpha", "lora_dropout",
                        "lora_targets", "samples", "out")}
TEST_FILE = "test.jsonl"
REF_FILE = "ref_logps.safetensors"


def model_identity(model: str) -> dict:
    """What names the reference model's weights cheaply: its resolved folder and the size and time of
    each weights file there (a file written again, or another model, gives another identity)."""
    from scratchllm.weights.checkpoint import resolve_model_dir

    folder = resolve_model_dir(model)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
    return {"folder": str(folder.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def cache_key(encs, logp_mean: bool, precision: str, model: dict | None = None) -> str:
    """sha256 over the reference model's identity, the token rows of every split and the settings the
    log-probs depend on."""
    h = hashlib.sha256(json.dumps({"logp_mean": logp_mean, "precision": precision, "model": model}).encode())
    for enc in encs:
        for row in enc.rows:
            h.update(json.dumps(row).encode())
        h.update(b"|")
    return h.hexdigest()


@torch.no_grad()
def reference_logprobs(model, enc, batch_size: int, logp_mean: bool, device: str, autocast) -> torch.Tensor:
    """(N, 2) float32 log-probs (chosen, rejected) of every pair of `enc` under `model`."""
    from scratchllm.data.collate import in_order
    from scratchllm.train.losses import sequence_logprobs

    out = []
    for batch in in_order(len(enc), batch_size, enc.collate):
        with autocast:
            lp = sequence_logprobs(model, batch["idx"].to(device), batch["mask"].to(device))[1 if logp_mean else 0]
        B = lp.shape[0] // 2
        out.append(torch.stack([lp[:B], lp[B:]], 1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def precompute(trainer, cfg: DPOConfig, encs: dict, resumed: bool, lora: bool) -> None:
    """Fill each split's `ref` from RUN_DIR/ref_logps.safetensors, or compute and cache it (rank 0 writes)."""
    from safetensors.torch import load_file, save_file

    from scratchllm.model.lora import disable_lora
    from scratchllm.weights.checkpoint import open_model

    path = trainer.out_dir / REF_FILE
    key = cache_key(encs.values(), cfg.logp_mean, trainer.precision, model_identity(cfg.model))
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            saved_key = (f.metadata() or {}).get("key")
        if saved_key == key:
            cached = load_file(str(path))
            for name, enc in encs.items():
                enc.ref = cached[name]
            print0(f"reference log-probs read from {path}")
            return
        print0(f"{path} was computed for other data or settings: computing it again")
    elif resumed and not lora:
        print0(f"{path} is missing: computing the reference log-probs with a fresh copy of {cfg.model}")
    was_training = trainer.model.training
    ref_model, context = trainer.model, (disable_lora(trainer.model) if lora else nullcontext())
    if resumed and not lora:  # the policy has trained: the reference is the starting model, loaded again
        ref_model = open_model(cfg.model).model.to(trainer.device).eval()
    ref_model.eval()
    with context:
        for enc in encs.values():
            enc.ref = reference_logprobs(ref_model, enc, cfg.train.batch_size, cfg.logp_mean, trainer.device,
                                         trainer.autocast())
    trainer.model.train(was_training)
    if trainer.rank == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({name: enc.ref.contiguous() for name, enc in encs.items()}, str(tmp), metadata={"key": key})
        os.replace(tmp, path)
    print0(f"reference log-probs of {sum(len(e) for e in encs.values())} pairs cached in {path}")


def dpo(cfg: DPOConfig, *, resume=None, overwrite: bool = False) -> dict:
    """Preference-tune as configured; returns the Trainer's summary."""
    from scratchllm.data.collate import ExampleBatches, in_order
    from scratchllm.model.lora import apply_lora, count_lora_parameters, lora_settings
    from scratchllm.train.core import Trainer
    from scratchllm.train.objectives import dpo_objective
    from scratchllm.train.pairs import EncodedPairs
    from scratchllm.train.reward import check_pair_splits, load_pair_splits, write_pairs
    from scratchllm.train.sft import choose_format, make_sampler
    from scratchllm.weights.checkpoint import open_model
    from scratchllm.weights.folder import write_adapter_files, write_state_files

    run = stage.start(cfg, resume=resume, overwrite=overwrite, resume_free=stage.RESUME_FREE | {"samples"})
    tc, out = cfg.train, run.out
    (train, val, test), sets = load_pair_splits(cfg)
    loaded = open_model(cfg.model)
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    if tokenizer is None:
        raise ScratchError(f"--model {cfg.model} has no tokenizer: give a model folder that holds one")
    fmt = choose_format(cfg.template, loaded.chat, cfg.model)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0  # padding is never scored
    block = model.config.block_size
    max_length = min(cfg.max_length or block, block)
    check_pair_splits(train, val, sets)
    encs = {name: EncodedPairs(p, fmt, tokenizer, max_length, pad_id) for name, p in
            (("train", train), ("val", val), ("test", test))}
    tr, va, te = encs["train"], encs["val"], encs["test"]
    for name in ("train", "val"):
        if not len(encs[name]):
            raise ScratchError(f"no {name} pair has both answers within --max-length {max_length}: raise it")

    lora = None
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
        lora = lora_settings(model)
    frozen, reference = {}, "precomputed (no reference model loaded)"
    if not cfg.precompute_ref:
        if lora:
            reference = "the policy with its LoRA adapters off"
        else:
            frozen["ref"] = open_model(cfg.model).model
            reference = "a frozen copy of the starting model"
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    mcfg = model.config

    def write_model(folder: Path, state: dict) -> None:
        if lora:
            write_adapter_files(folder, state, base, lora, mcfg, tokenizer, chat=fmt)
        else:
            write_state_files(folder, state, mcfg, tokenizer, chat=fmt)

    batches = ExampleBatches(len(tr), tc.batch_size, tr.collate, seed=tc.seed, rank=run.rank, world_size=run.world)
    stage.steps_for_epochs(tc, batches.batches_per_epoch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    skipped = sum(len(s.identical) for s in sets)
    info = {"model": cfg.model, "template": fmt.name,
            "loss": f"{cfg.loss}, beta {cfg.beta}" + (f", label smoothing {cfg.label_smoothing}"
                                                      if cfg.label_smoothing else "")
                    + (", log-probs averaged over the answer's tokens" if cfg.logp_mean else
                       ", log-probs summed over the answer's tokens"),
            "reference": reference,
            "trainable": f"{trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters"
                         + (f" ({count_lora_parameters(model):,} in LoRA adapters, rank {cfg.lora_rank})" if lora
                            else ""),
            "data": f"{cfg.data}: {len(train)} train / {len(val)} val / {len(test)} test pairs"
                    + (f" ({skipped} skipped: chosen == rejected)" if skipped else ""),
            "train": tr.summary(max_length), "val": va.summary(max_length),
            "rewards": "beta * (log pi - log ref) of each answer (TRL's convention; the book prints them without "
                       "beta)",
            "epochs": f"{tc.epochs} ({tc.max_steps} steps of {tc.batch_size * tc.grad_accum * run.world} pairs)"
            if tc.epochs else f"{tc.max_steps} steps"}
    objective = functools.partial(dpo_objective, beta=cfg.beta, loss=cfg.loss, label_smoothing=cfg.label_smoothing,
                                  logp_mean=cfg.logp_mean)
    sample_fn = (make_sampler([p.conversation(p.chosen) for p in va.pairs[:cfg.samples]], fmt, tokenizer,
                              tc.sample_tokens) if cfg.samples else None)
    trainer = Trainer(model, tc, objective, batches, out_dir=out,
                      val_batches=lambda: in_order(len(va), tc.batch_size, va.collate), sample_fn=sample_fn,
                      write_model=write_model, info=info, save="trainable" if lora else "all", frozen=frozen)
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    stage.write_config(run)
    if run.rank == 0:
        write_pairs(out / TEST_FILE, test)
    if cfg.precompute_ref:
        precompute(trainer, cfg, encs, resumed=run.resume_from is not None, lora=bool(lora))
    for s in sets:
        if s.identical:
            print0(f"skipped {len(s.identical)} pairs whose chosen answer equals the rejected one: "
                   f"{', '.join(s.identical[:5])}" + (" ..." if len(s.identical) > 5 else ""))
    print0(f"DPO on {cfg.model} ({fmt.name} format, {info['loss']}): {info['trainable']}; reference: {reference}; "
           f"train {info['train']}; {trainer.precision} on {trainer.device}; run folder {out}")
    summary = trainer.fit()
    summary["test"] = None
    if not summary["interrupted"] and len(te):
        summary["test"] = test_metrics(trainer, te, tc.batch_size)
    summary["exit_code"] = stage.finish(summary)
    return summary


def test_metrics(trainer, te, batch_size: int) -> dict:
    """The DPO metrics of best/ (else the final model) on the held-out test pairs: test_metrics.json and
    a section of report.md."""
    from scratchllm.common import atomic_write_text
    from scratchllm.data.collate import in_order
    from scratchllm.train.runlog import add_report_section

    which = "best/" if trainer.load_best() else "the final model"
    metrics = trainer.evaluate(lambda: in_order(len(te), batch_size, te.collate))
    metrics = {k: metrics[k] for k in ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                                       "rewards/rejected", "count")}
    out = trainer.out_dir
    if trainer.rank == 0:
        atomic_write_text(out / "test_metrics.json", json.dumps({"model": which, **metrics}, indent=2) + "\n")
        report = out / "report.md"
        section = (f"\n## Test pairs ({which}, {metrics['count']} pairs)\n\nloss {metrics['loss']:.4f}, reward "
                   f"accuracy {metrics['rewards/accuracies']:.4f}, margin {metrics['rewards/margins']:.4f} (chosen "
                   f"{metrics['rewards/chosen']:.4f}, rejected {metrics['rewards/rejected']:.4f})\n")
        add_report_section(report, section)
    print0(f"test: reward accuracy {metrics['rewards/accuracies']:.2%}, margin {metrics['rewards/margins']:.3f}, loss "
           f"{metrics['loss']:.4f} on {metrics['count']} pairs ({which})")
    return metrics


def run(args) -> int:
    """`scratchllm dpo ...`."""
    cfg = stage.config_from_args(DPOConfig, args, FLAGS)
    summary = dpo(cfg, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
    if summary["interrupted"]:
        return summary["exit_code"]
    val = summary["val"] or {}
    print0(f"done: step {summary['step']}" + (f", val loss {val['loss']:.4f}, reward accuracy "
                                              f"{val['rewards/accuracies']:.2%}, margin {val['rewards/margins']:.3f}"
                                              if "rewards/margins" in val else "")
           + f"; outputs in {cfg.out}. Next: scratchllm chat --model {cfg.out}/best")
    return summary["exit_code"]
