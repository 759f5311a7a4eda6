"""The Tokenizer: byte-level BPE ranks + a split pattern + special tokens.

Encoding runs on tiktoken's Rust core, built from *our* ranks, pattern and specials (the fast path);
`encode_reference` does the same job in pure Python with the merge loop of base.py and must give the
same ids. Special tokens follow tiktoken's rules: a special token found in plain text raises unless it
is allowed (`allowed_special={"<|endoftext|>"}` or `"all"`), or it is encoded as plain text when it is
not disallowed (`disallowed_special=()`).

Absent bytes: a vocabulary converted from another tool may lack some single-byte tokens (SmolLM2 has
no token for 21 bytes, such as 0x04 and 0xF5..0xFF). tiktoken needs every byte, so such a Tokenizer is
built with `absent_bytes=[...]`: those bytes get internal ids after the vocabulary, and encoding drops
them, as Hugging Face tokenizers and llama.cpp do. They never show up in ids, `vocab_size` or the ranks.

Padding: `pad_token` (a special token; a converted tokenizer takes it from tokenizer_config.json or
GGUF's `tokenizer.ggml.padding_token_id`) and `padding_side` ("right" unless the source says "left")
tell batching code how to pad; `pad_id` falls back to <|endoftext|>, the book's choice for GPT-2,
which has no pad token. Neither changes how text encodes (nor the fingerprint).

A tokenizer folder (see `save`/`load`) holds:
  ranks.tiktoken   one `base64(token bytes) rank` per line, tiktoken's format
  tokenizer.json   format version, name, split pattern, special tokens, vocab size, sha256 of the ranks
                   (and the absent bytes, the pad token and the padding side, if any)
  vocab.txt        human-readable dump: id, token text, and the two parts it was merged from

    >>> tok = Tokenizer.load("tok/")              # or load_tokenizer("gpt2")
    >>> ids = tok.encode("hello world")
    >>> tok.decode(ids)
    'hello world'
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path

import regex
import tiktoken

from scratchllm.common import ScratchError, atomic_dir, clear_for_overwrite, read_json
from scratchllm.tokenizer.base import PATTERNS, bpe_encode_reference

FORMAT_VERSION = 1
EOT = "<|endoftext|>"
FOLDER_MARKERS = ("tokenizer.json", "ranks.tiktoken")  # what marks a folder as one of our tokenizers
MAX_ID = 2**32 - 1  # the largest token id a shard (uint32) can hold
# a split pattern must give back every character of this text (letters, digits, punctuation, spaces,
# newlines, tabs, CJK, emoji, combining marks, a contraction)
_PATTERN_PROBE = "Hello, world! It's 42.\n\n  \tdéjà vu 東京 🙂 e\u0301 x=y; \r\n end  "


def check_special_tokens(specials: Iterable[str]) -> list[str]:
    """Reject empty, duplicate or overlapping (one inside another) special tokens.

    >>> check_special_tokens(["<|endoftext|>", "<|pad|>"])
    ['<|endoftext|>', '<|pad|>']
    """
    specials = list(specials)
    for s in specials:
        if not isinstance(s, str) or not s:
            raise ScratchError(f"special tokens must be non-empty strings, got {s!r}")
    seen = set()
    for s in specials:
        if s in seen:
            raise ScratchError(f"special token {s!r} is given twice")
        seen.add(s)
    for s in specials:
        for t in specials:
            if s != t and s in t:
                raise ScratchError(f"special token {s!r} overlaps {t!r} (it is contained in it); "
                                   "special tokens must not contain one another")
    return specials


def _is_id(v) -> bool:
    """A token id: an int (not a bool) in [0, MAX_ID]."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_ID


def _printable(b: bytes) -> str:
    """Token bytes as a one-line, quoted string: b'a\\n' -> '"a\\\\n"'; invalid UTF-8 as \\xNN."""
    text = b.decode("utf-8", errors="backslashreplace")
    return json.dumps(text, ensure_ascii=False)


