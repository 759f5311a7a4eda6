"""The `scratchllm` command line: argparse subcommands, each mapped to one plain function of a stage.

No logic lives here: every handler imports its stage lazily (so `--help` is instant and does not load
torch) and calls it with the parsed arguments. User errors (`ScratchError`) print as `error: ...` and
exit with status 2; Ctrl-C exits with 130.

    scratchllm --help
    scratchllm tokenizer train --input book.txt --vocab-size 4096 --out tok/
"""

from __future__ import annotations

import argparse
import sys
import warnings

from scratchllm import __version__
from scratchllm.common import ScratchError


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (a 0 in a TOML file may mean "the default"; on the
    command line it is a mistake)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


# --------------------------------------------------------------------------------------------- tokenizer
def _tok_train(args):
    from scratchllm.tokenizer.commands import train

    return train(args)


def _tok_encode(args):
    from scratchllm.tokenizer.commands import encode

    return encode(args)


def _tok_decode(args):
    from scratchllm.tokenizer.commands import decode

    return decode(args)


def _tok_stats(args):
    from scratchllm.tokenizer.commands import stats

    return stats(args)


def add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train, inspect and use byte-level BPE tokenizers")
    tsub = p.add_subparsers(dest="tokenizer_cmd", required=True, metavar="ACTION")
    tok_help = "a tokenizer folder (saved by `tokenizer train`) or `gpt2`"

    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, metavar="PATH", help="text files or folders")
    t.add_argument("--vocab-size", type=int, required=True, help="final vocabulary size, specials included")
    t.add_argument("--out", required=True, help="output tokenizer folder (must not exist unless --overwrite)")
    t.add_argument("--special", nargs="*", default=["<|endoftext|>"], metavar="TOK",
                   help="special tokens (default: <|endoftext|>)")
    t.add_argument("--pattern", default="gpt2", choices=["gpt2", "gpt4"], help="pre-tokenization regex")
    t.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="what to do with bytes that are not UTF-8 (default: stop and name the file/offset)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=_tok_train)

    e = tsub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("--tokenizer", required=True, help=tok_help)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("text", nargs="?", help="text to encode")
    src.add_argument("--file", help="encode this file instead")
    e.add_argument("--pieces", action="store_true", help="show each token's text instead of bare ids")
    e.add_argument("--allow-special", action="store_true", help="encode special tokens found in the text")
    e.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="bytes of --file that are not UTF-8: stop and name the offset, or replace them")
    e.set_defaults(func=_tok_encode)

    d = tsub.add_parser("decode", help="print the text of token ids")
    d.add_argument("--tokenizer", required=True, help=tok_help)
    d.add_argument("ids", nargs="+", type=int, help="token ids")
    d.set_defaults(func=_tok_decode)

    s = tsub.add_parser("stats", help="bytes per token and tokens per word on a file (vs GPT-2)")
    s.add_argument("--tokenizer", required=True, help=tok_help)
    s.add_argument("--file", required=True, nargs="+", help="text file(s) to measure")
    s.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="bytes that are not UTF-8: stop and name the file and offset, or replace them")
    s.set_defaults(func=_tok_stats)


# --------------------------------------------------------------------------------------------- data
def _prepare(args):
    from scratchllm.data.shards import run

    return run(args)


def _data_list(args):
    from scratchllm.data.registry import list_cmd

    return list_cmd(args)


def _data_get(args):
    from scratchllm.data.registry import get_cmd

    return get_cmd(args)


def add_data(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize text into train/val token shards (parallel tokenization)")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="files, folders, globs, .jsonl, .parquet, builtin:pydocs, data:NAME or hf:NAME[:SPLIT]")
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder or `gpt2`")
    p.add_argument("--out", required=True, help="output shard folder (must not exist unless --overwrite)")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents for validation")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--text-field", default="text", help="JSONL/Parquet/HF field holding the text")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"],
                   help="bytes that are not UTF-8: stop and name file/offset, or replace with U+FFFD")
    p.add_argument("--strip-gutenberg", action="store_true", help="cut Project Gutenberg headers/footers")
    p.add_argument("--min-chars", type=int, default=0, help="drop documents shorter than this")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    p.add_argument("--keep-crlf", action="store_true", help="do not turn CRLF line endings into LF")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_prepare)

    d = sub.add_parser("data", help="list and download the registered datasets (sha256-checked)")
    dsub = d.add_subparsers(dest="data_cmd", required=True, metavar="ACTION")
    lst = dsub.add_parser("list", help="the registered datasets, their size and licence")
    lst.set_defaults(func=_data_list)
    g = dsub.add_parser("get", help="download datasets into the cache (SCRATCHLLM_CACHE), honouring SCRATCHLLM_MIRROR")
    g.add_argument("names", nargs="+", metavar="NAME", help="dataset names from `data list`, or `all`")
    g.add_argument("--dest", help="also copy the file(s) into this folder")
    g.add_argument("--force", action="store_true", help="download again even when the cached file is good")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_data_get)


