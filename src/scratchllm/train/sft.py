"""`scratchllm sft`: instruction fine-tuning (the book's chapter 7), full or LoRA, on the shared Trainer.

What it does: reads instruction records or chats (data/instructions.py), splits them by seed (the
book's 85/5/10: 935 / 55 / 110 of its 1100 records) or takes --val-data/--test-data, renders each in a
chat format (--template, default the model's own, else alpaca) with its loss mask (tokenizer/chat.py:
1 on the assistant's answers and their end-of-turn token; --no-mask-prompt trains on every token, as
the book's main text does), shifts it into (inputs, targets) with IGNORE_INDEX wherever the mask is 0,
cuts it to --max-length (counting the examples whose answer was cut, skipping and counting the ones
left with no trained token) and optionally packs several examples into one row (data/collate.py).
A format whose special tokens the tokenizer lacks is refused unless --add-tokens (implied by the
"markers" format) adds them: the embedding (and an untied head) grow, new rows the mean of the old.
The Trainer runs masked next-token cross-entropy (objectives.masked_lm_objective), printing tokens/s
of all tokens and of trained ones, evaluating the masked validation loss, keeping RUN_DIR/best/ by it,
stopping early with --patience, and answering fixed validation instructions every --sample-every
steps. With --lora-rank only the adapters train and are saved (plus the embedding when tokens were
added); `merge` folds them in. Every checkpoint holds chat.json, so `chat`, `generate --chat` and
`eval generate` speak the trained format. RUN_DIR/test.jsonl keeps the held-out split.
`--show-mask N` prints N rendered training examples with the trained tokens marked, and stops.
What it does not do: the loop (core.py), generation (infer/), or scoring (eval/).

    scratchllm sft --model smollm2-135m-instruct --data data:instruction-data --template alpaca --out runs/sft
    scratchllm sft --model gpt2-medium-run --data data:instruction-data --lora-rank 16 --lr 2e-4 --out runs/lora
    scratchllm sft --model smollm2-135m-instruct --data chats.jsonl --show-mask 2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from scratchllm.common import ScratchError, atomic_write_text, print0
from scratchllm.configs import SFTConfig
from scratchllm.train import stage

FLAGS = {k: k for k in ("model", "data", "val_data", "test_data", "split", "template", "add_tokens", "mask_prompt",
                        "max_length", "pack", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "samples",
                        "out")}
TEST_FILE = "test.jsonl"


# --------------------------------------------------------------------------------------------- data
def load_splits(cfg: SFTConfig):
    """(train, val, test) lists of data.instructions.Conversation."""
    from scratchllm.data.instructions import read_conversations
    from scratchllm.data.labelled import split

    if cfg.val_data:
        return read_conversations(cfg.data), read_conversations(cfg.val_data), read_conversations(cfg.test_data)
    return split(read_conversations(cfg.data), tuple(cfg.split), seed=cfg.train.seed)


def choose_format(template: str, loaded_chat, source: str):
    """The ChatFormat to train or prompt with: --template NAME (the model's own settings, such as its
    default system prompt, when it speaks that format), else the model's own, else alpaca."""
    from scratchllm.tokenizer.chat import FORMATS, pick_format

    fmt = pick_format(template, loaded_chat)
    if fmt is not None:
        return fmt
    print0(f"{source} does not record a chat format: using alpaca (the book's; --template picks another)")
    return FORMATS["alpaca"]


def add_format_tokens(model, tokenizer, fmt) -> list[str]:
    """Add the format's missing special tokens to the tokenizer and give them embedding rows (the mean
    of the old ones); returns the tokens added."""
    from scratchllm.model.vocab import grow_vocab
    from scratchllm.tokenizer.chat import missing_special_tokens

    missing = missing_special_tokens(fmt, tokenizer)
    if missing:
        first = tokenizer.add_special_tokens(missing)[0]
        grow_vocab(model, max(tokenizer.vocab_size, model.config.vocab_size), first_new=first)
    return missing


