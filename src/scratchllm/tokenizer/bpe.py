"""Byte-level BPE training from scratch: pre-tokenized chunk counts, the merge learner, `train_bpe`.

Training (`learn_merges`, used by `train_bpe`) is the classic algorithm: split the text into chunks
with a regex, count each distinct chunk once, start every chunk as its UTF-8 bytes (ids 0..255), then
repeatedly merge the most frequent adjacent pair of ids into a new id. The counts are kept up to date
*incrementally*: a merge only revisits the chunks that contain the merged pair (found through an
index pair -> chunks), and a heap with lazy deletion yields the next best pair, so a merge costs time
proportional to the chunks it touches, not to the corpus.

Tie-break (documented, deterministic): among pairs with the same count, the pair with the smallest
`(left id, right id)` wins, i.e. the pair built from the oldest tokens.

    >>> merges = learn_merges({b"aaabdaaabac": 1}, num_merges=3)
    >>> [(a, b) for (a, b), _ in merges]      # aa -> 256, ab -> 257, (aa)(ab) -> 258
    [(97, 97), (97, 98), (256, 257)]

The split patterns and the reference encoder (how ranks are applied) live in base.py, below both this
trainer and the Tokenizer (tokenizer.py) that `train_bpe` returns.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable

import regex

from scratchllm.common import Progress, ScratchError
from scratchllm.tokenizer.base import resolve_pattern
from scratchllm.tokenizer.tokenizer import MAX_ID, Tokenizer, check_special_tokens


def split_on_specials(text: str, special_tokens: Iterable[str]) -> list[str]:
    """Cut `text` at every special token, dropping the specials (they never take part in merges).

    >>> split_on_specials("a<|endoftext|>b", ["<|endoftext|>"])
    ['a', 'b']
    """
    specials = sorted(special_tokens, key=len, reverse=True)
    if not specials:
        return [text]
    return [p for p in regex.split("|".join(regex.escape(s) for s in specials), text) if p]


def count_chunks(texts: Iterable[str], pattern: str, special_tokens: Iterable[str] = ()) -> Counter:
    """Count the distinct pre-tokenized chunks of a corpus.

    >>> from scratchllm.tokenizer.base import PATTERNS
    >>> count_chunks(["hi hi"], PATTERNS["gpt2"])
    Counter({'hi': 1, ' hi': 1})
    """
    compiled = regex.compile(pattern)
    specials = tuple(special_tokens)
    counts: Counter = Counter()
    for text in texts:
        for piece in split_on_specials(text, specials):
            counts.update(compiled.findall(piece))
    return counts


def learn_merges(chunk_counts: dict[bytes, int], num_merges: int, progress: bool = False
                 ) -> list[tuple[tuple[int, int], int]]:
    """Learn up to `num_merges` merges from {chunk bytes: count}; returns [((a, b), new_id), ...].

    New ids are 256, 257, ... in merge order. If a merge builds bytes that an earlier token already has,
    that token's id is reused (no new id). Stops early when no adjacent pair is left.
    """
    words = [list(chunk) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())
    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, (word, n) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + n
            where.setdefault(pair, set()).add(wi)
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([i]) for i in range(256)]
    bytes_to_id = {b: i for i, b in enumerate(token_bytes)}
    merges: list[tuple[tuple[int, int], int]] = []
    bar = Progress(total=num_merges, unit="merges", desc="bpe", enabled=progress)
    new_tokens = 0
    while new_tokens < num_merges and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry: the count changed after it was pushed
        a, b = pair
        merged = token_bytes[a] + token_bytes[b]
        new_id = bytes_to_id.get(merged)
        if new_id is None:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            bytes_to_id[merged] = new_id
            new_tokens += 1
            bar.update(1)
        merges.append((pair, new_id))

        # Rewrite each chunk holding the pair; only the pairs around a merge site change. With x the
        # token left of the site (already rewritten, so possibly new_id) and y the one right of it:
        # (x, a) -> (x, new_id), (a, b) -> gone, (b, y) -> (new_id, y). For back-to-back sites the
        # (new_id, a) added by one site is removed again by the next, which leaves (new_id, new_id).
        delta: dict[tuple[int, int], int] = {}
        for wi in where.pop(pair):
            word, n = words[wi], freqs[wi]
            out, i, length = [], 0, len(word)
            while i < length:
                if word[i] == a and i + 1 < length and word[i + 1] == b:
                    delta[pair] = delta.get(pair, 0) - n
                    if out:
                        x = out[-1]
                        delta[(x, a)] = delta.get((x, a), 0) - n
                        delta[(x, new_id)] = delta.get((x, new_id), 0) + n
                        where.setdefault((x, new_id), set()).add(wi)
                    if i + 2 < length:
                        y = word[i + 2]
                        delta[(b, y)] = delta.get((b, y), 0) - n
                        delta[(new_id, y)] = delta.get((new_id, y), 0) + n
                        where.setdefault((new_id, y), set()).add(wi)
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[wi] = out
        for p, d in delta.items():
            if d:
                c = pair_counts.get(p, 0) + d
                if c:
                    pair_counts[p] = c
                    heapq.heappush(heap, (-c, p))
                else:
                    pair_counts.pop(p, None)
    bar.close()
    return merges


def merges_for_vocab(vocab_size, n_special: int, flag: str = "vocab_size") -> int:
    """The number of merges a vocabulary of `vocab_size` ids needs (256 bytes + merges + specials), or a
    ScratchError naming `flag` when it is too small, too large or not an integer. Cheap: callers check
    before any work.

    >>> merges_for_vocab(300, n_special=1)
    43
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ScratchError(f"{flag} must be an integer, got {vocab_size!r}")
    if vocab_size > MAX_ID + 1:
        raise ScratchError(f"{flag} {vocab_size} is too large: token ids must fit 32 bits (at most {MAX_ID + 1})")
    if vocab_size <= 256 + n_special:
        raise ScratchError(f"{flag} {vocab_size} is too small: it must exceed 256 bytes + {n_special} "
                           f"special token(s) = {256 + n_special}")
    return vocab_size - 256 - n_special


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Iterable[str] = (), pattern: str = "gpt2",
              progress: bool = False, name: str = "scratchllm"):
    """Train a byte-level BPE tokenizer; returns a `Tokenizer`.

    The vocabulary is the 256 bytes (ids 0..255), then one id per merge, then the special tokens, so
    `vocab_size` counts all three. If the corpus runs out of pairs first, training stops early with a
    warning and the vocabulary is smaller than asked.

    >>> tok = train_bpe(["aaabdaaabac"], vocab_size=259)
    >>> tok.encode("aaabdaaabac")
    [258, 100, 258, 97, 99]
    """
    import warnings

    if isinstance(texts, str | bytes):
        raise ScratchError("train_bpe takes a list of texts, not one string: train_bpe([text], ...)")
    specials = check_special_tokens(special_tokens)
    pattern_name, pattern_re = resolve_pattern(pattern)
    num_merges = merges_for_vocab(vocab_size, len(specials))
    counts = count_chunks(texts, pattern_re, specials)
    if not counts:
        raise ScratchError("the corpus is empty: no text to train on")
    merges = learn_merges({chunk.encode("utf-8"): n for chunk, n in counts.items()}, num_merges, progress)

    ranks = {bytes([i]): i for i in range(256)}
    id_bytes = {i: bytes([i]) for i in range(256)}
    for (a, b), new_id in merges:
        id_bytes[new_id] = id_bytes[a] + id_bytes[b]
        ranks[id_bytes[new_id]] = new_id
    n_new = len(ranks) - 256
    if n_new < num_merges:
        warnings.warn(f"the corpus only supports {n_new} merges, fewer than the {num_merges} needed for "
                      f"vocab_size {vocab_size}; stopped early with vocab_size {len(ranks) + len(specials)}",
                      stacklevel=2)
    special_ids = {s: len(ranks) + i for i, s in enumerate(specials)}
    return Tokenizer(ranks, pattern_re, special_ids, name=name)