# --------------------------------------------------------------------------------------------- pretrain
def _pretrain(args):
    from scratchllm.train.pretrain import run

    return run(args)


def add_run_flags(g) -> None:
    """--out, --config, --resume, --overwrite: how every training stage finds and treats its run folder."""
    g.add_argument("--out", help="run folder (checkpoints, metrics.jsonl, loss.png, report.md, best/)")
    g.add_argument("--config", help="a TOML file of settings (flags override it)")
    g.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue the run in --out (or from this checkpoint / run folder)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out (only a run folder)")


def add_train_flags(p) -> None:
    """The Trainer's flags, the same for every stage: each sets the TrainConfig field of its name
    (`--max-steps` -> train.max_steps); a flag not given leaves the TOML / default value."""
    t = p.add_argument_group("training (defaults in `scratchllm.configs.TrainConfig`)")
    for flag, typ, hlp in [
        ("--max-steps", int, "optimizer steps (alone: replaces a stage's default --epochs)"), ("--epochs", int, "passes over the training data (sets max-steps)"),
        ("--batch-size", int, "items per micro-batch per process"),
        ("--grad-accum", int, "micro-batches per step"), ("--batch-tokens", int, "global batch in tokens (sets grad-accum)"),
        ("--lr", float, "peak learning rate"), ("--min-lr", float, "floor of the decay"),
        ("--warmup-steps", int, "linear warmup steps"), ("--weight-decay", float, "AdamW weight decay"),
        ("--beta1", float, "AdamW beta1"), ("--beta2", float, "AdamW beta2"),
        ("--grad-clip", float, "max gradient norm (0: off)"), ("--eval-every", int, "steps between evaluations"),
        ("--eval-batches", int, "validation batches per evaluation (0: all)"),
        ("--best-metric", str, "validation metric that picks RUN_DIR/best/ ('': none)"),
        ("--patience", int, "stop after this many evaluations without a better best-metric (0: never)"),
        ("--sample-every", int, "steps between samples"),
        ("--sample-prompt", str, "prompt of the samples"), ("--sample-tokens", int, "tokens per sample"),
        ("--checkpoint-every", int, "steps between checkpoints"), ("--keep-last", int, "checkpoints kept"),
        ("--log-every", int, "steps between metrics lines"), ("--max-bad-steps", int, "non-finite steps in a row that abort"),
        ("--seed", int, "random seed"), ("--device", str, "auto, cpu, cuda, cuda:N, mps"),
    ]:
        t.add_argument(flag, type=typ, help=hlp)
    t.add_argument("--best-mode", choices=["min", "max"], help="is a lower or a higher best-metric better")
    t.add_argument("--schedule", choices=["cosine", "linear", "constant"], help="learning-rate schedule")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where fast")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA)")
    t.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None,
                   help="deterministic algorithms only (bit-exact resume on GPUs)")


def add_pretrain(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a GPT on token shards (DDP/FSDP under torchrun)")
    g = p.add_argument_group("data, model and output")
    g.add_argument("--data", help="a shard folder (from `scratchllm prepare`)")
    g.add_argument("--input", nargs="+", metavar="SRC", help="or raw sources: prepared into OUT/shards first")
    g.add_argument("--tokenizer", help="tokenizer folder or `gpt2` (default: the --model folder's or the shards')")
    g.add_argument("--model-preset", help="train from scratch: tiny, small, gpt2, ...")
    g.add_argument("--model", help="or continue training a model: " + MODEL_HELP)
    g.add_argument("--block-size", type=positive_int, help="context length (default: the model's)")
    g.add_argument("--sampler", choices=["random", "sliding"],
                   help="random windows (default) or the book's fixed windows, reshuffled every epoch")
    g.add_argument("--stride", type=positive_int,
                   help="with --sampler sliding: tokens between window starts (default: block size)")
    g.add_argument("--eval-train", action=argparse.BooleanOptionalAction, default=None,
                   help="at each evaluation also measure the loss on training windows (eval mode, as the book)")
    g.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="shard with FSDP2 under torchrun (default: DDP)")
    g.add_argument("--lora-rank", type=positive_int,
                   help="with --model: train LoRA adapters of this rank only (saved alone; `merge` folds them in)")
    g.add_argument("--lora-alpha", type=float, help="the adapters' scale alpha: the update is alpha/r B A (default 16)")
    g.add_argument("--lora-targets", nargs="+", metavar="NAME",
                   help="Linear layers to adapt (default c_attn attn.c_proj mlp.c_fc mlp.c_proj)")
    add_run_flags(g)
    m = p.add_argument_group("a new model's shape (with --model-preset; any ModelConfig field in [model_overrides])")
    m.add_argument("--init", choices=["gpt2", "torch"],
                   help="gpt2: normal(0.02) + scaled residual projections (default); torch: PyTorch's defaults (the book)")
    m.add_argument("--dropout", type=float, help="dropout rate (default 0)")
    m.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="share the token embedding with the output head (default: tied, as GPT-2)")
    m.add_argument("--bias", action=argparse.BooleanOptionalAction, default=None,
                   help="biases in Linear layers and norms (default: on, as GPT-2)")
    add_train_flags(p)
    p.set_defaults(func=_pretrain)