def encode(conv, fmt, tokenizer, mask_prompt: bool = True) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of a conversation in a format; errors name the record."""
    from scratchllm.data.instructions import for_format
    from scratchllm.tokenizer.chat import render_conversation

    try:
        ids, mask = render_conversation(for_format(conv, fmt.name), fmt, tokenizer)
    except ScratchError as e:
        raise ScratchError(f"{conv.where}: {e}") from None
    return ids, (mask if mask_prompt else [1] * len(ids))


class Encoded:
    """One split as (inputs, targets) pairs, with `collate(indices) -> batch` for the objective; with
    `packed`, the items are rows of several examples (data/collate.pack)."""

    def __init__(self, convs, fmt, tokenizer, max_length: int, pad_id: int, mask_prompt: bool = True,
                 packed: bool = False):
        from scratchllm.data.collate import lm_pair, pack

        self.pairs, self.convs = [], []
        self.cut = self.skipped = 0
        self.trained = self.tokens = 0
        for conv in convs:
            pair = lm_pair(*encode(conv, fmt, tokenizer, mask_prompt), max_length)
            if pair is None:
                self.skipped += 1
                continue
            self.cut += pair[2]
            self.pairs.append(pair[:2])
            self.convs.append(conv)
            self.tokens += len(pair[0])
            self.trained += sum(t >= 0 for t in pair[1])
        self.pad_id = pad_id
        self.rows = pack([len(p[0]) for p in self.pairs], max_length) if packed else [[i] for i in
                                                                                       range(len(self.pairs))]

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int]) -> dict:
        from scratchllm.data.collate import collate_lm

        return collate_lm([[self.pairs[j] for j in self.rows[i]] for i in indices], self.pad_id)

    def summary(self, max_length: int) -> str:
        s = f"{len(self.pairs)} examples, {self.tokens:,} tokens ({self.trained:,} trained)"
        if self.cut:
            s += f"; {self.cut} answers cut at --max-length {max_length}"
        if self.skipped:
            s += f"; {self.skipped} skipped (no answer token left within --max-length {max_length})"
        return s


def show_mask(convs, fmt, tokenizer, n: int, mask_prompt: bool = True, out=None) -> None:
    """Print n rendered examples with the trained tokens marked: green on a terminal, else in [[...]]."""
    out = out or sys.stdout
    color = out.isatty()
    on, off = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    for conv in convs[:n]:
        ids, mask = encode(conv, fmt, tokenizer, mask_prompt)
        text, start = [], 0
        for end in range(1, len(ids) + 1):  # one decode per stretch of equal mask (characters span tokens)
            if end == len(ids) or mask[end] != mask[start]:
                piece = tokenizer.decode(ids[start:end])
                text.append(on + piece + off if mask[start] else piece)
                start = end
        out.write(f"--- {conv.where}: {len(ids)} tokens, {sum(mask)} trained "
                  f"({'green' if color else 'inside [[ ]]'})\n{''.join(text)}\n")
    out.flush()


# --------------------------------------------------------------------------------------------- samples
@torch.no_grad()
def greedy(model, prompt: list[int], max_new: int, stop_ids: set[int]) -> list[int]:
    """Greedy continuation of one prompt with a KV cache (model: a GPT or the Trainer's view of it)."""
    from scratchllm.model.kv_cache import KVCache

    cfg = model.config
    room = cfg.block_size - len(prompt)
    max_new = min(max_new, room) if cfg.positions == "learned" else max_new
    if max_new <= 0:
        return []
    device = next(model.parameters()).device
    cache = KVCache(cfg, 1, len(prompt) + max_new, device=device, dtype=next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1]  # (1, V)
    out: list[int] = []
    for _ in range(max_new):
        t = int(logits.argmax(-1))
        if t in stop_ids:
            break
        out.append(t)
        logits = model(torch.tensor([[t]], device=device), kv_cache=cache)[:, -1]
    return out


def answer_prompt(conv, fmt, tokenizer) -> list[int]:
    """The ids a model answers the conversation's last question from: everything before its last
    assistant message, with the assistant's turn opened; errors name the record."""
    from scratchllm.data.instructions import for_format
    from scratchllm.tokenizer.chat import render

    messages = for_format(conv, fmt.name)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    try:
        return render(fmt, messages[:last], tokenizer)
    except ScratchError as e:
        raise ScratchError(f"{conv.where}: {e}") from None


def make_sampler(convs, fmt, tokenizer, n_tokens: int):
    """model -> the greedy answers to fixed validation instructions (a few of them), as one string."""
    from scratchllm.data.instructions import instruction_fields
    from scratchllm.infer.detok import Detokenizer
    from scratchllm.infer.engine import text_deltas
    from scratchllm.tokenizer.chat import turn_stops

    stop_ids, stop_texts = turn_stops(fmt, tokenizer)
    prompts = [(instruction_fields(conv)[0], answer_prompt(conv, fmt, tokenizer)) for conv in convs]

    def sample(model) -> str:
        was_training = model.training
        model.eval()
        answers = []
        for question, prompt in prompts:
            ids = greedy(model, prompt, n_tokens, set(stop_ids))
            answers.append(f"{question[:40]} -> {''.join(text_deltas(ids, Detokenizer(tokenizer, stop_texts)))}")
        model.train(was_training)
        return " | ".join(answers)
    return sample


# --------------------------------------------------------------------------------------------- the stage
def sft(cfg: SFTConfig, *, resume=None, overwrite: bool = False) -> dict:
    """Fine-tune as configured; returns the Trainer's summary."""
    from scratchllm.data.collate import ExampleBatches, in_order
    from scratchllm.data.instructions import to_record
    from scratchllm.model.lora import apply_lora, count_lora_parameters, lora_settings
    from scratchllm.train.core import Trainer
    from scratchllm.train.objectives import masked_lm_objective, perplexity
    from scratchllm.weights.checkpoint import open_model
    from scratchllm.weights.folder import write_adapter_files, write_state_files

    run = stage.start(cfg, resume=resume, overwrite=overwrite, resume_free=stage.RESUME_FREE | {"samples"})
    tc, out = cfg.train, run.out
    train, val, test = load_splits(cfg)
    loaded = open_model(cfg.model)
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    if tokenizer is None:
        raise ScratchError(f"--model {cfg.model} has no tokenizer: give a model folder that holds one")
    fmt = choose_format(cfg.template, loaded.chat, cfg.model)
    added = add_format_tokens(model, tokenizer, fmt) if cfg.add_tokens or fmt.name == "markers" else []
    new_rows_from = tokenizer.special_tokens[added[0]] if added else None
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0  # padded inputs are never attended to
    block = model.config.block_size
    max_length = min(cfg.max_length or block, block)
    splits = {name: Encoded(convs, fmt, tokenizer, max_length, pad_id, cfg.mask_prompt, cfg.pack and name == "train")
              for name, convs in (("train", train), ("val", val))}
    tr, va = splits["train"], splits["val"]
    for name, enc in splits.items():
        if not enc.pairs:
            raise ScratchError(f"no {name} example has a trained token within --max-length {max_length} "
                               f"({enc.skipped} skipped): raise --max-length or check the data")

    lora = None
    if cfg.lora_rank:
        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets))
        if added:  # new tokens need trained rows: the embedding (and an untied head) train with the adapters
            model.transformer.wte.weight.requires_grad_(True)
            model.lm_head.weight.requires_grad_(True)
        lora = lora_settings(model)
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    mcfg = model.config
    also_trained = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n) if lora else []

    def write_model(folder: Path, state: dict) -> None:
        if lora:
            write_adapter_files(folder, state, base, lora, mcfg, tokenizer, chat=fmt, also_trained=also_trained,
                                new_rows_from=new_rows_from)
        else:
            write_state_files(folder, state, mcfg, tokenizer, chat=fmt)

    if cfg.pack and len(tr) < tc.batch_size * run.world:
        raise ScratchError(f"--pack made {len(tr)} rows of up to {max_length} tokens from {len(tr.pairs)} examples, "
                           f"fewer than one global batch of {tc.batch_size * run.world} rows: lower --max-length or "
                           "--batch-size")
    batches = ExampleBatches(len(tr), tc.batch_size, tr.collate, seed=tc.seed, rank=run.rank, world_size=run.world)
    stage.steps_for_epochs(tc, batches.batches_per_epoch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"model": cfg.model, "template": fmt.name + (f" (added special tokens {', '.join(added)})" if added else ""),
            "trainable": f"{trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters"
                         + (f" ({count_lora_parameters(model):,} in LoRA adapters, rank {cfg.lora_rank}"
                            + (", plus the embedding" if added else "") + ")" if lora else ""),
            "data": f"{cfg.data}: {len(train)} train / {len(val)} val / {len(test)} test records",
            "train": tr.summary(max_length) + (f" in {len(tr)} packed rows" if cfg.pack else ""),
            "val": va.summary(max_length),
            "loss on": "the assistant's answers" if cfg.mask_prompt else "every token (--no-mask-prompt)",
            "epochs": f"{tc.epochs} ({tc.max_steps} steps of {tc.batch_size * tc.grad_accum * run.world}"
                      f"{' packed rows' if cfg.pack else ' examples'})"
            if tc.epochs else f"{tc.max_steps} steps"}
    sample_fn = make_sampler(va.convs[:cfg.samples], fmt, tokenizer, tc.sample_tokens) if cfg.samples else None
    trainer = Trainer(model, tc, masked_lm_objective, batches, out_dir=out,
                      val_batches=lambda: in_order(len(va), tc.batch_size, va.collate), sample_fn=sample_fn,
                      write_model=write_model, info=info, save="trainable" if lora else "all",
                      derived_metrics=perplexity, count_label="trained tok/s")
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    stage.write_config(run)
    if run.rank == 0:
        atomic_write_text(out / TEST_FILE, "".join(json.dumps(to_record(c), ensure_ascii=False) + "\n" for c in test))
    for name in ("train", "val"):
        print0(f"{name}: {info[name]}")
    print0(f"fine-tuning {cfg.model} on instructions ({fmt.name} format): {info['trainable']}; "
           f"{trainer.precision} on {trainer.device}; run folder {out}")
    summary = trainer.fit()
    summary["exit_code"] = stage.finish(summary)
    return summary


