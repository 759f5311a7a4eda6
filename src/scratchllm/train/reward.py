"""`scratchllm reward train|score`: a reward model learned from human comparisons, the first half of RLHF.

What it does: reads preference pairs (data/preferences.py), splits them by seed (the book's 85/5/10)
or takes --val-data/--test-data, renders prompt + chosen and prompt + rejected in a chat format
(train/pairs.py), and puts a scalar head (`SequenceClassifier(backbone, 1)`, model/heads.py, read at
the last real token: the end of the rendered answer, after its end-of-turn token) on the backbone, zero-initialised so
the first loss is exactly ln 2. What trains besides the head is `--train` (all by default,
last-block, head, lora). The Trainer runs the Bradley-Terry loss (objectives.reward_objective) and reports
pairwise accuracy (r_chosen > r_rejected), the mean margin and the rewards' mean/std on training and
validation pairs, keeping RUN_DIR/best/ by validation accuracy. At the end the best model's rewards
are normalised to mean 0 / std 1 over the training answers by folding the shift and scale into the
head (w / std, (b - mean) / std): RUN_DIR/best/ then scores on that stable scale (PPO adds it to its
KL penalty), and its classifier.json records the statistics. The held-out test pairs are scored
last (test_metrics.json and report.md).
`reward score` loads a reward model (`RewardModel.load`) and scores preference pairs (accuracy,
margin) or prompt + response records (one score each, as JSONL).
What it does not do: the loop (core.py), the loss (losses.py), or PPO (train/ppo.py).

    scratchllm reward train --model runs/sft/best --data data:instruction-data-with-preference --out runs/rm
    scratchllm reward score --model runs/rm --data runs/rm/test.jsonl
"""

from __future__ import annotations

import functools
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from scratchllm.common import ScratchError, atomic_write_text, print0, read_json, torch_dtype
from scratchllm.configs import RewardConfig
from scratchllm.train import stage

FLAGS = {k: k for k in ("model", "data", "val_data", "test_data", "split", "template", "max_length", "center_coef",
                        "train_blocks", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "out")} \
    | {"trainable": "trainable"}
TEST_FILE = "test.jsonl"
KIND = "reward"  # classifier.json extra["kind"] of a reward model


def load_pair_splits(cfg):
    """((train, val, test) lists of data.preferences.Pair, the PairSets whose `identical` name the pairs
    skipped because chosen == rejected). Shared by reward and DPO (configs with data, val_data,
    test_data, split and train.seed). --data is split before those pairs are dropped, so the splits
    hold the same records as an SFT run's split of the same file order with the same seed."""
    from scratchllm.data.labelled import split
    from scratchllm.data.preferences import drop_identical, read_pairs

    if cfg.val_data:
        sets = [read_pairs(s) for s in (cfg.data, cfg.val_data, cfg.test_data)]
    else:
        sets = [drop_identical(part) for part in split(read_pairs(cfg.data, skip_identical=False).pairs,
                                                         tuple(cfg.split), seed=cfg.train.seed)]
    return [s.pairs for s in sets], sets


def check_pair_splits(train, val, sets) -> None:
    """Refuse a train or validation split left empty (by the split or by dropping identical pairs)."""
    for name, pairs, found in (("train", train, sets[0]), ("val", val, sets[min(1, len(sets) - 1)])):
        if not pairs:
            why = (f"holds only pairs whose chosen == rejected ({len(found.identical)}: "
                   f"{', '.join(found.identical[:3])})" if found.identical else "is empty")
            raise ScratchError(f"the {name} split {why}: use more pairs or another --split")


def pair_record(pair) -> dict:
    """The JSONL form of a pair (read back by read_pairs): the book's fields, or messages."""
    p = pair.prompt
    if len(p) == 1 and "input" in p[0]:
        return {"instruction": p[0]["content"], "input": p[0]["input"], "chosen": pair.chosen,
                "rejected": pair.rejected}
    return {"messages": [dict(m) for m in p], "chosen": pair.chosen, "rejected": pair.rejected}


def write_pairs(path: Path, pairs) -> None:
    atomic_write_text(path, "".join(json.dumps(pair_record(p), ensure_ascii=False) + "\n" for p in pairs))