# --------------------------------------------------------------------------------------------- model + weights
MODEL_HELP = ("a model folder, a run folder (newest checkpoint), a Hugging Face folder, a .gguf file or a "
              "model name such as smollm2-135m-instruct (`scratchllm model list`)")


def _model_list(args):
    from scratchllm.weights.commands import model_list

    return model_list(args)


def _model_info(args):
    from scratchllm.weights.commands import model_info

    return model_info(args)


def _download(args):
    from scratchllm.weights.commands import download

    return download(args)


def _export(args):
    from scratchllm.weights.commands import export

    return export(args)


def add_model(sub) -> None:
    p = sub.add_parser("model", help="inspect model sizes: parameters, FLOPs, memory")
    msub = p.add_subparsers(dest="model_cmd", required=True, metavar="ACTION")
    i = msub.add_parser("info", help="parameters, bytes, FLOPs/token, training and inference memory")
    i.add_argument("--preset", help="a preset name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, small)")
    i.add_argument("--model", help=MODEL_HELP + " (reads the config only)")
    i.add_argument("--batch", type=int, default=1, help="batch size for the memory estimates (default 1)")
    i.add_argument("--block", type=int, default=None, help="sequence length (default: the model's block_size)")
    i.set_defaults(func=_model_info)
    ls = msub.add_parser("list", help="the open-weight models known by name, and where each is available")
    ls.set_defaults(func=_model_list)