class Tokenizer:
    """Byte-level BPE tokenizer. Build one with `train_bpe`, `Tokenizer.load`, or the GPT-2 loaders."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str,
                 special_tokens: dict[str, int] | None = None, name: str = "scratchllm",
                 absent_bytes: Iterable[int] = (), pad_token: str | None = None, padding_side: str = "right"):
        if not isinstance(mergeable_ranks, Mapping):
            raise ScratchError(f"ranks must be a {{token bytes: rank}} mapping, got a {type(mergeable_ranks).__name__}")
        if special_tokens is not None and not isinstance(special_tokens, Mapping):
            raise ScratchError(f"special tokens must be a {{token: id}} mapping such as {{{EOT!r}: 50256}}, got a "
                               f"{type(special_tokens).__name__}: {special_tokens!r:.80}")
        if not isinstance(pattern, str):
            raise ScratchError(f"the split pattern must be a string (a name: {', '.join(PATTERNS)}, or a regex), "
                               f"got a {type(pattern).__name__}")
        if not isinstance(name, str):
            raise ScratchError(f"the tokenizer name must be a string, got a {type(name).__name__} {name!r}")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens or {})
        self.absent_bytes = sorted(set(absent_bytes))  # single bytes with no token: dropped by encode
        self.pattern = PATTERNS.get(pattern, pattern)  # a pattern name or the regex itself
        self.name = name
        self.pad_token, self.padding_side = pad_token, padding_side
        self._check()
        self._build()

    # ------------------------------------------------------------------ construction
    def _check(self) -> None:
        bad = [(t, r) for t, r in self.mergeable_ranks.items() if not isinstance(t, bytes) or not _is_id(r)]
        if bad:
            raise ScratchError(f"ranks must map token bytes to ids in [0, {MAX_ID}], got {bad[0][0]!r}: {bad[0][1]!r}")
        bad = [b for b in self.absent_bytes if not _is_id(b) or b > 255 or bytes([b]) in self.mergeable_ranks]
        if bad:
            raise ScratchError(f"absent bytes must be byte values 0..255 that have no token, got {bad[:5]}")
        missing = [i for i in range(256) if bytes([i]) not in self.mergeable_ranks and i not in self.absent_bytes]
        if missing:
            raise ScratchError(f"ranks lack {len(missing)} of the 256 single bytes (e.g. byte {missing[0]}); "
                               "a byte-level tokenizer needs all of them")
        ids = list(self.mergeable_ranks.values())
        if len(set(ids)) != len(ids):
            raise ScratchError("two tokens share one rank in the ranks table")
        check_special_tokens(self.special_tokens)
        bad = {k: v for k, v in self.special_tokens.items() if not isinstance(v, int) or isinstance(v, bool)}
        if bad:
            raise ScratchError(f"special token ids must be integers, got {bad}")
        bad = {k: v for k, v in self.special_tokens.items() if not _is_id(v)}
        if bad:
            raise ScratchError(f"special token ids must be in [0, {MAX_ID}], got {bad}")
        # every id below the largest rank is a token or a special token (p50k_base keeps 50256 for one);
        # counted, not listed, so that an edited rank of 10**12 fails at once instead of filling memory
        known, top = set(ids) | set(self.special_tokens.values()), max(ids)
        n_holes = top + 1 - sum(1 for i in known if i <= top)
        if n_holes:
            first = next(i for i in range(top + 1) if i not in known)
            raise ScratchError(f"rank {first} is missing ({n_holes} id(s) below the largest rank are neither "
                               "a token nor a special token): a damaged or edited ranks table")
        clash = set(self.special_tokens.values()) & set(ids)
        if clash:
            raise ScratchError(f"special token ids {sorted(clash)[:5]} collide with regular token ids")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise ScratchError("two special tokens share one id")
        if self.pad_token is not None and self.pad_token not in self.special_tokens:
            raise ScratchError(f"pad token {self.pad_token!r} is not one of the special tokens "
                               f"({', '.join(sorted(self.special_tokens)) or 'none'})")
        if self.padding_side not in ("left", "right"):
            raise ScratchError(f"padding side {self.padding_side!r}: expected 'left' or 'right'")
        try:
            compiled = regex.compile(self.pattern)
        except regex.error as e:
            raise ScratchError(f"invalid split pattern {self.pattern!r}: {e}") from None
        if "".join(compiled.findall(_PATTERN_PROBE)) != _PATTERN_PROBE:  # text it skips would be lost
            raise ScratchError(f"split pattern {self.pattern!r} does not cover every character of a text (it is "
                               f"neither a pattern name, {', '.join(PATTERNS)}, nor a complete split regex)")

    def _build(self) -> None:
        # tiktoken needs a rank for every byte: absent bytes get internal ids >= vocab_size, which
        # encode drops (self._limit); no other id is >= vocab_size
        self._limit = self.vocab_size
        self._ranks = self.mergeable_ranks | {bytes([b]): self._limit + i for i, b in enumerate(self.absent_bytes)}
        self._enc = tiktoken.Encoding(name=self.name, pat_str=self.pattern,
                                      mergeable_ranks=self._ranks, special_tokens=self.special_tokens)
        self._compiled = regex.compile(self.pattern)
        self._id_to_bytes = None  # built lazily by encode_reference / merges
        self._fingerprint = None

    def add_special_tokens(self, tokens: Iterable[str]) -> list[int]:
        """Add special tokens after the current vocabulary (existing ids never move); returns their ids.
        Tokens already present keep their id."""
        tokens = list(tokens)
        check_special_tokens([t for t in tokens if t not in self.special_tokens] + list(self.special_tokens))
        ids = []
        for t in tokens:
            if t not in self.special_tokens:
                self.special_tokens[t] = self.vocab_size
            ids.append(self.special_tokens[t])
        self._build()
        return ids

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1), special tokens included."""
        return max([*self.mergeable_ranks.values(), *self.special_tokens.values()]) + 1

    @property
    def eot_token(self) -> int | None:
        """The id of <|endoftext|>, or None when this tokenizer has no such special token."""
        return self.special_tokens.get(EOT)

    @property
    def pad_id(self) -> int | None:
        """The id batches are padded with: the pad token's, else <|endoftext|>'s, else None."""
        return self.special_tokens[self.pad_token] if self.pad_token is not None else self.eot_token

    def fingerprint(self) -> str:
        """sha256 (hex) of the ranks, pattern and special tokens: equal fingerprints encode alike."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self._ranks_text().encode())
            h.update(self.pattern.encode())
            h.update(json.dumps(sorted(self.special_tokens.items())).encode())
            if self.absent_bytes:  # (so fingerprints of tokenizers without any stay what they were)
                h.update(json.dumps(self.absent_bytes).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __eq__(self, other) -> bool:
        return (isinstance(other, Tokenizer) and self.mergeable_ranks == other.mergeable_ranks
                and self.pattern == other.pattern and self.special_tokens == other.special_tokens
                and self.absent_bytes == other.absent_bytes)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, specials={list(self.special_tokens)})"

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, allowed_special: Collection[str] | str = frozenset(),
               disallowed_special: Collection[str] | str = "all") -> list[int]:
        """Text -> ids (tiktoken core). A special token in `text` raises ValueError unless allowed."""
        return self._drop_absent(self._enc.encode(text, allowed_special=allowed_special,
                                                  disallowed_special=disallowed_special))

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, treating special-token text as plain text."""
        return self._drop_absent(self._enc.encode_ordinary(text))

    def _drop_absent(self, ids: list[int]) -> list[int]:
        """ids without the internal ids of absent bytes (only a tokenizer with absent bytes has any)."""
        if not self.absent_bytes:
            return ids
        return [i for i in ids if i < self._limit]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8,
                     allowed_special: Collection[str] | str = frozenset(),
                     disallowed_special: Collection[str] | str = "all") -> list[list[int]]:
        """Encode many texts on `num_threads` threads (the Rust core releases the GIL)."""
        out = self._enc.encode_batch(list(texts), num_threads=num_threads, allowed_special=allowed_special,
                                     disallowed_special=disallowed_special)
        return [self._drop_absent(ids) for ids in out] if self.absent_bytes else out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the raw bytes they stand for (may end inside a UTF-8 character)."""
        ids = list(ids)
        try:
            return self._enc.decode_bytes(ids)
        except (KeyError, ValueError, OverflowError, TypeError) as e:
            known = self._known_ids()
            bad = [i for i in ids if i not in known]
            raise ScratchError(f"cannot decode ids {bad[:10]}: not in this tokenizer "
                               f"(vocab_size {self.vocab_size})") from e

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Ids -> text. errors="replace" (default) shows broken UTF-8 as U+FFFD; "strict" raises."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token id."""
        return self.decode_bytes([token_id])

    def _known_ids(self) -> set[int]:
        return set(self.mergeable_ranks.values()) | set(self.special_tokens.values())

    # ------------------------------------------------------------------ the pure-Python reference
    def encode_reference(self, text: str, allowed_special: Collection[str] | str = frozenset(),
                         disallowed_special: Collection[str] | str = "all") -> list[int]:
        """Same contract as `encode`, done in pure Python with the BPE merge loop (slow; for tests)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        disallowed = (set(self.special_tokens) - allowed) if disallowed_special == "all" else set(disallowed_special)
        for s in sorted(disallowed, key=len, reverse=True):
            if s in text:
                raise ValueError(f"Encountered text corresponding to disallowed special token {s!r}.")
        ids: list[int] = []
        specials = sorted(allowed, key=len, reverse=True)
        pieces = regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text) if specials else [text]
        for piece in pieces:
            if piece in allowed:
                ids.append(self.special_tokens[piece])
                continue
            for chunk in self._compiled.findall(piece):
                ids.extend(self._ranks[p] for p in bpe_encode_reference(chunk.encode("utf-8"), self._ranks))
        return self._drop_absent(ids)

    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list implied by the ranks, in rank order: each multi-byte token as (left, right).

        A token's parts are what the BPE loop makes of its bytes using only lower ranks."""
        out = []
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            if len(token) < 2:
                continue
            parts = bpe_encode_reference(token, self.mergeable_ranks, max_rank=rank)
            if len(parts) != 2:
                raise ScratchError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
            out.append((parts[0], parts[1]))
        return out

    # ------------------------------------------------------------------ save / load
    def _ranks_text(self) -> str:
        return "".join(f"{base64.b64encode(t).decode()} {r}\n"
                       for t, r in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]))

    def _vocab_text(self) -> str:
        lines = ["# id\ttoken\tmerged from (left + right)"]
        parts = {self.mergeable_ranks[a + b]: (a, b) for a, b in self.merges()}
        for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1]):
            src = f"\t{_printable(parts[rank][0])} + {_printable(parts[rank][1])}" if rank in parts else ""
            lines.append(f"{rank}\t{_printable(token)}{src}")
        lines += [f"{i}\t{s}\t(special)" for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])]
        if self.absent_bytes:
            lines.append("# absent bytes (no token; encode drops them): " +
                         " ".join(f"0x{b:02X}" for b in self.absent_bytes))
        return "\n".join(lines) + "\n"

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ranks.tiktoken, tokenizer.json and vocab.txt into `directory`, atomically. overwrite=True
        replaces only an empty folder or a tokenizer folder (`common.clear_for_overwrite`)."""
        if overwrite:
            clear_for_overwrite(directory, FOLDER_MARKERS, "tokenizer folder", delete=False)
        ranks_text = self._ranks_text()
        meta = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "pattern_name": next((k for k, v in PATTERNS.items() if v == self.pattern), None),
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
            "num_ranks": len(self.mergeable_ranks),
            "ranks_sha256": hashlib.sha256(ranks_text.encode()).hexdigest(),
            "fingerprint": self.fingerprint(),
        }
        if self.absent_bytes:
            meta["absent_bytes"] = self.absent_bytes
        if self.pad_token is not None:
            meta["pad_token"] = self.pad_token
        if self.padding_side != "right":
            meta["padding_side"] = self.padding_side
        with atomic_dir(directory, overwrite=overwrite) as tmp:
            (tmp / "ranks.tiktoken").write_text(ranks_text)
            (tmp / "tokenizer.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
            (tmp / "vocab.txt").write_text(self._vocab_text(), encoding="utf-8")
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a folder written by `save`; checks the format version, every field of tokenizer.json, the
        ranks' checksum and that `vocab_size` agrees with the ranks and special tokens. Every error names
        the file it is about."""
        directory = Path(directory)
        meta_path = directory / "tokenizer.json"
        if not meta_path.is_file():
            raise ScratchError(f"{directory} is not a tokenizer folder: {meta_path.name} is missing")
        meta = read_json(meta_path)
        version = meta.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise ScratchError(f"{meta_path}: field 'format_version' is missing or not an integer")
        if version > FORMAT_VERSION:
            raise ScratchError(f"{meta_path}: format version {version} was written by a newer scratchllm "
                               f"(this one reads up to {FORMAT_VERSION}); upgrade scratchllm to load it")
        for field in ("pattern", "special_tokens", "ranks_sha256", "vocab_size"):
            if field not in meta:
                raise ScratchError(f"{meta_path}: required field {field!r} is missing")
        fix = "re-save or re-train the tokenizer"
        for field, kind, ok in [("pattern", "a string", isinstance(meta["pattern"], str)),
                                ("ranks_sha256", "a string", isinstance(meta["ranks_sha256"], str)),
                                ("name", "a string", isinstance(meta.get("name", ""), str)),
                                ("special_tokens", 'a table {"<|endoftext|>": ID, ...}',
                                 isinstance(meta["special_tokens"], dict)),
                                ("vocab_size", "an integer", _is_id(meta["vocab_size"])),
                                ("num_ranks", "an integer", _is_id(meta.get("num_ranks", 0))),
                                ("absent_bytes", "a list of byte values",
                                 isinstance(meta.get("absent_bytes", []), list)),
                                ("pad_token", "a special token", isinstance(meta.get("pad_token", ""), str)),
                                ("padding_side", '"left" or "right"',
                                 meta.get("padding_side", "right") in ("left", "right"))]:
            if not ok:
                raise ScratchError(f"{meta_path}: field {field!r} must be {kind}, got {meta[field]!r:.80}; {fix}")
        ranks_path = directory / "ranks.tiktoken"
        if not ranks_path.is_file():
            raise ScratchError(f"{ranks_path} is missing; {fix}")
        try:
            data = ranks_path.read_bytes()
        except OSError as e:
            raise ScratchError(f"cannot read {ranks_path}: {e.strerror or e}") from None
        if hashlib.sha256(data).hexdigest() != meta["ranks_sha256"]:
            raise ScratchError(f"{ranks_path} is corrupted or truncated: its sha256 does not match "
                               f"{meta_path.name} ({fix})")
        ranks = read_ranks_file(ranks_path, data)
        if meta.get("num_ranks", len(ranks)) != len(ranks):
            raise ScratchError(f"{meta_path}: 'num_ranks' is {meta['num_ranks']} but {ranks_path.name} holds "
                               f"{len(ranks)} ranks; {fix}")
        try:
            tok = cls(ranks, meta["pattern"], meta["special_tokens"], name=meta.get("name", directory.name),
                      absent_bytes=meta.get("absent_bytes", []), pad_token=meta.get("pad_token"),
                      padding_side=meta.get("padding_side", "right"))
        except ScratchError as e:  # ranks and specials are checked together: name both files
            raise ScratchError(f"{meta_path} + {ranks_path.name}: {e}; {fix}") from None
        if meta["vocab_size"] != tok.vocab_size:
            raise ScratchError(f"{meta_path}: 'vocab_size' is {meta['vocab_size']} but the ranks and special tokens "
                               f"give {tok.vocab_size} ids (largest id + 1); the file was edited or damaged: {fix}")
        return tok


def read_ranks_file(path: str | Path, data: bytes | None = None) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (`base64 rank` per line); errors name the file and line."""
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ScratchError(f"cannot read ranks file {path}: {e.strerror or e}") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError("expected two fields")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except ValueError as e:
            raise ScratchError(f"{path}:{lineno}: not a `base64 rank` line ({e}): {line[:60]!r}") from None
        if token in ranks:
            raise ScratchError(f"{path}:{lineno}: token {token!r} appears twice")
        if not _is_id(rank):
            raise ScratchError(f"{path}:{lineno}: rank {rank} is not in [0, {MAX_ID}]")
        ranks[token] = rank
    if not ranks:
        raise ScratchError(f"{path} holds no ranks (empty file?)")
    return ranks