# --------------------------------------------------------------------------------------------- commands
def run(args) -> int:
    """`scratchllm sft ...` (or `--show-mask N`: print rendered examples and stop)."""
    if getattr(args, "show_mask", None):
        return run_show_mask(args)
    cfg = stage.config_from_args(SFTConfig, args, FLAGS)
    summary = sft(cfg, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
    if summary["interrupted"]:
        return summary["exit_code"]
    val = summary["val"] or {}
    print0(f"done: step {summary['step']}" + (f", val loss {val['loss']:.4f}" if "loss" in val else "")
           + f"; outputs in {cfg.out}. Next: scratchllm chat --model {cfg.out}, or scratchllm eval generate "
             f"--model {cfg.out} --out {cfg.out}/responses.jsonl")
    return summary["exit_code"]


def run_show_mask(args) -> int:
    from scratchllm.data.instructions import read_conversations
    from scratchllm.weights.checkpoint import open_model

    if not args.model or not args.data:
        raise ScratchError("--show-mask needs --model (its tokenizer) and --data")
    loaded = open_model(args.model)
    if loaded.tokenizer is None:
        raise ScratchError(f"--model {args.model} has no tokenizer")
    fmt = choose_format(args.template or "", loaded.chat, args.model)
    if args.add_tokens or fmt.name == "markers":
        add_format_tokens(loaded.model, loaded.tokenizer, fmt)
    show_mask(read_conversations(args.data), fmt, loaded.tokenizer, args.show_mask,
              args.mask_prompt is not False)
    return 0