def add_download(sub) -> None:
    p = sub.add_parser("download", help="download pretrained weights from the Hugging Face hub ($SCRATCHLLM_MIRROR)")
    p.add_argument("name", help="gpt2, or a model name from `scratchllm model list` (imported into the cache)")
    p.add_argument("--size", default="124M", choices=["124M", "355M", "774M", "1558M"], help="GPT-2 size")
    p.add_argument("--dest", help="gpt2's target folder (default: $SCRATCHLLM_CACHE/models/<repo>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_download)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a model to another format (hf: a transformers GPT-2/Llama/Qwen2 folder)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--format", default="hf", choices=["hf"], help="output format (default hf)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=_export)


# --------------------------------------------------------------------------------------------- classify
def _lora_flags(g, what: str = "train LoRA adapters of this rank instead of every weight") -> None:
    """--lora-rank/alpha/dropout/targets, the same for classify, sft, reward, dpo and ppo."""
    g.add_argument("--lora-rank", type=positive_int, help=what)
    g.add_argument("--lora-alpha", type=float, help="adapter scale alpha, the update is alpha/r B A (default 16)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    g.add_argument("--lora-targets", nargs="+", metavar="NAME",
                   help="Linear layers to adapt (default c_attn attn.c_proj mlp.c_fc mlp.c_proj)")


def _classify_train(args):
    from scratchllm.train.classify import run

    return run(args)


def _classify_eval(args):
    from scratchllm.train.classify import run_eval

    return run_eval(args)


def _classify_predict(args):
    from scratchllm.train.classify import run_predict

    return run_predict(args)


def _merge(args):
    from scratchllm.infer.merge import merge_cmd

    return merge_cmd(args)


CLASSIFIER_HELP = "a classify run folder (its best/ model), one of its checkpoints, or a merged classifier"


def add_classify(sub) -> None:
    p = sub.add_parser("classify", help="fine-tune a model into a text classifier (spam or not spam), evaluate, predict")
    csub = p.add_subparsers(dest="classify_cmd", required=True, metavar="ACTION")
    t = csub.add_parser("train", help="fine-tune --model on labelled texts (evaluates at each epoch's end by default)",
                        description="Training defaults are the book's chapter 6 (scratchllm.configs."
                                    "classify_train_defaults): AdamW lr 5e-5, weight decay 0.1, batch 8, 5 epochs, "
                                    "constant lr, an evaluation of the whole validation set at each epoch's end "
                                    "(--eval-every 0), best/ by validation accuracy.")
    g = t.add_argument_group("model, data and output")
    g.add_argument("--model", help="the pretrained model: " + MODEL_HELP)
    g.add_argument("--data", help="labelled texts: .tsv/.csv (label, text; or a header naming the fields), .jsonl, "
                                  "or data:sms-spam")
    g.add_argument("--val-data", help="a separate validation file (with --test-data; instead of --split)")
    g.add_argument("--test-data", help="a separate test file")
    g.add_argument("--text-field", help="the text field / column (default text)")
    g.add_argument("--label-field", help="the label field / column (default label)")
    g.add_argument("--balance", action=argparse.BooleanOptionalAction, default=None,
                   help="undersample every class to the smallest (the book: 747 spam + 747 ham)")
    g.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of --data (default 0.7 0.1 0.2), shuffled by --seed")
    g.add_argument("--max-length", type=int, help="tokens per text, longer ones cut (default: the model's block_size)")
    g.add_argument("--truncate", choices=["right", "left"], help="cut long texts at the right (keep the start, "
                                                                 "default) or at the left (keep the end)")
    g.add_argument("--pool", choices=["last", "mean"], help="classify the last real token (default) or the mean")
    g.add_argument("--train", dest="trainable", choices=["head", "last-block", "all", "lora"],
                   help="what trains: the head only, head + last blocks + final norm (default), all, or LoRA + head")
    g.add_argument("--train-blocks", type=positive_int, help="with --train last-block: how many blocks (default 1)")
    _lora_flags(g, "with --train lora: adapter rank (default 16)")
    add_run_flags(g)
    add_train_flags(t)
    t.set_defaults(func=_classify_train)
    for name, func, hlp in (("eval", _classify_eval, "accuracy, per-class precision/recall/F1, confusion matrix"),
                            ("predict", _classify_predict, "label and probability of each text")):
        c = csub.add_parser(name, help=hlp)
        c.add_argument("--model", required=True, help=CLASSIFIER_HELP)
        c.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass (default 16)")
        c.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                       help="fp32 (default) or bf16 autocast where the hardware has it (auto)")
        c.set_defaults(func=func)
        if name == "eval":
            c.add_argument("--data", help="labelled texts to evaluate on (default: the run's own held-out test split)")
            c.add_argument("--text-field", default="text", help="the text field / column (default text)")
            c.add_argument("--label-field", default="label", help="the label field / column (default label)")
            c.add_argument("--errors", type=int, default=0, metavar="N", help="print the N most confident mistakes")
            c.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
            c.add_argument("--png", help="where the confusion-matrix PNG goes (default: beside the run)")
        else:
            c.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
            c.add_argument("--file", help="or a file of texts, one per line")


def add_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA run's adapters into its base model: a full model folder")
    p.add_argument("--model", required=True, help="a LoRA run or checkpoint (a language model or a classifier)")
    p.add_argument("--out", required=True, help="the merged model's folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out model folder")
    p.set_defaults(func=_merge)


# --------------------------------------------------------------------------------------------- sft + eval
def _sft(args):
    from scratchllm.train.sft import run

    return run(args)


def _eval_generate(args):
    from scratchllm.eval.responses import run_generate

    return run_generate(args)


def _eval_judge(args):
    from scratchllm.eval.judge import run_judge

    return run_judge(args)


def _eval_loss(args):
    from scratchllm.eval.responses import run_loss

    return run_loss(args)


TEMPLATES = ["alpaca", "chatml", "llama3", "phi3", "markers"]  # tokenizer/chat.py NAMES (not imported: --help stays fast)


