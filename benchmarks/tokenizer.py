"""Tokenizer benchmark: BPE training time and encode throughput, against the peers in one run.

(1) Training to vocab 8192 and 32768 on a fixed 5 MB slice of ../shared/data (the Gutenberg books,
    sorted by name, concatenated, first 5,000,000 characters): ours vs Hugging Face `tokenizers`'
    ByteLevel BPE trainer (Rust). Target: within 5x. Plus a recount-every-merge naive trainer (the one
    in tests/) timed on a small slice and extrapolated: target >= 1000x faster.
(2) Encode throughput (MB/s) of our GPT-2 Tokenizer vs `tiktoken.get_encoding("gpt2")` on one thread
    (target >= 0.95x), and `encode_batch` on 2 threads vs our single thread (target >= 1.7x), with
    tiktoken's own `encode_batch` timed the same way beside it.

    python benchmarks/tokenizer.py            # full run, a couple of minutes on 2 cores
    python benchmarks/tokenizer.py --quick    # smaller slice and vocabularies, for a smoke test
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(DATA / "tiktoken_cache"))
sys.path.insert(0, str(ROOT))  # for tests.test_tokenizer_bpe.naive_merges


def corpus(n_chars: int) -> str:
    files = sorted((DATA / "gutenberg").glob("*.txt"))
    if not files:
        sys.exit(f"no data at {DATA}/gutenberg (set SCRATCHLLM_SHARED_DATA)")
    return "".join(f.read_text(encoding="utf-8") for f in files)[:n_chars].replace("\r\n", "\n")


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def train_ours(text: str, vocab: int) -> float:
    from scratchllm import train_bpe

    t = time.perf_counter()
    tok = train_bpe([text], vocab, special_tokens=["<|endoftext|>"])
    assert tok.vocab_size == vocab
    return time.perf_counter() - t


def train_hf(text: str, vocab: int) -> float:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    return time.perf_counter() - t


def naive_extrapolated(text: str, vocab: int, small_chars: int, small_merges: int) -> float:
    """Seconds the naive trainer would take on `text`: its cost per merge is proportional to the number of
    distinct chunks it recounts, so time it on a small slice and scale by chunks and merges."""
    from scratchllm.tokenizer import PATTERNS
    from scratchllm.tokenizer.bpe import count_chunks
    from tests.test_tokenizer_bpe import naive_merges

    small = {k.encode(): v for k, v in count_chunks([text[:small_chars]], PATTERNS["gpt2"]).items()}
    full_chunks = len(count_chunks([text], PATTERNS["gpt2"]))
    t = time.perf_counter()
    naive_merges(small, small_merges)
    per_merge = (time.perf_counter() - t) / small_merges
    return per_merge * (full_chunks / len(small)) * (vocab - 257)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 MB slice, vocab 2048/8192")
    args = ap.parse_args()
    n_chars = 1_000_000 if args.quick else 5_000_000
    vocabs = [2048, 8192] if args.quick else [8192, 32768]
    text = corpus(n_chars)
    mb = len(text.encode()) / 1e6
    print(f"corpus: {mb:.2f} MB of Gutenberg text, {os.cpu_count()} CPUs\n")

    print("(1) training time (s)")
    print(f"{'vocab':>8}{'ours':>10}{'HF tokenizers':>15}{'ours/HF':>10}{'naive (extrap.)':>17}{'speedup':>10}")
    for vocab in vocabs:
        ours = min(train_ours(text, vocab) for _ in range(2))
        hf = min(train_hf(text, vocab) for _ in range(2))
        naive = naive_extrapolated(text, vocab, small_chars=50_000, small_merges=20)
        print(f"{vocab:>8}{ours:>10.2f}{hf:>15.2f}{ours / hf:>9.2f}x{naive:>16.0f}s{naive / ours:>9.0f}x")

    print("\n(2) encode throughput, GPT-2 vocabulary (MB/s)")
    import tiktoken

    from scratchllm.tokenizer import load_tokenizer

    ours, ref = load_tokenizer("gpt2"), tiktoken.get_encoding("gpt2")
    assert ours.encode(text) == ref.encode(text)
    t_ours = best_of(lambda: ours.encode(text))
    t_ref = best_of(lambda: ref.encode(text))
    docs = [text[i : i + 20_000] for i in range(0, len(text), 20_000)]
    t_loop = best_of(lambda: [ours.encode(d) for d in docs])
    t_batch = best_of(lambda: ours.encode_batch(docs, num_threads=2))
    t_ref_loop = best_of(lambda: [ref.encode(d) for d in docs])
    t_ref_batch = best_of(lambda: ref.encode_batch(docs, num_threads=2))
    print(f"  tiktoken, 1 thread        {mb / t_ref:8.2f}")
    print(f"  ours, 1 thread            {mb / t_ours:8.2f}   ratio vs tiktoken {t_ref / t_ours:.2f}x (target >= 0.95x)")
    print(f"  ours, encode_batch 2 thr  {mb / t_batch:8.2f}   ratio vs our 1 thread {t_loop / t_batch:.2f}x (target >= 1.7x)")
    print(f"  tiktoken, encode_batch 2 thr {mb / t_ref_batch:5.2f}   ratio vs its 1 thread {t_ref_loop / t_ref_batch:.2f}x "
          "(the same texts: what threads give on this machine)")


if __name__ == "__main__":
    main()
