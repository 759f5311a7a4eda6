"""Documents -> token shards on disk (`scratchllm prepare`), and memory-mapped reading (`open_shards`).

A shard folder holds `train_XXXX.bin` / `val_XXXX.bin` (raw little-endian token ids, uint16 when the
vocabulary has <= 65536 ids, else uint32; a token that does not fit raises, it is never truncated)
and `index.json` (dtype, token counts, shard names, tokenizer name + fingerprint, sources with sha256,
options, and which validation rule applied). Every document is followed by the tokenizer's
`<|endoftext|>` id, so documents never run into each other; a tokenizer without one is refused.

The folder remembers its tokenizer, so that training needs no `--tokenizer`: GPT-2's by name (index.json
`tokenizer.spec` is "gpt2"; its files come from tiktoken's cache), any other as a copy in `tokenizer/`
(`Tokenizer.save`). `shard_tokenizer(folder)` loads it, checked against the fingerprint; folders made
before this return None.

Validation split, deterministic: document i (counted after cleaning) goes to validation when
floor((i+1)*f) > floor(i*f), i.e. every 1/f-th document. When that picks no document (a corpus of one
book, as in the book's chapter 5), the last round(f * tokens) tokens of the stream become validation
instead ("tail" rule). With fewer than 2 tokens in all there is nothing to split ("too_few_tokens");
with val_fraction 0 there is no validation split ("none"). index.json and the report name the rule.

Tokenization runs in `workers` processes (each loads the tokenizer from its folder or spec, so only
strings cross process boundaries). Long documents are cut into pieces at "letter/digit then newline"
positions, which are pre-token boundaries of the GPT-2 and GPT-4 split patterns, so pieces encode
exactly as the whole document does (tests check this); other patterns are never cut. Output goes to a
temporary folder renamed into place at the end: Ctrl-C leaves nothing half-written.

    >>> index = prepare(["book.txt"], "gpt2", "shards/", val_fraction=0.1)   # doctest: +SKIP
    >>> ds = open_shards("shards/"); ds.train[0][:5]                         # doctest: +SKIP
    >>> tok = shard_tokenizer("shards/")                                     # doctest: +SKIP
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from scratchllm import __version__
from scratchllm.common import (
    Progress,
    ScratchError,
    atomic_dir,
    atomic_write_text,
    check_can_create,
    clear_for_overwrite,
    print0,
)
from scratchllm.data.sources import SourceStats, check_options, expand_inputs, iter_documents

if TYPE_CHECKING:
    from scratchllm.tokenizer import Tokenizer

SHARD_TOKENS = 100_000_000  # tokens per shard file (200 MB as uint16)
CHUNK_CHARS = 1 << 18  # characters per tokenization task (pieces of long documents, or many short ones)
FORMAT_VERSION = 1
FOLDER_MARKERS = ("index.json",)  # what marks a folder as a shard folder of ours (--overwrite may replace it)
_SHARD_NAME = re.compile(r"^(train|val)_\d{4,}\.bin$")
_SAFE_CUT = re.compile(r"[^\W\d_]\n|\d\n")  # a letter or digit followed by a newline


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32.

    >>> token_dtype(50257), token_dtype(65537)
    (dtype('uint16'), dtype('uint32'))
    """
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def split_for_encoding(text: str, chunk: int = CHUNK_CHARS) -> list[str]:
    """Cut a long text into pieces of about `chunk` characters, only just before a newline that follows
    a letter or digit. No GPT-2/GPT-4 pre-token spans such a point and the patterns never look behind,
    so encode(text) == sum(encode(piece) for piece in pieces).

    >>> split_for_encoding("ab\\ncd\\nef", chunk=2)
    ['ab', '\\ncd', '\\nef']
    """
    pieces, start = [], 0
    while len(text) - start > chunk:
        m = _SAFE_CUT.search(text, start + chunk - 1)
        if m is None:
            break
        pieces.append(text[start:m.start() + 1])
        start = m.start() + 1
    pieces.append(text[start:])
    return pieces


# --------------------------------------------------------------------------------------------- workers
_TOK = None  # (tokenizer, eot id, shard dtype) of this (worker) process