def add_sft(sub) -> None:
    p = sub.add_parser("sft", help="instruction fine-tuning (full or LoRA) with the loss on the answers only",
                       description="Training defaults are the book's chapter 7 (scratchllm.configs.sft_train_defaults): "
                                   "AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs, constant lr, the masked "
                                   "validation loss every 25 steps, best/ by it, sample answers every 50 steps.")
    g = p.add_argument_group("model, data and output")
    g.add_argument("--model", help="the pretrained model: " + MODEL_HELP)
    g.add_argument("--data", help="instruction records: a .json array or .jsonl of {instruction, input, output} or "
                                  "{messages: [...]}, or data:instruction-data (the book's 1100)")
    g.add_argument("--val-data", help="a separate validation file (with --test-data; instead of --split)")
    g.add_argument("--test-data", help="a separate test file")
    g.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of --data (default 0.85 0.05 0.10, the book's), shuffled by --seed")
    g.add_argument("--template", choices=TEMPLATES,
                   help="chat format (default: the model's own, else alpaca); markers adds <|system|> <|user|> "
                        "<|assistant|> <|end|> as special tokens")
    g.add_argument("--add-tokens", action=argparse.BooleanOptionalAction, default=None,
                   help="add the template's special tokens the tokenizer lacks (the embedding grows; new rows "
                        "start as the mean of the old)")
    g.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=None,
                   help="loss on the assistant's answers only (default); --no-mask-prompt: on every token")
    g.add_argument("--max-length", type=int, help="tokens per example, longer ones cut and counted "
                                                  "(default: the model's block_size)")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=None,
                   help="pack several examples into rows of --max-length tokens (attention never crosses between "
                        "them; --batch-size then counts rows)")
    _lora_flags(g)
    g.add_argument("--samples", type=int, help="validation instructions answered at each --sample-every (default 2)")
    g.add_argument("--show-mask", type=positive_int, metavar="N",
                   help="print N rendered training examples with the trained tokens marked, then stop")
    add_run_flags(g)
    add_train_flags(p)
    p.set_defaults(func=_sft)


# --------------------------------------------------------------------------------------------- preference tuning
def _reward_train(args):
    from scratchllm.train.reward import run

    return run(args)


def _reward_score(args):
    from scratchllm.train.reward import run_score

    return run_score(args)


def _dpo(args):
    from scratchllm.train.dpo import run

    return run(args)


def _ppo(args):
    from scratchllm.train.ppo import run

    return run(args)


PAIRS_HELP = ("preference records: a .json array or .jsonl of {instruction, input, chosen, rejected} (or prompt / "
              "messages instead of instruction), or data:instruction-data-with-preference (the book's 1100)")


def _pair_data_flags(g) -> None:
    g.add_argument("--data", help=PAIRS_HELP)
    g.add_argument("--val-data", help="a separate validation file (with --test-data; instead of --split)")
    g.add_argument("--test-data", help="a separate test file")
    g.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of --data (default 0.85 0.05 0.10, the book's), shuffled by --seed")
    g.add_argument("--template", choices=TEMPLATES, help="chat format (default: the model's own, else alpaca)")
    g.add_argument("--max-length", type=int, help="tokens per prompt + answer, longer ones cut and counted "
                                                  "(default: the model's block_size)")


def add_reward(sub) -> None:
    p = sub.add_parser("reward", help="train a reward model on preference pairs (RLHF's first half), score answers")
    rsub = p.add_subparsers(dest="reward_cmd", required=True, metavar="ACTION")
    t = rsub.add_parser("train", help="a scalar head on --model, trained with the Bradley-Terry loss",
                        description="Defaults (scratchllm.configs.reward_train_defaults): AdamW lr 3e-5, batch 8 pairs, "
                                    "1 epoch, linear decay, every weight trains, validation "
                                    "every 25 steps, best/ by validation pairwise accuracy; at the end best/'s "
                                    "rewards are normalised to mean 0 / std 1 on the training answers.")
    g = t.add_argument_group("model, data and output")
    g.add_argument("--model", help="the backbone: an sft run's best/, or " + MODEL_HELP)
    _pair_data_flags(g)
    g.add_argument("--center-coef", type=float, help="weight of (r_chosen + r_rejected)^2 in the loss (default 0)")
    g.add_argument("--train", dest="trainable", choices=["head", "last-block", "all", "lora"],
                   help="what trains besides the head: all (default), the last blocks + final norm, nothing, LoRA")
    g.add_argument("--train-blocks", type=positive_int, help="with --train last-block: how many blocks (default 1)")
    _lora_flags(g, "with --train lora: adapter rank (default 16)")
    add_run_flags(g)
    add_train_flags(t)
    t.set_defaults(func=_reward_train)
    c = rsub.add_parser("score", help="score preference pairs (accuracy, margin) or prompt + response records")
    c.add_argument("--model", required=True, help="a reward run folder (its best/) or a reward model folder")
    c.add_argument("--data", help="pairs (chosen + rejected) or records with a prompt and a response (or output) "
                                  "field (default: the run's held-out test.jsonl)")
    c.add_argument("--out", help="write the scores as JSONL here")
    c.add_argument("--json", action="store_true", help="print one JSON summary line")
    c.add_argument("--batch-size", type=positive_int, default=16, help="texts per forward pass (default 16)")
    c.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32",
                   help="fp32 (default) or bf16 autocast where the hardware has it (auto)")
    c.set_defaults(func=_reward_score)


