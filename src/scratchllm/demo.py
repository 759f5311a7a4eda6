"""`scratchllm demo` (what `make demo` runs): the whole path on a fresh machine, offline.

Step 1 trains a byte-level BPE tokenizer on the built-in corpus (Python's own documentation, shipped
with CPython, so no download is needed), saves it, and compares its compression with GPT-2's on text it
did not see (GPT-2 only when its files are available offline). Step 2 tokenizes the corpus into shards
and measures a unigram baseline (the validation loss of predicting every token from its training-set
frequency alone). Step 3 pretrains a small GPT on the shards with the shared Trainer (progress, loss
curve, report), and step 4 prints samples of the untrained and the trained model and the validation
loss against the baseline. Everything stays in --out; the run folder is named at the end.

Every argument is checked before any work. The demo writes only three subfolders of --out: `tokenizer/`,
`shards/` and `run/`. Running it again into the same --out (`make demo` twice) replaces those three,
each only when it is empty or recognisably ours (a tokenizer folder, a shard folder, a run folder: the
`--overwrite` rule of `common.clear_for_overwrite`); any other file in --out is left alone, and a
subfolder of that name holding other files stops the demo before it starts.

    scratchllm demo --out runs/demo                 # a few minutes on 2 cores
    scratchllm demo --out /tmp/d --max-steps 5      # a smoke test
"""

from __future__ import annotations

import time
from pathlib import Path

from scratchllm.common import ScratchError, check_can_create, clear_for_overwrite, print0


def train_tokenizer(docs: list[str], vocab_size: int, out: Path):
    """Train on all but the last 10% of the documents; return (tokenizer, held-out text)."""
    from scratchllm.tokenizer import train_bpe
    from scratchllm.tokenizer.commands import measure, print_stats
    from scratchllm.tokenizer.gpt2 import gpt2_tokenizer

    split = int(len(docs) * 0.9)
    train_docs, held_out = docs[:split], "\n\n".join(docs[split:])
    n_bytes = sum(len(d.encode()) for d in train_docs)
    print0(f"[1] training a {vocab_size}-token BPE tokenizer on {len(train_docs):,} documents "
           f"({n_bytes / 1e6:.2f} MB) of the built-in corpus")
    start = time.perf_counter()
    tok = train_bpe(train_docs, vocab_size, special_tokens=["<|endoftext|>"], progress=True, name="demo")
    print0(f"    trained in {time.perf_counter() - start:.1f}s; saved to {tok.save(out, overwrite=True)}")
    rows = [(f"demo ({tok.vocab_size})", measure(tok, held_out))]
    try:
        gpt2 = gpt2_tokenizer()
        rows.append((f"gpt2 ({gpt2.vocab_size})", measure(gpt2, held_out)))
    except ScratchError:
        print0("    (GPT-2's tokenizer is not available offline; set TIKTOKEN_CACHE_DIR to compare with it)")
    print0("    compression on held-out documentation:")
    print_stats(rows, len(held_out.encode()), len(held_out.split()))
    sample = "Return the number of items in a container."
    pieces = [tok.token_bytes(i).decode("utf-8", errors="replace") for i in tok.encode(sample)]
    print0(f"    {sample!r} -> {len(pieces)} tokens: {'|'.join(pieces)}")
    return tok, held_out


PROMPTS = ["The return value", "To create a new"]
DEMO_MODEL = dict(block_size=128, n_layer=4, n_head=4, n_embd=128)  # ~1.3M parameters with 4096 ids


def unigram_baseline(shards) -> float:
    """Cross-entropy (nats/token) of the validation tokens under the training tokens' unigram
    frequencies (add-one smoothed): what a model that ignores context can reach."""
    import numpy as np

    V = shards.vocab_size
    counts = sum(np.bincount(np.asarray(a), minlength=V) for a in shards.train).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    val = np.concatenate([np.asarray(a) for a in shards.val])
    return float(-logp[val].mean())


def samples(model, tok, title: str) -> None:
    from scratchllm.infer.engine import Engine

    engine = Engine(model, tok)
    print0(f"    {title}:")
    for prompt in PROMPTS:
        text = "".join(engine.stream_text(prompt, 40, temperature=0.8, top_k=40, seed=0))
        print0(f"      {prompt!r} -> {text!r}")


SEED = 1337


