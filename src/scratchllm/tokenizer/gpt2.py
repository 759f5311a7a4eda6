"""GPT-2's tokenizer from its original files (`encoder.json` + `vocab.bpe`) or a `.tiktoken` ranks file.

GPT-2 stores tokens as printable strings: each byte is mapped to a visible Unicode character
(`bytes_to_unicode`) so that the BPE files are plain text. We invert that map to recover the token
bytes; the rank of a token is its id. The merges in `vocab.bpe` are checked against those ranks
(merge i must build the token of rank 256 + i), which catches mismatched or corrupted files.

    >>> tok = gpt2_tokenizer()                                # tiktoken's cache / download
    >>> tok = from_gpt2_files("encoder.json", "vocab.bpe")    # the original files
    >>> tok.encode("Hello")
    [15496]
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from scratchllm.common import ScratchError, read_json
from scratchllm.tokenizer.base import PATTERNS
from scratchllm.tokenizer.tokenizer import EOT, Tokenizer, read_ranks_file

GPT2_EOT_ID = 50256
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves, the other
    68 bytes to chr(256), chr(257), ... in byte order.

    >>> bytes_to_unicode()[ord("A")], bytes_to_unicode()[ord(" ")]
    ('A', 'Ġ')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    """str.translate table: alphabet character -> chr(its byte); other Latin-1 characters -> U+FFFF
    (so that they fail the latin-1 encoding, as characters above U+00FF do)."""
    table = {c: "\uffff" for c in range(256)}
    table.update({ord(ch): chr(b) for b, ch in bytes_to_unicode().items()})
    return table


def token_bytes(token: str) -> bytes | None:
    """A token in GPT-2's printable-byte alphabet -> its bytes; None when it uses another character.

    >>> token_bytes("Ġhello"), token_bytes("<0x0A>"), token_bytes("▁hi"), token_bytes("a b")
    (b' hello', b'<0x0A>', None, None)
    """
    try:
        return token.translate(_byte_table()).encode("latin-1")
    except UnicodeEncodeError:  # a character outside the alphabet was left (or made) above U+00FF
        return None


def printable(b: bytes) -> str:
    """Token bytes in GPT-2's printable alphabet, as vocab and merge files write them: b' t' -> 'Ġt'.

    >>> printable(b" t")
    'Ġt'
    """
    b2u = bytes_to_unicode()
    return "".join(b2u[x] for x in b)


def from_gpt2_files(encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
    """Build GPT-2's tokenizer from `encoder.json` (token string -> id) and `vocab.bpe` (the merges)."""
    encoder_json, vocab_bpe = Path(encoder_json), Path(vocab_bpe)
    encoder = read_json(encoder_json)
    ranks, specials = {}, {}
    for token, idx in encoder.items():
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise ScratchError(f"{encoder_json}: token {token!r} has id {idx!r}, not an integer (is this really a "
                               "GPT-2 encoder.json?)")
        if token == EOT:
            specials[token] = idx
            continue
        b = token_bytes(token)
        if b is None:
            raise ScratchError(f"{encoder_json}: token {token!r} uses a character outside GPT-2's byte "
                               "alphabet (is this really a GPT-2 encoder.json?)")
        ranks[b] = idx
    try:
        lines = vocab_bpe.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ScratchError(f"cannot read {vocab_bpe}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ScratchError(f"{vocab_bpe}: not UTF-8 text (byte offset {e.start}); is this really a GPT-2 "
                           "vocab.bpe?") from None
    merges = [ln for ln in lines if ln and not ln.startswith("#version")]
    for i, line in enumerate(merges):
        parts = line.split()
        if len(parts) != 2:
            raise ScratchError(f"{vocab_bpe}: merge {i + 1} is not two tokens: {line!r}")
        merged = token_bytes(parts[0] + parts[1])
        if merged is None:
            raise ScratchError(f"{vocab_bpe}: merge {i + 1} ({line!r}) uses a character outside GPT-2's byte "
                               "alphabet (is this really a GPT-2 vocab.bpe?)")
        if ranks.get(merged) != 256 + i:
            raise ScratchError(f"{vocab_bpe}: merge {i + 1} ({line!r}) does not match {encoder_json.name} "
                               f"(expected rank {256 + i}, found {ranks.get(merged)}); the files do not belong together")
    if len(ranks) != 256 + len(merges):
        raise ScratchError(f"{encoder_json} has {len(ranks)} tokens but {vocab_bpe} implies {256 + len(merges)}")
    try:
        return Tokenizer(ranks, PATTERNS["gpt2"], specials, name="gpt2")
    except ScratchError as e:
        raise ScratchError(f"{encoder_json}: {e}") from None


def from_tiktoken_file(path: str | Path, pattern: str = "gpt2", special_tokens: dict[str, int] | None = None,
                       name: str | None = None) -> Tokenizer:
    """Build a tokenizer from a `.tiktoken` ranks file. Defaults fit GPT-2's `r50k_base.tiktoken`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScratchError(f"cannot read ranks file {path}: {e.strerror or e}") from None
    ranks = read_ranks_file(path, data)
    if path.name == "r50k_base.tiktoken":  # GPT-2's published file: a truncated copy is caught here
        if hashlib.sha256(data).hexdigest() != R50K_SHA256:
            raise ScratchError(f"{path} is not OpenAI's r50k_base.tiktoken: its sha256 differs from "
                               f"{R50K_SHA256} (truncated or edited?)")
    if special_tokens is None:
        special_tokens = {EOT: max(ranks.values()) + 1}
    try:
        return Tokenizer(ranks, pattern, special_tokens, name=name or path.stem)
    except ScratchError as e:
        raise ScratchError(f"{path}: {e}") from None


def gpt2_tokenizer() -> Tokenizer:
    """GPT-2's tokenizer through tiktoken's file loader: downloaded once and cached by tiktoken, or read
    offline from `$TIKTOKEN_CACHE_DIR` (a folder holding tiktoken's cached copy of r50k_base)."""
    import tiktoken.load

    try:
        ranks = tiktoken.load.load_tiktoken_bpe(R50K_URL, expected_hash=R50K_SHA256)
    except Exception as e:  # network errors come in many types (requests, urllib, OSError)
        raise ScratchError(f"cannot load GPT-2's tokenizer ({type(e).__name__}: {e}). Offline, point "
                           "TIKTOKEN_CACHE_DIR at a folder with tiktoken's cached r50k_base file, or pass a "
                           "tokenizer folder") from None
    return Tokenizer(ranks, PATTERNS["gpt2"], {EOT: GPT2_EOT_ID}, name="gpt2")