def add_dpo(sub) -> None:
    p = sub.add_parser("dpo", help="direct preference optimisation of an SFT model on preference pairs",
                       description="Defaults are the book's chapter 7 (scratchllm.configs.dpo_train_defaults): beta "
                                   "0.1, AdamW lr 5e-6, weight decay 0.01, batch 8 pairs, 1 epoch, constant lr, the "
                                   "validation pairs every 20 steps, best/ by validation loss. Rewards are printed "
                                   "as beta * (log pi - log ref).")
    g = p.add_argument_group("model, data and output")
    g.add_argument("--model", help="the starting policy and reference: an sft run's best/, or " + MODEL_HELP)
    _pair_data_flags(g)
    g.add_argument("--beta", type=float, help="DPO's beta (IPO's tau): the pull towards the reference (default 0.1)")
    g.add_argument("--loss", choices=["sigmoid", "ipo"], help="sigmoid: DPO (default); ipo: the squared IPO loss")
    g.add_argument("--label-smoothing", type=float, help="assumed share of flipped labels (conservative DPO)")
    g.add_argument("--logp-mean", action=argparse.BooleanOptionalAction, default=None,
                   help="average each answer's log-probs over its tokens (the book) instead of summing them")
    g.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=None,
                   help="compute the reference log-probs once (cached in the run folder) and load no reference "
                        "model")
    _lora_flags(g, "train LoRA adapters of this rank (the reference: the model with them off)")
    g.add_argument("--samples", type=int, help="validation prompts answered at each --sample-every (default 2)")
    add_run_flags(g)
    add_train_flags(p)
    p.set_defaults(func=_dpo)


def add_ppo(sub) -> None:
    p = sub.add_parser("ppo", help="RLHF: PPO of an SFT policy against a reward model or a rule, KL-penalised",
                       description="--max-steps counts rollout batches of --batch-size prompts. Defaults (scratchllm."
                                   "configs.ppo_train_defaults and PPOConfig): 40 rollout batches of 8 prompts, lr 1e-5, "
                                   "4 PPO epochs of mini-batches of 4, k1 KL penalty 0.05, GAE gamma 1 lambda 0.95, "
                                   "held-out prompts scored every 10 rollout batches, best/ by that score.")
    g = p.add_argument_group("policy, reward, prompts and output")
    g.add_argument("--model", help="the starting policy and reference: an sft run's best/, or " + MODEL_HELP)
    g.add_argument("--reward-model", help="a `scratchllm reward train` run (its best/)")
    g.add_argument("--reward", metavar="MODULE:FN", help="or a rule: FN(prompt, response) -> float from MODULE on the "
                                                         "Python path (e.g. scratchllm.train.rules:short_answer)")
    g.add_argument("--retokenize", action=argparse.BooleanOptionalAction, default=None,
                   help="let a reward model with another tokenizer score the decoded responses")
    g.add_argument("--prompts", help="JSONL with a prompt field, chat JSONL (messages), or the book's instruction "
                                     "JSON (data:instruction-data)")
    g.add_argument("--split", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="fractions of --prompts (default 0.85 0.05 0.10); validation prompts are the held-out ones")
    g.add_argument("--template", choices=TEMPLATES, help="chat format (default: the model's own, else alpaca)")
    g.add_argument("--max-length", type=int, help="prompt tokens kept (default: block_size - max-new-tokens - 1)")
    g.add_argument("--max-new-tokens", type=positive_int, help="response length cap (default 48)")
    g.add_argument("--temperature", type=float, help="of the rollouts and their log-probs (default 1)")
    g.add_argument("--missing-eos-penalty", type=float, help="subtracted from the score of a response that never "
                                                             "ends its turn (default 1)")
    g.add_argument("--kl-coef", type=float, help="per-token KL penalty coefficient (default 0.05)")
    g.add_argument("--kl-kind", choices=["k1", "k3"], help="KL estimator per token (default k1)")
    g.add_argument("--target-kl", type=float, help="adapt --kl-coef towards this KL per response (default 0: fixed)")
    g.add_argument("--kl-horizon", type=positive_int, help="responses over which the adaptive KL acts (default 10000)")
    g.add_argument("--max-kl", type=float, help="stop when the KL per response exceeds this (default 20)")
    g.add_argument("--gamma", type=float, help="GAE discount (default 1)")
    g.add_argument("--lam", type=float, help="GAE lambda (default 0.95)")
    g.add_argument("--ppo-epochs", type=positive_int, help="passes over each rollout batch (default 4)")
    g.add_argument("--mini-batch-size", type=positive_int, help="responses per optimizer step (default 4)")
    g.add_argument("--clip-range", type=float, help="policy ratio clip (default 0.2)")
    g.add_argument("--value-clip", type=float, help="value clip (default 0.2)")
    g.add_argument("--vf-coef", type=float, help="weight of the value loss (default 0.1)")
    g.add_argument("--value-head", choices=["shared", "separate"],
                   help="a value head on the policy (default) or a separate value network")
    g.add_argument("--value-init", choices=["zero", "reward"],
                   help="start the separate value network from the reward model, or a zero head (default)")
    g.add_argument("--whiten-rewards", action=argparse.BooleanOptionalAction, default=None,
                   help="whiten the per-token rewards of each batch before GAE")
    _lora_flags(g, "train LoRA adapters of this rank (the reference: the policy with them off)")
    g.add_argument("--eval-prompts", type=int, help="held-out prompts answered and scored per evaluation (default 32)")
    g.add_argument("--samples", type=int, help="held-out answers shown in the report per evaluation (default 3)")
    add_run_flags(g)
    add_train_flags(p)
    p.set_defaults(func=_ppo)