# --------------------------------------------------------------------------------------------- using a reward model
class RewardModel:
    """A trained reward model: `score(conversations)` -> one float per conversation (prompt + answer)."""

    def __init__(self, clf, fmt):
        self.clf, self.fmt = clf, fmt
        self.model, self.tokenizer, self.folder = clf.model, clf.tokenizer, clf.folder
        self.stats = clf.spec.extra.get("normalization")

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", precision: str = "fp32") -> RewardModel:
        from scratchllm.infer.classifier import Classifier
        from scratchllm.weights.checkpoint import read_chat_format

        clf = Classifier.load(path, device=device, precision=precision, kind=KIND)
        fmt = read_chat_format(clf.folder)
        if fmt is None:
            raise ScratchError(f"{clf.folder} has no chat.json: the reward model's chat format is unknown")
        return cls(clf, fmt)

    def to(self, device: str) -> RewardModel:
        self.model.to(device)
        self.clf.device = device
        return self

    def encode(self, conv) -> list[int]:
        from scratchllm.train.sft import encode

        ids, _ = encode(conv, self.fmt, self.tokenizer)
        limit = self.clf.spec.max_length or self.model.config.block_size
        return ids[:limit]

    @torch.no_grad()
    def score_ids(self, rows: list[list[int]], batch_size: int = 16) -> torch.Tensor:
        """(N,) float32 scores of token rows (prompt + answer, rendered in this model's format)."""
        from scratchllm.data.collate import pad_rows

        precision = self.clf.precision
        autocast = (torch.autocast(torch.device(self.clf.device).type, dtype=torch_dtype(precision))
                    if precision != "fp32" else nullcontext())
        out = []
        for start in range(0, len(rows), batch_size):
            idx, mask = pad_rows(rows[start:start + batch_size], self.clf.pad_id, "right")
            with autocast:
                out.append(self.model(idx.to(self.clf.device), attention_mask=mask.to(self.clf.device))[:, 0]
                           .float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def score(self, convs, batch_size: int = 16) -> torch.Tensor:
        return self.score_ids([self.encode(c) for c in convs], batch_size)

    def score_pairs(self, pairs, batch_size: int = 16) -> dict:
        """Pairwise accuracy, mean margin and the rewards' mean/std over pairs; per-pair scores too."""
        chosen = self.score([p.conversation(p.chosen) for p in pairs], batch_size)
        rejected = self.score([p.conversation(p.rejected) for p in pairs], batch_size)
        both = torch.cat([chosen, rejected])
        return {"n": len(pairs), "accuracy": float((chosen > rejected).float().mean()),
                "margin": float((chosen - rejected).mean()), "reward_mean": float(both.mean()),
                "reward_std": float(both.std(unbiased=False)), "chosen": chosen.tolist(),
                "rejected": rejected.tolist()}


def fold_normalization(head: torch.nn.Linear, mean: float, std: float) -> None:
    """Make head(x) give (old head(x) - mean) / std: w <- w / std, b <- (b - mean) / std."""
    with torch.no_grad():
        head.weight.div_(std)
        head.bias.sub_(mean).div_(std)


@torch.no_grad()
def normalization_stats(model, enc, batch_size: int, device: str, autocast) -> tuple[float, float]:
    """Mean and std of the model's scores over every answer (chosen and rejected) of `enc`."""
    from scratchllm.data.collate import in_order

    model.eval()
    scores = []
    for batch in in_order(len(enc), batch_size, enc.collate):
        with autocast:
            scores.append(model(batch["idx"].to(device), attention_mask=batch["attention_mask"].to(device))[:, 0]
                          .float().cpu())
    s = torch.cat(scores)
    return float(s.mean()), max(float(s.std(unbiased=False)), 1e-6)


# --------------------------------------------------------------------------------------------- the stage
def reward(cfg: RewardConfig, *, resume=None, overwrite: bool = False) -> dict:
    """Train a reward model as configured; returns the Trainer's summary plus "test"."""
    from scratchllm.data.collate import ExampleBatches, in_order
    from scratchllm.infer.classifier import SPEC_FILE, ClassifierSpec, require_pad_id, write_classifier_files
    from scratchllm.model.heads import SequenceClassifier, set_trainable
    from scratchllm.model.lora import count_lora_parameters
    from scratchllm.train.core import Trainer
    from scratchllm.train.objectives import reward_objective, reward_std
    from scratchllm.train.pairs import EncodedPairs
    from scratchllm.train.sft import choose_format
    from scratchllm.weights.checkpoint import open_model
    from scratchllm.weights.folder import CHAT

    run = stage.start(cfg, resume=resume, overwrite=overwrite)
    tc, out = cfg.train, run.out
    (train, val, test), sets = load_pair_splits(cfg)
    loaded = open_model(cfg.model)
    backbone, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise ScratchError(f"--model {cfg.model} has no tokenizer: give a model folder that holds one")
    pad_id = require_pad_id(tokenizer, cfg.model)
    fmt = choose_format(cfg.template, loaded.chat, cfg.model)
    block = backbone.config.block_size
    max_length = min(cfg.max_length or block, block)
    check_pair_splits(train, val, sets)
    splits = {name: EncodedPairs(p, fmt, tokenizer, max_length, pad_id) for name, p in
              (("train", train), ("val", val), ("test", test))}
    tr, va = splits["train"], splits["val"]
    for name in ("train", "val"):
        if not len(splits[name]):
            raise ScratchError(f"no {name} pair has both answers within --max-length {max_length}: raise it")
    lora = ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
             "targets": list(cfg.lora_targets)} if cfg.trainable == "lora" else None)
    model = set_trainable(SequenceClassifier(backbone.train(), 1, "last"), cfg.trainable, cfg.train_blocks, lora)
    torch.nn.init.zeros_(model.head.weight)  # every score 0 at first: the loss starts at exactly ln 2
    torch.nn.init.zeros_(model.head.bias)
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    spec = ClassifierSpec(labels=["reward"], base=base, pool="last", trainable=cfg.trainable,
                          train_blocks=cfg.train_blocks, lora=lora, max_length=max_length,
                          extra={"kind": KIND, "template": fmt.name})
    backbone_config = backbone.config.to_dict()

    def write_model(folder: Path, state: dict) -> None:
        write_classifier_files(folder, state, backbone_config, tokenizer, spec)
        (Path(folder) / CHAT).write_text(json.dumps(fmt.to_dict(), indent=2, ensure_ascii=False) + "\n")

    batches = ExampleBatches(len(tr), tc.batch_size, tr.collate, seed=tc.seed, rank=run.rank, world_size=run.world)
    stage.steps_for_epochs(tc, batches.batches_per_epoch)
    g = torch.Generator().manual_seed(tc.seed)
    sample = sorted(torch.randperm(len(tr), generator=g)[:len(va)].tolist())  # a fixed training sample
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    skipped = sum(len(s.identical) for s in sets)
    info = {"model": cfg.model, "template": fmt.name,
            "trainable": f"{cfg.trainable}: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} "
                         "parameters" + (f" ({count_lora_parameters(model):,} in LoRA adapters)" if lora else ""),
            "data": f"{cfg.data}: {len(train)} train / {len(val)} val / {len(test)} test pairs"
                    + (f" ({skipped} skipped: chosen == rejected)" if skipped else ""),
            "train": tr.summary(max_length), "val": va.summary(max_length),
            "epochs": f"{tc.epochs} ({tc.max_steps} steps of {tc.batch_size * tc.grad_accum * run.world} pairs)"
            if tc.epochs else f"{tc.max_steps} steps"}
    trainer = Trainer(model, tc, functools.partial(reward_objective, center_coef=cfg.center_coef), batches,
                      out_dir=out, val_batches=lambda: in_order(len(va), tc.batch_size, va.collate),
                      train_eval_batches=lambda: in_order(len(sample), tc.batch_size,
                                                          lambda ix: tr.collate([sample[i] for i in ix])),
                      write_model=write_model, info=info, derived_metrics=reward_std,
                      save="all" if cfg.trainable == "all" else "trainable")
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    stage.write_config(run)
    if run.rank == 0:
        write_pairs(out / TEST_FILE, test)
    for s in sets:
        if s.identical:
            print0(f"skipped {len(s.identical)} pairs whose chosen answer equals the rejected one: "
                   f"{', '.join(s.identical[:5])}" + (" ..." if len(s.identical) > 5 else ""))
    print0(f"training a reward model on {cfg.model} ({fmt.name} format): {info['trainable']}; train {info['train']}; "
           f"{trainer.precision} on {trainer.device}; run folder {out}")
    summary = trainer.fit()
    summary["test"] = None
    if summary["interrupted"]:
        summary["exit_code"] = stage.finish(summary)
        return summary

    # the model to use: best/ (else the final weights), its scores normalised on the training answers
    best = out / "best"
    had_best = trainer.load_best()
    saved = read_json(best / SPEC_FILE).get("extra", {}).get("normalization") if had_best else None
    if saved:  # a finished run resumed: best/ is normalised already
        spec.extra["normalization"] = saved
    else:
        mean, std = normalization_stats(trainer.model, tr, tc.batch_size, trainer.device, trainer.autocast())
        fold_normalization(model.head, mean, std)
        spec.extra["normalization"] = {"mean": mean, "std": std, "pairs": len(tr)}
        # rewrites best/ (atomically) with the normalised head, as the weights of the best step
        trainer.save_best(trainer.evaluate(), step=trainer.best["step"] if had_best else None)
        print0(f"rewards normalised on the {len(tr)} training pairs' answers (mean {mean:.4f}, std {std:.4f} "
               f"before): {best}")
    if run.rank == 0:
        summary["test"] = finish_run(out, splits["test"], tc.batch_size, trainer.device, trainer.precision)
    summary["exit_code"] = stage.finish(summary)
    return summary


