"""`scratchllm demo` (what `make demo` runs): the whole path on a fresh machine, offline.

Step 1 trains a byte-level BPE tokenizer on the built-in corpus (Python's own documentation, shipped
with CPython, so no download is needed), saves it, and compares its compression with GPT-2's on text it
did not see (GPT-2 only when its files are available offline).

    scratchllm demo --out runs/demo
"""

from __future__ import annotations

import time
from pathlib import Path

from scratchllm.common import ScratchError, print0


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


def run(args) -> int:
    from scratchllm.data.sources import pydocs_documents

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = pydocs_documents()
    train_tokenizer(docs, args.vocab_size, out / "tokenizer")
    print0(f"\ndemo outputs are in {out.resolve()}")
    return 0