def _eval_model_flags(c) -> None:
    c.add_argument("--model", required=True, help="an sft run folder, a checkpoint, or " + MODEL_HELP)
    c.add_argument("--data", help="instruction records (default: the run's held-out test.jsonl)")
    c.add_argument("--template", choices=TEMPLATES, help="chat format (default: the model's own, else alpaca)")
    c.add_argument("--batch-size", type=positive_int, default=8, help="examples per forward pass (default 8)")
    c.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    c.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 where the hardware is fast at it, else fp32")


def add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate an instruction-tuned model: generate answers, masked loss, LLM judge")
    esub = p.add_subparsers(dest="eval_cmd", required=True, metavar="ACTION")
    g = esub.add_parser("generate", help="answer every test instruction (batched, greedy by default) into a JSONL file")
    _eval_model_flags(g)
    g.add_argument("--out", required=True, help="the responses file (.jsonl) `eval judge` scores")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--limit", type=int, default=0, help="only the first N records (default: all)")
    g.add_argument("--show", type=int, default=3, help="print the first N answers beside the references (default 3)")
    g.set_defaults(func=_eval_generate)
    los = esub.add_parser("loss", help="mean masked loss / perplexity of the reference answers")
    _eval_model_flags(los)
    los.add_argument("--max-length", type=int, default=0, help="tokens per example (default: block_size)")
    los.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True,
                     help="loss on the answers only (default); --no-mask-prompt: on every token")
    los.add_argument("--json", action="store_true", help="print one JSON object")
    los.set_defaults(func=_eval_loss)
    j = esub.add_parser("judge", help="score each response 0-100 with an LLM judge on any OpenAI-compatible endpoint",
                        description="The book's judge prompt (ch. 7): given the input and the correct output, score "
                                    "the model response 0-100, reply with the integer only. Replies are cached as "
                                    "they arrive: a rerun asks only for what is not scored yet.")
    j.add_argument("responses", help="responses JSONL from `scratchllm eval generate`")
    j.add_argument("--judge-url", required=True,
                   help="OpenAI-compatible server: http://host:port, .../v1 or .../chat/completions")
    j.add_argument("--judge-model", required=True, help="model name the judge server serves (sent as \"model\")")
    j.add_argument("--out", help="scores JSONL (default: <responses stem>.scores.jsonl beside it)")
    j.add_argument("--cache", help="reply cache, resumable (default: <responses stem>.judge-cache.jsonl beside it)")
    j.add_argument("--report", help="Markdown report; the PNG goes beside it (default: <responses stem>.judge.md)")
    j.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one reply (default 60)")
    j.add_argument("--retries", type=int, default=3,
                   help="retries per request on connection errors, timeouts, HTTP 429 and 5xx (default 3)")
    j.add_argument("--workers", type=int, default=1, help="requests in flight at once (default 1)")
    j.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each judge reply (default 16)")
    j.add_argument("--api-key", help="sent as Authorization: Bearer (default: $OPENAI_API_KEY)")
    j.set_defaults(func=_eval_judge)


# --------------------------------------------------------------------------------------------- generate
def _generate(args):
    from scratchllm.infer.commands import generate

    return generate(args)


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a model (sampling, stop strings, streaming)")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--tokenizer", help="tokenizer folder or `gpt2`, when the model folder has no tokenizer/")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text to continue (`-` reads it from stdin)")
    what.add_argument("--chat", metavar="MESSAGE",
                      help="a user message, answered in the model's chat format (`-` reads it from stdin)")
    p.add_argument("--system", help="with --chat: the system prompt (default: the model's own, if any)")
    p.add_argument("--chat-format", choices=TEMPLATES,
                   help="with --chat: the chat format (default: the model's own)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="most tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; default 1.0")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (e.g. 1.2)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop before this text (repeatable; escapes like \\n work)")
    p.add_argument("--ignore-eot", action="store_true", help="do not stop at <|endoftext|>")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--no-truncate", action="store_true",
                   help="error out on a prompt longer than block_size instead of keeping its end")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    add_weights_args(p)
    p.set_defaults(func=_generate)


