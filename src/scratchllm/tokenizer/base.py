"""The byte-level BPE pieces that both the trainer (bpe.py) and the Tokenizer (tokenizer.py) stand on:
the split patterns and the reference encoder, i.e. how a table of ranks turns bytes into tokens.

The reference encoder (`bpe_encode_reference`) applies ranks the way tiktoken does: repeatedly merge
the adjacent pair whose concatenated bytes has the lowest rank. It exists to check the fast path
(tiktoken's Rust core, see tokenizer.py) and to teach; it is far too slow for real work.
What it does not do: learn merges (bpe.py) or hold special tokens and files (tokenizer.py).

    name, regex = resolve_pattern("gpt2")
    tokens = bpe_encode_reference("hello".encode(), ranks)   # [b'hell', b'o'], say
"""

from __future__ import annotations

from scratchllm.common import ScratchError

# GPT-2's split pattern (tiktoken's equivalent, faster form) and the GPT-4 (cl100k) pattern.
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
    # The patterns below are the split regexes of open-weight models as their HF tokenizer.json writes
    # them (llama.cpp's `tokenizer.ggml.pre` names them too; see tokenizer/convert.py).
    # SmolLM2 / StarCoder: HF's Sequence[Digits(individual_digits), ByteLevel(GPT-2 regex)] as ONE regex.
    # Digits first cuts the text before and after every digit, so GPT-2's `\s+(?!\S)` sees the end of
    # its piece at a digit: whitespace before a digit is one piece ("  1" -> "  ", "1"; GPT-2's own
    # regex gives " ", " 1"). Hence `\p{N}` alone and the lookahead `(?![^\s\p{N}])`.
    "smollm": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+""",
    # Llama 3 (tiktoken's cl100k written the HF way; also the default of transformers' TikTokenConverter)
    "llama3": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # Qwen2 / Qwen2.5 / Qwen3: Llama 3's with single digits
    "qwen2": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # Qwen3.5: Qwen2's with combining marks (\p{M}) kept in words
    "qwen35": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # Mistral's tekken (Mistral NeMo, Pixtral 12B's text model)
    "tekken": r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    # GPT-4o (tiktoken's o200k written the HF way)
    "gpt4o": r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def resolve_pattern(pattern: str) -> tuple[str, str]:
    """Pattern name -> (name, regex string). Unknown names raise ScratchError.

    >>> resolve_pattern("gpt2")[0]
    'gpt2'
    """
    if pattern not in PATTERNS:
        raise ScratchError(f"unknown pattern {pattern!r}: expected one of {', '.join(PATTERNS)}")
    return pattern, PATTERNS[pattern]


def bpe_encode_reference(data: bytes, ranks: dict[bytes, int], max_rank: int | None = None) -> list[bytes]:
    """Split `data` into tokens with the BPE merge loop, using only the ranks (as tiktoken does).

    Repeatedly merge the adjacent pair whose concatenation has the lowest rank (below `max_rank` if
    given) until no adjacent pair is in the vocabulary. Returns the token byte strings.

    >>> ranks = {bytes([i]): i for i in range(256)} | {b"aa": 256, b"ab": 257, b"aaab": 258}
    >>> bpe_encode_reference(b"aaabdaaabac", ranks)
    [b'aaab', b'd', b'aaab', b'a', b'c']
    """
    parts = [bytes([x]) for x in data]
    while len(parts) > 1:
        best_i, best_rank = -1, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and (best_rank is None or r < best_rank):
                best_i, best_rank = i, r
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts
