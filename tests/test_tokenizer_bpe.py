"""BPE training: a hand-worked example, the incremental trainer against a naive recount-every-merge
trainer, and the trainer's error handling."""

import warnings
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm.common import ScratchError
from scratchllm.tokenizer import PATTERNS, train_bpe
from scratchllm.tokenizer.bpe import count_chunks, learn_merges


def naive_merges(chunk_counts, num_merges):
    """Deliberately naive BPE: recount every pair of every chunk before each merge (minbpe-style).
    Same tie-break as the real trainer: highest count, then smallest (left id, right id)."""
    words = {bytes(c): list(c) for c in chunk_counts}
    token_bytes = [bytes([i]) for i in range(256)]
    merges, new_tokens = [], 0
    while new_tokens < num_merges:
        counts = Counter()
        for chunk, n in chunk_counts.items():
            w = words[chunk]
            for pair in zip(w, w[1:]):
                counts[pair] += n
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in token_bytes:
            new_id = token_bytes.index(merged)
        else:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            new_tokens += 1
        merges.append((pair, new_id))
        for chunk, w in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[chunk] = out
    return merges


def chunk_bytes(texts, pattern="gpt2", specials=()):
    return {k.encode("utf-8"): v for k, v in count_chunks(texts, PATTERNS[pattern], specials).items()}


def test_wikipedia_example_hand_derived():
    # "aaabdaaabac": aa (4 times) -> 256; then (256,a) and (a,b) both occur twice: the tie goes to the
    # smaller pair (97, 98) "ab" -> 257; then (256, 257) "aaab" occurs twice -> 258; then every pair occurs
    # once and the smallest, (97, 99) "ac", -> 259.
    merges = learn_merges({b"aaabdaaabac": 1}, num_merges=4)
    assert merges == [((97, 97), 256), ((97, 98), 257), ((256, 257), 258), ((97, 99), 259)]
    tok = train_bpe(["aaabdaaabac"], vocab_size=259)
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.token_bytes(258) == b"aaab"


def test_counts_weight_chunks():
    # " hi" appears 3 times, "yo" once: the first merge must come from " hi"
    merges = learn_merges(chunk_bytes(["yo hi hi hi"]), 1)
    assert merges == [((32, ord("h")), 256)]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_incremental_equals_naive_on_books(shared_data, pattern):
    texts = [(shared_data / "the-verdict.txt").read_text()[:6000],
             (shared_data / "tinystories" / "tinystories_sample_cs336.txt").read_text()]
    counts = chunk_bytes(texts, pattern, ["<|endoftext|>"])
    assert learn_merges(counts, 300) == naive_merges(counts, 300)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(alphabet="ab c\nde", max_size=40), min_size=1, max_size=6),
       st.integers(min_value=1, max_value=40))
def test_incremental_equals_naive_random(texts, num_merges):
    counts = chunk_bytes(texts)
    assert learn_merges(counts, num_merges) == naive_merges(counts, num_merges)


def test_runs_of_one_character():
    counts = chunk_bytes(["a" * 37, " " + "a" * 10, "bbbbbbb"])
    assert learn_merges(counts, 20) == naive_merges(counts, 20)


def test_special_tokens_never_merge_and_come_last():
    tok = train_bpe(["hello<|endoftext|>world " * 20], vocab_size=265, special_tokens=["<|endoftext|>"])
    assert tok.vocab_size == 265 and tok.eot_token == 264
    assert all(b"<|" not in t for t in tok.mergeable_ranks)


def test_errors():
    with pytest.raises(ScratchError, match="empty"):
        train_bpe([], vocab_size=300)
    with pytest.raises(ScratchError, match="empty"):
        train_bpe(["", ""], vocab_size=300)
    with pytest.raises(ScratchError, match="too small"):
        train_bpe(["abc"], vocab_size=257, special_tokens=["<|endoftext|>"])
    with pytest.raises(ScratchError, match="unknown pattern"):
        train_bpe(["abc"], vocab_size=300, pattern="gpt5")
    with pytest.raises(ScratchError, match="twice"):
        train_bpe(["abc"], vocab_size=300, special_tokens=["<|a|>", "<|a|>"])
    with pytest.raises(ScratchError, match="overlaps"):
        train_bpe(["abc"], vocab_size=300, special_tokens=["<|a|>", "<|a|>x"])


def test_small_corpus_stops_early_with_warning():
    with pytest.warns(UserWarning, match="only supports 3 merges"):
        tok = train_bpe(["abcd"], vocab_size=1000, special_tokens=["<|endoftext|>"])
    assert tok.vocab_size == 256 + 3 + 1
    assert tok.encode("abcd") == [258]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train_bpe(["abcd"], vocab_size=258)  # enough pairs: no warning