def _init_worker(spec, ignore_sigint: bool = False) -> None:
    """Pool initializer (and the in-process path): load the tokenizer once per process.
    `spec` is a Tokenizer (in-process, or inherited by fork) or a folder / "gpt2" (spawn)."""
    global _TOK
    from scratchllm.tokenizer import Tokenizer, load_tokenizer

    if ignore_sigint:  # Ctrl-C is the parent's job: it terminates the pool and removes the temp folder
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    tok = spec if isinstance(spec, Tokenizer) else load_tokenizer(spec)
    _TOK = (tok, tok.eot_token, token_dtype(tok.vocab_size))


def _encode_task(task: list[tuple[bool, str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """[(is_val, text, ends_document)] -> (train tokens, val tokens) in the shard dtype."""
    tok, eot, dtype = _TOK
    out: tuple[list[int], list[int]] = ([], [])
    for is_val, text, ends in task:
        ids = out[is_val]
        ids.extend(tok.encode_ordinary(text))
        if ends:
            ids.append(eot)
    arrays = []
    for ids in out:
        arr = np.array(ids, dtype=np.int64)
        if arr.size and (arr.max() > np.iinfo(dtype).max or arr.min() < 0):
            bad = int(arr.max()) if arr.max() > np.iinfo(dtype).max else int(arr.min())
            raise ScratchError(f"token id {bad} does not fit the shard dtype {dtype.name} (tokenizer "
                               f"{tok.name!r} claims vocab_size {tok.vocab_size}); refusing to truncate")
        arrays.append(arr.astype(dtype))
    return arrays[0], arrays[1]


# --------------------------------------------------------------------------------------------- writing
@dataclass
class _ShardWriter:
    folder: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    names: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    def write(self, arr: np.ndarray) -> None:
        while arr.size:
            if not self.counts or self.counts[-1] >= self.shard_tokens:
                self.names.append(f"{self.split}_{len(self.names):04d}.bin")
                self.counts.append(0)
            room = self.shard_tokens - self.counts[-1]
            part, arr = arr[:room], arr[room:]
            with open(self.folder / self.names[-1], "ab") as f:
                f.write(part.tobytes())
            self.counts[-1] += part.size

    def pop_tail(self, n: int) -> np.ndarray:
        """Remove the last n tokens (across shards) and return them in stream order."""
        parts = []
        while n > 0:
            path, have = self.folder / self.names[-1], self.counts[-1]
            take = min(n, have)
            data = np.fromfile(path, dtype=self.dtype)
            parts.append(data[have - take:])
            if take == have:
                path.unlink()
                self.names.pop()
                self.counts.pop()
            else:
                data[:have - take].tofile(path)
                self.counts[-1] -= take
            n -= take
        return np.concatenate(parts[::-1])

    @property
    def tokens(self) -> int:
        return sum(self.counts)


def _tasks(docs, val_fraction: float, chunk: int, can_cut: bool, counts: dict, progress: Progress):
    """Group documents into tokenization tasks of about `chunk` characters; decide val per document."""
    task, size, i = [], 0, 0
    for doc in docs:
        is_val = int((i + 1) * val_fraction) > int(i * val_fraction)
        counts["val" if is_val else "train"] += 1
        i += 1
        pieces = split_for_encoding(doc.text, chunk) if can_cut else [doc.text]
        for j, piece in enumerate(pieces):
            task.append((is_val, piece, j == len(pieces) - 1))
            size += len(piece)
            if size >= chunk:
                yield task
                task, size = [], 0
        progress.update(len(doc.text))
    if task:
        yield task


def prepare(inputs: list[str], tokenizer, out_dir: str | Path, val_fraction: float = 0.005,
            shard_tokens: int = SHARD_TOKENS, workers: int = 1, overwrite: bool = False,
            progress: bool = True, chunk_chars: int = CHUNK_CHARS, **source_options) -> dict:
    """Tokenize `inputs` (see sources.py) into a shard folder `out_dir`; return its index.

    `tokenizer` is a Tokenizer, a tokenizer folder or "gpt2". `source_options` go to `iter_documents`
    (text_field, errors, strip_gutenberg, min_chars, dedup, normalize_newlines). Every argument and the
    output folder are checked before any work: an existing `out_dir` is refused unless `overwrite`, which
    replaces only an empty folder or a shard folder (one holding index.json), never other files.
    """
    from scratchllm.tokenizer import PATTERNS, Tokenizer, load_tokenizer

    if not 0.0 <= val_fraction < 1.0:
        raise ScratchError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1 or workers < 1 or chunk_chars < 1:
        raise ScratchError(f"--shard-tokens and --workers must be >= 1 (got {shard_tokens}, {workers})")
    check_options(source_options.get("errors", "strict"), source_options.get("min_chars", 0))
    shown, out_dir = out_dir, Path(os.path.abspath(out_dir))  # "." and "x/.." have no name to rename
    _check_out(shown, out_dir, overwrite)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.eot_token is None:
        raise ScratchError(f"tokenizer {tok.name!r} has no <|endoftext|> token, which prepare puts after every "
                           "document so that documents do not run into each other; train the tokenizer with "
                           "--special '<|endoftext|>' (the default of `scratchllm tokenizer train`)")
    spec = None if isinstance(tokenizer, Tokenizer) else str(tokenizer)
    if spec is not None and spec != "gpt2":
        spec = str(Path(spec).resolve())
    dtype = token_dtype(tok.vocab_size)
    files = expand_inputs(inputs)  # fails early on a bad input; fetches data:NAME inputs (only here)
    inside = [f for f in files if not f.startswith(("builtin:", "hf:")) and out_dir in Path(os.path.abspath(f)).parents]
    if inside:
        raise ScratchError(f"input {inside[0]} is inside --out {shown}: the output of an earlier prepare would be "
                           "read as text. Choose an --out outside the input folders")
    sized = all(Path(p).is_file() for p in files)  # builtin:/hf: inputs have no size: no ETA then
    approx_chars = sum(Path(p).stat().st_size for p in files) if sized else None
    stats = SourceStats()
    counts = {"train": 0, "val": 0}
    bar = Progress(approx_chars, unit="chars", desc="prepare", enabled=progress)
    start = time.perf_counter()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        docs = iter_documents(inputs, stats=stats, expanded=files, **source_options)
        tasks = _tasks(docs, val_fraction, chunk_chars, tok.pattern in PATTERNS.values(), counts, bar)
        pool = None
        try:
            if workers == 1:
                _init_worker(tok)
                results = map(_encode_task, tasks)
            else:
                pool = _pool(workers, tok, spec, Path(scratch))
                results = _ordered(pool, tasks, 2 * workers)
            for train_ids, val_ids in results:
                writers["train"].write(train_ids)
                writers["val"].write(val_ids)
        except BrokenProcessPool:
            raise ScratchError(f"a tokenizer worker process died (killed, or out of memory?); nothing was "
                               f"written to {shown}. Try fewer --workers") from None
        finally:
            if pool is not None:  # on Ctrl-C or an error: drop queued tasks, let running ones end
                pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if counts["val"] and counts["train"]:
            rule = "documents"
        elif val_fraction == 0:
            rule = "none"
        elif writers["train"].tokens < 2:  # the train split must keep at least one token
            rule = "too_few_tokens"
        else:
            rule = "tail"
            n_val = min(max(1, round(val_fraction * writers["train"].tokens)), writers["train"].tokens - 1)
            writers["val"].write(writers["train"].pop_tail(n_val))
        index = {
            "format": FORMAT_VERSION,
            "created_by": f"scratchllm {__version__}",
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eot_token": tok.eot_token,
            "train_tokens": writers["train"].tokens,
            "val_tokens": writers["val"].tokens,
            "train_shards": writers["train"].names,
            "val_shards": writers["val"].names,
            "train_shard_tokens": writers["train"].counts,
            "val_shard_tokens": writers["val"].counts,
            "val_rule": rule,
            "documents": {"train": counts["train"], "val": counts["val"], "empty_files": stats.empty_files,
                          "empty_documents": stats.empty_documents, "too_short": stats.too_short,
                          "duplicates": stats.duplicates},
            "tokenizer": {"name": tok.name, "fingerprint": tok.fingerprint(), "spec": spec},
            "sources": stats.sources,
            "options": {"val_fraction": val_fraction, "shard_tokens": shard_tokens, **source_options},
            "seconds": round(time.perf_counter() - start, 3),
        }
        if spec != "gpt2":  # GPT-2 is remembered by name; any other tokenizer is kept as a copy
            tok.save(tmp / "tokenizer")
        atomic_write_text(tmp / "index.json", json.dumps(index, indent=1) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for folder in (tmp, tmp / "tokenizer"):  # temp folders are private; the result is an ordinary folder
            if folder.is_dir():
                os.chmod(folder, 0o777 & ~umask)
        os.chmod(tmp / "index.json", 0o666 & ~umask)
        _check_out(shown, out_dir, overwrite)  # again: something may have appeared there while we worked
    return index


def _check_out(shown, out_dir: Path, overwrite: bool) -> None:
    """--out may be created (or, with overwrite, replaced: an empty or a shard folder only)."""
    if overwrite:
        clear_for_overwrite(out_dir, FOLDER_MARKERS, "shard folder", delete=False)
    elif os.path.lexists(out_dir):
        raise ScratchError(f"--out {shown} already exists (pass --overwrite to replace it: only a shard folder "
                           "or an empty one is replaced)")
    check_can_create(out_dir)


def _pool(workers: int, tok, spec: str | None, scratch: Path) -> ProcessPoolExecutor:
    """Worker processes holding the tokenizer: forked where possible (they inherit it, nothing is
    loaded again), else spawned (they load it from `spec`, or from a copy saved in `scratch`). A
    worker that dies makes the pool raise BrokenProcessPool instead of hanging."""
    if "fork" in mp.get_all_start_methods():
        ctx, arg = mp.get_context("fork"), tok
    else:
        ctx, arg = mp.get_context("spawn"), spec or str(tok.save(scratch / "tokenizer"))
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(arg, True))


def _ordered(pool: ProcessPoolExecutor, tasks, max_in_flight: int):
    """Results in task order without reading the whole input ahead: at most `max_in_flight` queued."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.submit(_encode_task, task))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def report(index: dict, out_dir: str | Path) -> str:
    """A short human summary of a prepared folder (printed by `scratchllm prepare`)."""
    d = index["documents"]
    rule = {"documents": f"every 1/f-th document (f={index['options']['val_fraction']})",
            "tail": "too few documents for a per-document split: the tail of the token stream",
            "too_few_tokens": f"none: only {index['train_tokens']} token(s) in all, too few to split off "
                              f"a validation part (val_fraction {index['options']['val_fraction']})",
            "none": "no validation split (val_fraction 0)"}[index["val_rule"]]
    skipped = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in d.items() if k not in ("train", "val") and v)
    return "\n".join([
        f"wrote {out_dir}: {index['train_tokens']:,} train tokens in {len(index['train_shards'])} shard(s), "
        f"{index['val_tokens']:,} val tokens in {len(index['val_shards'])} shard(s), dtype {index['dtype']}",
        f"documents: {d['train']:,} train, {d['val']:,} val" + (f"; skipped {skipped}" if skipped else ""),
        f"validation: {rule}",
        f"tokenizer: {index['tokenizer']['name']} (vocab {index['vocab_size']}, fingerprint "
        f"{index['tokenizer']['fingerprint'][:12]}); {index['seconds']:.1f}s",
    ])


# --------------------------------------------------------------------------------------------- reading
@dataclass
class ShardSet:
    """A prepared folder, memory-mapped: `train`/`val` are lists of 1-D np.memmap token arrays."""

    path: Path
    index: dict
    train: list[np.ndarray]
    val: list[np.ndarray]

    @property
    def vocab_size(self) -> int:
        return self.index["vocab_size"]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.index["dtype"])

    @property
    def train_tokens(self) -> int:
        return self.index["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.index["val_tokens"]


def _read_index(path: Path) -> tuple[dict, np.dtype, dict]:
    """(index, dtype, {split: (shard names, token counts)}) of a shard folder; ScratchError if damaged."""
    index_file = path / "index.json"
    if not path.is_dir():
        raise ScratchError(f"{path} is not a shard folder ({'a file' if path.exists() else 'it does not exist'}); "
                           "make one with `scratchllm prepare`")
    if not index_file.is_file():
        raise ScratchError(f"{path} has no index.json; make a shard folder with `scratchllm prepare`")
    again = "run `scratchllm prepare` again"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScratchError(f"cannot read {index_file}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScratchError(f"{index_file} is damaged ({type(e).__name__}: {e}); {again}") from None
    if not isinstance(index, dict):
        raise ScratchError(f"{index_file} is damaged (a JSON {type(index).__name__}, not an object); {again}")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if index.get("dtype") not in ("uint16", "uint32"):
        raise ScratchError(f"{index_file}: field 'dtype' is {index.get('dtype')!r}, not uint16 or uint32; {again}")
    for key in ("vocab_size", "train_tokens", "val_tokens"):
        if not count(index.get(key)):
            raise ScratchError(f"{index_file}: field {key!r} is {index.get(key)!r}, not a count; {again}")
    names = {}
    for split in ("train", "val"):
        files, counts = index.get(f"{split}_shards"), index.get(f"{split}_shard_tokens")
        if not (isinstance(files, list) and isinstance(counts, list) and len(files) == len(counts)
                and all(isinstance(f, str) and _SHARD_NAME.match(f) for f in files) and all(map(count, counts))):
            raise ScratchError(f"{index_file}: fields '{split}_shards' and '{split}_shard_tokens' must be lists of "
                               f"the same length of {split}_XXXX.bin names and token counts; {again}")
        if sum(counts) != index[f"{split}_tokens"]:
            raise ScratchError(f"{index_file}: '{split}_shard_tokens' add up to {sum(counts)}, not "
                               f"'{split}_tokens' {index[f'{split}_tokens']}; {again}")
        names[split] = (files, counts)
    return index, np.dtype(index["dtype"]), names


def shard_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer a shard folder was made with (a Tokenizer), or None when the folder does not hold
    it (made by an older scratchllm, before shard folders remembered their tokenizer).

    Its copy in `tokenizer/` when there is one, else GPT-2's when index.json names "gpt2" as the spec;
    either must have the fingerprint index.json recorded, else the folder is damaged (ScratchError).

        >>> shard_tokenizer("shards/").name                                  # doctest: +SKIP
        'gpt2'
    """
    from scratchllm.tokenizer import Tokenizer, load_tokenizer

    path = Path(path)
    made = _read_index(path)[0].get("tokenizer") or {}
    if (path / "tokenizer").is_dir():
        tok, where = Tokenizer.load(path / "tokenizer"), str(path / "tokenizer")
    elif made.get("spec") == "gpt2":
        tok, where = load_tokenizer("gpt2"), "GPT-2's tokenizer"
    else:
        return None
    if tok.fingerprint() != made.get("fingerprint"):
        raise ScratchError(f"{where} (fingerprint {tok.fingerprint()[:12]}) is not the tokenizer {path} was made "
                           f"with ({made.get('name')!r}, fingerprint {str(made.get('fingerprint'))[:12]}); the "
                           "folder is damaged: run `scratchllm prepare` again")
    return tok


def open_shards(path: str | Path, tokenizer=None) -> ShardSet:
    """Memory-map a folder made by `prepare` (constant memory however large). With `tokenizer` (a
    Tokenizer, folder or "gpt2"), refuse shards made with a different tokenizer (fingerprint check).
    Without one, `shard_tokenizer(path)` gives the tokenizer the folder was made with."""
    path = Path(path)
    index, dtype, names = _read_index(path)
    if tokenizer is not None:
        from scratchllm.tokenizer import Tokenizer, load_tokenizer

        tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
        made = index.get("tokenizer", {})
        if made.get("fingerprint") != tok.fingerprint():
            raise ScratchError(f"{path} was made with tokenizer {made.get('name')!r} (fingerprint "
                               f"{str(made.get('fingerprint'))[:12]}), not with {tok.name!r} (fingerprint "
                               f"{tok.fingerprint()[:12]}); prepare the data again with this tokenizer")
    arrays = {}
    for split, (files, counts) in names.items():
        arrays[split] = []
        for name, count in zip(files, counts):
            f = path / name
            if not f.is_file() or f.stat().st_size != count * dtype.itemsize:
                raise ScratchError(f"shard {f} is missing or truncated (expected {count} tokens of "
                                   f"{dtype.name}); run `scratchllm prepare` again")
            arrays[split].append(np.memmap(f, dtype=dtype, mode="r") if count else np.zeros(0, dtype))
    return ShardSet(path, index, arrays["train"], arrays["val"])


# --------------------------------------------------------------------------------------------- CLI
def run(args) -> int:
    """`scratchllm prepare`: see the module docstring and `scratchllm prepare --help`."""
    index = prepare(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                    shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite,
                    progress=not args.quiet, text_field=args.text_field, errors=args.errors,
                    strip_gutenberg=args.strip_gutenberg, min_chars=args.min_chars, dedup=args.dedup,
                    normalize_newlines=not args.keep_crlf)
    print0(report(index, args.out))
    return 0