def finish_run(out: Path, test_enc, batch_size: int, device: str, precision: str) -> dict | None:
    """Score the held-out test pairs with best/: test_metrics.json and a test section in report.md."""
    from scratchllm.train.runlog import add_report_section

    if not len(test_enc):
        return None
    rm = RewardModel.load(out, device=device, precision=precision)
    metrics = rm.score_pairs(test_enc.pairs, batch_size)
    summary = {k: metrics[k] for k in ("n", "accuracy", "margin", "reward_mean", "reward_std")}
    atomic_write_text(out / "test_metrics.json", json.dumps(summary, indent=2) + "\n")
    report = out / "report.md"
    section = (f"\n## Test pairs (best/, {summary['n']} pairs)\n\npairwise accuracy {summary['accuracy']:.4f}, "
               f"mean margin {summary['margin']:.4f}, rewards mean {summary['reward_mean']:.4f} / std "
               f"{summary['reward_std']:.4f} (normalised on the training answers)\n")
    add_report_section(report, section)
    print0(f"test: pairwise accuracy {summary['accuracy']:.2%}, mean margin {summary['margin']:.3f} on "
           f"{summary['n']} pairs ({rm.folder})")
    return summary


# --------------------------------------------------------------------------------------------- commands
def run(args) -> int:
    """`scratchllm reward train ...`."""
    cfg = stage.config_from_args(RewardConfig, args, FLAGS)
    summary = reward(cfg, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
    if summary["interrupted"]:
        return summary["exit_code"]
    val = summary["val"] or {}
    print0(f"done: step {summary['step']}" + (f", val accuracy {val['accuracy']:.2%}" if "accuracy" in val else "")
           + f"; the reward model is {cfg.out}/best. Next: scratchllm reward score --model {cfg.out} --data FILE, or "
             f"scratchllm ppo --reward-model {cfg.out} ...")
    return summary["exit_code"]


def _scored_records(data: str):
    """[(where, conversation)] of records with a prompt and a `response` (or `output`) string."""
    from scratchllm.data.instructions import Conversation
    from scratchllm.data.preferences import prompt_messages, read_records

    out = []
    for where, obj in read_records(data, "records"):
        prompt = prompt_messages(obj, where)
        field = "response" if "response" in obj else "output" if "output" in obj else None
        if field is None or not isinstance(obj[field], str):
            raise ScratchError(f"{where}: no 'response' (or 'output') string to score; a record needs a prompt and "
                               "the answer to score, or 'chosen' and 'rejected'")
        out.append((where, Conversation(prompt + ({"role": "assistant", "content": obj[field]},), where)))
    return out


def run_score(args) -> int:
    """`scratchllm reward score --model RM --data FILE [--out F.jsonl] [--json]`."""
    rm = RewardModel.load(args.model, precision=args.precision)
    data = args.data
    if not data:
        for folder in (rm.folder, rm.folder.parent):
            if (folder / TEST_FILE).is_file():
                data = str(folder / TEST_FILE)
                break
        else:
            raise ScratchError(f"{rm.folder} has no {TEST_FILE} beside it: pass --data FILE")
    first = _first_record(data)
    if isinstance(first, dict) and "chosen" in first and "rejected" in first:
        from scratchllm.data.preferences import read_pairs

        pairs = read_pairs(data)
        m = rm.score_pairs(pairs.pairs, args.batch_size)
        summary = {k: m[k] for k in ("n", "accuracy", "margin", "reward_mean", "reward_std")}
        if args.out:
            atomic_write_text(Path(args.out), "".join(
                json.dumps({"where": p.where, "chosen": c, "rejected": r}) + "\n"
                for p, c, r in zip(pairs.pairs, m["chosen"], m["rejected"])))
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"{data}: {pairs.summary()}, reward model {rm.folder}\n"
                  f"pairwise accuracy {summary['accuracy']:.4f}, mean margin {summary['margin']:.4f}, rewards mean "
                  f"{summary['reward_mean']:.4f} / std {summary['reward_std']:.4f}")
        return 0
    records = _scored_records(data)
    scores = rm.score([c for _, c in records], args.batch_size).tolist()
    lines = [json.dumps({"where": w, "score": s}) for (w, _), s in zip(records, scores)]
    if args.out:
        atomic_write_text(Path(args.out), "".join(x + "\n" for x in lines))
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    if args.json:
        print(json.dumps({"n": len(scores), "reward_mean": mean, "reward_std": std}))
    else:
        if not args.out:
            sys.stdout.write("".join(x + "\n" for x in lines))
        print(f"{data}: {len(scores)} responses, mean score {mean:.4f} (std {std:.4f}), reward model {rm.folder}")
    return 0


def _first_record(data: str):
    from scratchllm.data.preferences import read_records

    return read_records(data, "records")[0][1]