def add_weights_args(p) -> None:
    """--precision and --weights of the decoding commands (generate, chat, serve)."""
    from scratchllm.infer.commands import PRECISION_HELP, WEIGHTS_HELP

    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help=PRECISION_HELP)
    p.add_argument("--weights", default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"], help=WEIGHTS_HELP)


# --------------------------------------------------------------------------------------------- chat
def _chat(args):
    from scratchllm.infer.repl import chat

    return chat(args)


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model in its chat format (a terminal REPL; --message or stdin for scripts)",
                       description="Commands: /system TEXT, /reset, /temperature X, /help, /exit. Ctrl-C stops the "
                                   "current answer; Ctrl-C or Ctrl-D at the prompt leaves.")
    p.add_argument("--model", required=True, help="an sft run folder, a checkpoint, or " + MODEL_HELP)
    p.add_argument("--chat-format", choices=TEMPLATES,
                   help="the chat format (default: the model's own; naming the model's own keeps its system prompt)")
    p.add_argument("--system", help="initial system prompt (default: the chat format's own, if any)")
    p.add_argument("--message", action="append", metavar="TEXT",
                   help="answer this message, then exit (repeatable; stdin is not read)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy; default 0.7 (/temperature changes it)")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with probability >= p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top token's probability")
    p.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats (e.g. 1.2)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling (each answer is drawn with it)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    add_weights_args(p)
    p.add_argument("--verbose", action="store_true", help="print tokens and tokens/s of each answer on stderr")
    p.set_defaults(func=_chat)


# --------------------------------------------------------------------------------------------- serve
def _serve(args):
    from scratchllm.serve.commands import serve

    return serve(args)


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over the OpenAI API (continuous batching, streaming) with a chat page",
                       description="Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, "
                                   "GET /health, and the chat page at /. See docs/serve.md.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--name", help="the model id clients send and see (default: the last part of --model)")
    p.add_argument("--chat-format", choices=TEMPLATES, help="the chat format (default: the model's own)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $SCRATCHLLM_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16, help="most sequences decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a slot; more get HTTP 429 (default 64)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: the model's context)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body; bigger ones get HTTP 413 unread (default 1 MiB)")
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    add_weights_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info: one line per request)")
    p.set_defaults(func=_serve)


# --------------------------------------------------------------------------------------------- lab
def _lab_list(args):
    from scratchllm.lab.commands import lab_list

    return lab_list(args)


def _lab_run(args):
    from scratchllm.lab.commands import lab_run

    return lab_run(args)


def add_lab(sub) -> None:
    p = sub.add_parser("lab", help="the book's design claims, each measured by an experiment (table, plot, verdict)")
    lsub = p.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    lst = lsub.add_parser("list", help="the experiments and the claim each one checks")
    lst.set_defaults(func=_lab_list)
    r = lsub.add_parser("run", help="run one experiment: result.json, result.md and result.png in --out")
    r.add_argument("name", help="the experiment (see `scratchllm lab list`)")
    r.add_argument("--quick", action="store_true", help="small sizes and few steps: under a minute on 2 cores")
    r.add_argument("--out", help="folder for the results (default: lab/NAME)")
    r.add_argument("--overwrite", action="store_true", help="replace an --out that holds other results")
    r.set_defaults(func=_lab_run)


# --------------------------------------------------------------------------------------------- demo
def _demo(args):
    from scratchllm.demo import run

    return run(args)


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job of `make demo` (offline, a few minutes on 2 cores)")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's outputs (default: runs/demo)")
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocabulary size")
    p.add_argument("--max-steps", type=int, default=1500, help="pretraining steps (2048 tokens each)")
    p.set_defaults(func=_demo)


# Each entry registers one subcommand (group). Keep them in pipeline order.
COMMANDS = [add_tokenizer, add_data, add_model, add_download, add_export, add_pretrain, add_classify, add_sft,
            add_reward, add_dpo, add_ppo, add_merge, add_generate, add_chat, add_serve, add_eval,
            add_lab, add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scratchllm",
        description="Build a GPT-style language model from scratch and take it through every stage.",
    )
    parser.add_argument("--version", action="version", version=f"scratchllm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning  # library warnings as one clean line, no source path
    try:
        return args.func(args) or 0
    except ScratchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `scratchllm ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