def demo_config(out: Path, max_steps: int):
    """The pretraining run of step 3 (building it validates --max-steps with the Trainer's own rules)."""
    from scratchllm.configs import PretrainConfig, TrainConfig

    train = TrainConfig(max_steps=max_steps, batch_size=16, lr=3e-3, min_lr=3e-4,
                        warmup_steps=max(1, max_steps // 20), eval_every=max(1, max_steps // 10), eval_batches=8,
                        checkpoint_every=0, sample_every=0, precision="fp32", seed=SEED, device="cpu")
    return PretrainConfig(data=str(out / "shards"), tokenizer=str(out / "tokenizer"), model_preset="tiny",
                          out=str(out / "run"), block_size=128, train=train)


def check_args(args):
    """Everything the demo is given, checked before any work (nothing is created when one is bad):
    the numbers, --out, and that each of OUT/tokenizer, OUT/shards and OUT/run is absent, empty or
    one of ours, so that a rerun replaces them and deletes nothing else. Returns the run's config."""
    from scratchllm.data.shards import FOLDER_MARKERS as SHARD_MARKERS
    from scratchllm.tokenizer.bpe import merges_for_vocab
    from scratchllm.tokenizer.tokenizer import FOLDER_MARKERS as TOKENIZER_MARKERS
    from scratchllm.train.stage import RUN_MARKERS

    merges_for_vocab(args.vocab_size, 1, "--vocab-size")  # the demo's tokenizer has one special token
    if isinstance(args.max_steps, bool) or not isinstance(args.max_steps, int) or args.max_steps < 1:
        raise ScratchError(f"--max-steps must be an integer >= 1, got {args.max_steps!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ScratchError(f"--out {out} is a file, not a folder")
    parts = [("tokenizer", TOKENIZER_MARKERS, "tokenizer folder"), ("shards", SHARD_MARKERS, "shard folder"),
             ("run", RUN_MARKERS, "run folder")]  # the markers stage.check_out_dir uses
    for name, markers, what in parts:
        clear_for_overwrite(out / name, markers, what, by="rerunning the demo into this --out", delete=False)
    cfg = demo_config(out, args.max_steps)
    check_can_create(out / "run")  # makes --out; fails now when it cannot be written
    return cfg


def run(args) -> int:
    cfg = check_args(args)

    import torch

    from scratchllm.common import seed_everything
    from scratchllm.data.shards import open_shards, prepare
    from scratchllm.data.sources import pydocs_documents
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.train.pretrain import pretrain
    from scratchllm.weights.checkpoint import load_model

    out, run_dir = Path(args.out), Path(cfg.out)
    start = time.perf_counter()
    docs = pydocs_documents()
    tok, _ = train_tokenizer(docs, args.vocab_size, out / "tokenizer")

    print0("\n[2] tokenizing the corpus into shards (5% held out for validation)")
    prepare(["builtin:pydocs"], tok, out / "shards", val_fraction=0.05, overwrite=True, progress=False)
    shards = open_shards(out / "shards", tokenizer=tok)
    baseline = unigram_baseline(shards)
    print0(f"    {shards.train_tokens:,} train / {shards.val_tokens:,} validation tokens; unigram baseline "
           f"{baseline:.3f} nats/token")

    seed_everything(SEED)  # the same initial weights the pretraining run starts from
    untrained = GPT(ModelConfig.from_preset("tiny", vocab_size=-(-tok.vocab_size // 64) * 64, **DEMO_MODEL)).eval()
    print0(f"\n[3] pretraining a {untrained.num_params() / 1e6:.1f}M-parameter GPT for {args.max_steps} steps")
    samples(untrained, tok, "untrained samples")
    summary = pretrain(cfg, overwrite=True)
    if summary["interrupted"]:
        return summary["exit_code"]  # 130 after Ctrl-C, 143 after SIGTERM: the checkpoint is in run_dir
    model, _ = load_model(run_dir)
    with torch.no_grad():
        samples(model, tok, "trained samples")
    from scratchllm.train.runlog import read_metrics

    val = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") == "val"]
    print0(f"\n[4] validation loss {val[0]:.3f} untrained -> {val[-1]:.3f} trained; unigram baseline {baseline:.3f} "
           f"({'better' if val[-1] < baseline else 'not yet better'} than counting tokens)")
    print0(f"\ndemo finished in {time.perf_counter() - start:.0f}s. Run folder: {run_dir.resolve()} "
           f"(loss.png, report.md, metrics.jsonl, checkpoints)")
    return 0
