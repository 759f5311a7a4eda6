"""Text in every shape -> a stream of cleaned documents (the first step of `scratchllm prepare`).

Inputs (mixed freely; `iter_documents` takes a list):
  a file           .jsonl (one JSON object per line, `text_field`), .parquet (column `text_field`,
                   needs pyarrow) -- in both a null text counts as an empty document -- and
                   anything else is UTF-8 text: one
                   document per file, or several when the file separates them with `<|endoftext|>`
                   (as TinyStories does)
  a folder         every .txt/.md/.rst/.text/.jsonl/.parquet file under it, recursively, sorted;
                   names starting with "." below the folder are skipped
  a glob           "corpus/**/*.txt" (quote it in the shell); matching nothing is an error
  builtin:pydocs   Python's own documentation: `pydoc_data.topics` and the standard library's
                   docstrings, read with `ast` (nothing is imported or executed), deterministic order
  data:NAME        a dataset of `scratchllm data list`, downloaded (and verified) into the cache first
  hf:NAME[:SPLIT]  a Hugging Face dataset (needs `datasets`): a folder written by `save_to_disk`, or a
                   hub name streamed with `load_dataset(..., streaming=True)`; SPLIT defaults to train

Cleaning, in this order: CRLF -> LF (`normalize_newlines`), Project Gutenberg header/footer removal
(`strip_gutenberg`), dropping documents shorter than `min_chars`, exact-duplicate removal (`dedup`).
Tokenization and sharding live in shards.py; this module only yields `Document(text, source)`.

    >>> stats = SourceStats()
    >>> docs = list(iter_documents(["book.txt", "notes/"], strip_gutenberg=True, stats=stats))  # doctest: +SKIP
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from scratchllm.common import ScratchError, sha256_file

EOT = "<|endoftext|>"
TEXT_EXTS = {".txt", ".md", ".rst", ".text"}
FOLDER_EXTS = TEXT_EXTS | {".jsonl", ".parquet"}
_GUTENBERG_START = re.compile(r"^[ \t]*\*\*\*[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*\n",
                              re.IGNORECASE | re.MULTILINE)
_GUTENBERG_END = re.compile(r"^[ \t]*\*\*\*[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK",
                            re.IGNORECASE | re.MULTILINE)


@dataclass
class Document:
    text: str
    source: str  # file path (with :line for JSONL), "builtin:pydocs/..." or "hf:NAME"


@dataclass
class SourceStats:
    """Filled in while iterating: what was read and what was dropped (for index.json and the report)."""

    sources: list[dict] = field(default_factory=list)  # {"path", "sha256", "bytes"} per input file
    documents: int = 0  # documents yielded
    empty_files: int = 0  # skipped: no text at all
    empty_documents: int = 0  # skipped: empty after cleaning
    too_short: int = 0  # dropped by min_chars
    duplicates: int = 0  # dropped by dedup


# --------------------------------------------------------------------------------------------- cleaning
def strip_gutenberg_text(text: str) -> str:
    """Keep the text between Project Gutenberg's START and END marker lines; unchanged without them.

    >>> strip_gutenberg_text("header\\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\\nBody.\\n"
    ...                      "*** END OF THE PROJECT GUTENBERG EBOOK X ***\\nlicense")
    'Body.'
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip() if (start or end) else text


def _decode(data: bytes, where: str, errors: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ScratchError(f"{where}: bytes at offset {offset + e.start} are not valid UTF-8 "
                           f"({data[e.start:e.start + 4]!r}); convert the file to UTF-8 or pass "
                           "--errors replace to substitute U+FFFD") from None


# --------------------------------------------------------------------------------------------- readers
def _cannot_read(path: Path, e: OSError) -> ScratchError:
    return ScratchError(f"cannot read {path}: {e.strerror or e}; check that it exists and is readable")


def _read_text(path: Path, errors: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _cannot_read(path, e) from None
    stats.sources.append({"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)})
    if not data.strip():
        stats.empty_files += 1
        return
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark is not text
    text = _decode(data[bom:], str(path), errors, offset=bom)
    parts = text.split(EOT)
    if len(parts) == 1:
        yield text, str(path)
        return
    for i, part in enumerate(parts):  # the separator's own line breaks belong to neither document
        yield part.strip("\r\n"), f"{path}#{i}"


def _read_jsonl(path: Path, text_field: str, errors: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    h, offset, nonblank = hashlib.sha256(), 0, 0
    try:
        f = open(path, "rb")
    except OSError as e:
        raise _cannot_read(path, e) from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            h.update(raw)
            where = f"{path}:{lineno}"
            bom = 3 if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            line = _decode(raw[bom:], where, errors, offset + bom)
            offset += len(raw)
            if not line.strip():
                continue
            nonblank += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScratchError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line of a "
                                   ".jsonl file must be one JSON object") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ScratchError(f"{where}: no field {text_field!r} (found {keys}); choose the field "
                                   "with --text-field")
            yield from _checked(obj[text_field], where, text_field, stats)
    stats.sources.append({"path": str(path), "sha256": h.hexdigest(), "bytes": offset})
    if nonblank == 0:
        stats.empty_files += 1


def _checked(value, where: str, text_field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    """One JSONL/Parquet/HF value: a string is yielded, a null is counted as an empty document, anything
    else is an error naming the row and the field.

    >>> list(_checked("hi", "t.parquet:row 0", "text", SourceStats()))
    [('hi', 't.parquet:row 0')]
    """
    if value is None:
        stats.empty_documents += 1
    elif isinstance(value, str):
        yield value, where
    else:
        raise ScratchError(f"{where}: field {text_field!r} is a {type(value).__name__}, not a string; "
                           "choose the text column with --text-field")


def _read_parquet(path: Path, text_field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ScratchError(f"{path}: reading .parquet needs pyarrow (pip install 'scratchllm[parquet]')") from None
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise _cannot_read(path, e) from None
    except pa.ArrowException as e:
        raise ScratchError(f"{path}: not a valid Parquet file ({e}); rename it if it holds text") from None
    if text_field not in pf.schema_arrow.names:
        raise ScratchError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); choose "
                           "it with --text-field")
    stats.sources.append({"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size})
    if pf.metadata.num_rows == 0:
        stats.empty_files += 1
    row = 0
    batches = pf.iter_batches(columns=[text_field], batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as e:  # a damaged row group
            raise ScratchError(f"{path}: cannot read the rows after row {row} ({e}); the file is damaged") from None
        if batch is None:
            break
        for value in batch.column(0).to_pylist():
            yield from _checked(value, f"{path}:row {row}", text_field, stats)
            row += 1


def _hf_spec(spec: str) -> tuple[str, str, bool]:
    """`NAME[:SPLIT]` of an hf: input -> (name, split, is a local folder). A name that exists on disk,
    or is written as a path (/, ./, ../, ~), is a folder written by `save_to_disk`; else a hub name.

    >>> _hf_spec("roneneldan/TinyStories:validation")
    ('roneneldan/TinyStories', 'validation', False)
    """
    name, split = spec, "train"
    if not Path(spec).exists() and ":" in spec:
        name, split = spec.rsplit(":", 1)
    local = Path(name).exists() or name.startswith(("/", "./", "../", "~"))
    return (os.path.expanduser(name) if local else name), split, local


def _datasets(spec: str):
    try:
        import datasets
    except ImportError:
        raise ScratchError(f"hf:{spec}: Hugging Face datasets need `pip install 'scratchllm[hf]'`") from None
    return datasets


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub ($HF_ENDPOINT, or the https proxy that would be used) does not accept a
    connection within `timeout` seconds, or None when it does. One try: huggingface_hub itself retries
    a failing request for about 25 s before it gives up."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = p.hostname or "", p.port or 80
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


def _check_hf(spec: str) -> None:
    """Before any work: an hf: input can be read (datasets installed; a local folder is a saved dataset
    holding the split; a hub name with the Hub reachable, unless HF_HUB_OFFLINE/HF_DATASETS_OFFLINE say
    to read the local Hugging Face cache)."""
    datasets = _datasets(spec)
    name, split, local = _hf_spec(spec)
    if local:
        folder = Path(name)
        if not folder.is_dir():
            raise ScratchError(f"hf:{spec}: folder {name} {'is a file' if folder.exists() else 'does not exist'}; "
                               "hf:DIR needs a folder written by `Dataset.save_to_disk`")
        if (folder / "dataset_dict.json").is_file():
            from scratchllm.common import read_json

            splits = read_json(folder / "dataset_dict.json").get("splits")
            if isinstance(splits, list) and split not in splits:
                raise ScratchError(f"hf:{spec}: no split {split!r} (splits: {sorted(splits)}); use hf:{name}:SPLIT")
        elif not (folder / "state.json").is_file():
            raise ScratchError(f"hf:{spec}: {name} is not a dataset saved with `save_to_disk` (it has neither "
                               "state.json nor dataset_dict.json); for a folder of text files drop the hf: prefix")
        return
    if datasets.config.HF_HUB_OFFLINE:
        return
    why = _hub_unreachable()
    if why is not None:
        raise ScratchError(f"hf:{spec}: cannot reach the Hugging Face Hub ({why}). Offline, save the dataset "
                           "where there is a network (`load_dataset(NAME).save_to_disk(DIR)`) and pass hf:DIR, or "
                           "set HF_DATASETS_OFFLINE=1 to read it from the local Hugging Face cache")


def _read_hf(spec: str, text_field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    datasets = _datasets(spec)
    name, split, local = _hf_spec(spec)
    try:
        if local:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ScratchError(f"hf:{spec}: no split {split!r} (splits: {sorted(ds)}); use hf:{name}:SPLIT")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except ScratchError:
        raise
    except Exception as e:  # datasets raises ConnectionError, FileNotFoundError, ValueError (bad split), ...
        raise ScratchError(f"hf:{spec}: cannot open the dataset ({type(e).__name__}: {e})") from None
    stats.sources.append({"path": f"hf:{spec}", "sha256": None, "bytes": None,
                          "fingerprint": getattr(ds, "_fingerprint", None)})
    rows, i = iter(ds), 0
    while True:
        try:
            row = next(rows, None)
        except Exception as e:  # a dropped connection while streaming, a damaged arrow file
            raise ScratchError(f"hf:{spec}: reading row {i} failed ({type(e).__name__}: {e})") from None
        if row is None:
            break
        if text_field not in row:
            raise ScratchError(f"hf:{spec}: row {i} has no field {text_field!r} (fields: {sorted(row)}); "
                               "choose it with --text-field")
        yield from _checked(row[text_field], f"hf:{spec}:row {i}", text_field, stats)
        i += 1


def expand_inputs(inputs: list[str]) -> list[str]:
    """Turn folders and globs into sorted file lists; keep builtin:/hf: specs. Errors name the input.

    >>> expand_inputs(["builtin:pydocs"])
    ['builtin:pydocs']
    """
    if not inputs:
        raise ScratchError("no --input given")
    out: list[str] = []
    for spec in inputs:
        if spec.startswith("data:"):  # a registered dataset: fetched (verified) into the cache first
            from scratchllm.data.registry import get

            out.append(str(get(spec.removeprefix("data:"))))
        elif spec.startswith(("builtin:", "hf:")):
            if spec.startswith("builtin:") and spec != "builtin:pydocs":
                raise ScratchError(f"unknown built-in corpus {spec!r}; the built-in corpus is builtin:pydocs")
            if spec.startswith("hf:"):
                _check_hf(spec[3:])
            out.append(spec)
        elif Path(spec).is_dir():
            folder = Path(spec)  # hidden names count only below it: "../data" or "~/.cache/x" are fine
            files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_EXTS
                           and not any(s.startswith(".") for s in p.relative_to(folder).parts))
            if not files:
                raise ScratchError(f"folder {spec} holds no {'/'.join(sorted(FOLDER_EXTS))} files")
            out.extend(files)
        elif Path(spec).is_file():
            out.append(spec)
        elif glob.has_magic(spec) and not Path(spec).exists():
            files = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not files:
                raise ScratchError(f"the pattern {spec!r} matches no files")
            out.extend(files)
        elif Path(spec).is_symlink() and not Path(spec).exists():
            raise ScratchError(f"input {spec} is a broken symbolic link (what it points to does not exist)")
        elif Path(spec).exists():  # /dev/zero would never end, a FIFO can be read only once
            raise ScratchError(f"input {spec} is not a regular file (a device, FIFO or socket); prepare reads "
                               "files, folders, globs, builtin:pydocs, data:NAME or hf:NAME: save the stream to "
                               "a file first")
        else:
            raise ScratchError(f"input {spec} does not exist (expected a file, folder, glob, builtin:pydocs, "
                               "data:NAME or hf:NAME)")
    unreadable = [p for p in out if not p.startswith(("builtin:", "hf:")) and not os.access(p, os.R_OK)]
    if unreadable:
        raise ScratchError(f"cannot read {unreadable[0]} (permission denied)"
                           + (f" and {len(unreadable) - 1} more file(s)" if len(unreadable) > 1 else ""))
    return out


def _raw_documents(spec: str, text_field: str, errors: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    if spec == "builtin:pydocs":
        docs = pydocs_documents()
        stats.sources.append({"path": spec, "bytes": sum(len(d.encode()) for d in docs),
                              "sha256": hashlib.sha256("\x00".join(docs).encode()).hexdigest()})
        for i, d in enumerate(docs):
            yield d, f"builtin:pydocs#{i}"
    elif spec.startswith("hf:"):
        yield from _read_hf(spec[3:], text_field, stats)
    elif spec.lower().endswith(".jsonl"):
        yield from _read_jsonl(Path(spec), text_field, errors, stats)
    elif spec.lower().endswith(".parquet"):
        yield from _read_parquet(Path(spec), text_field, stats)
    else:
        yield from _read_text(Path(spec), errors, stats)


def check_options(errors: str = "strict", min_chars: int = 0) -> None:
    """The cleaning options `iter_documents` takes, checked before any work (prepare calls this first)."""
    if errors not in {"strict", "replace"}:
        raise ScratchError(f"--errors must be 'strict' or 'replace', got {errors!r}")
    if not isinstance(min_chars, int) or isinstance(min_chars, bool) or min_chars < 0:
        raise ScratchError(f"--min-chars must be an integer >= 0, got {min_chars!r}")


def iter_documents(inputs: list[str], text_field: str = "text", errors: str = "strict",
                   strip_gutenberg: bool = False, min_chars: int = 0, dedup: bool = False,
                   normalize_newlines: bool = True, stats: SourceStats | None = None,
                   expanded: list[str] | None = None) -> Iterator[Document]:
    """Yield the cleaned documents of `inputs` in a deterministic order (input order, files sorted).

    Raises ScratchError for a missing path, a glob matching nothing, undecodable bytes (file and byte
    offset; `errors="replace"` continues), a bad JSONL line (file:line), a Parquet/HF value that is not
    a string (row and field), or when every input is empty. `stats`, when given, collects the sources
    (path, sha256) and the counts of what was skipped. `expanded` is `expand_inputs(inputs)` when the
    caller already has it (prepare does), so data:NAME inputs are fetched and globs expanded only once.
    """
    check_options(errors, min_chars)
    stats = stats if stats is not None else SourceStats()
    seen: set[bytes] = set()
    for spec in expanded if expanded is not None else expand_inputs(inputs):
        for text, where in _raw_documents(spec, text_field, errors, stats):
            if normalize_newlines:
                text = text.replace("\r\n", "\n")
            if strip_gutenberg:
                text = strip_gutenberg_text(text)
            if not text.strip():
                stats.empty_documents += 1
                continue
            if len(text) < min_chars:
                stats.too_short += 1
                continue
            if dedup:
                key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
                if key in seen:
                    stats.duplicates += 1
                    continue
                seen.add(key)
            stats.documents += 1
            yield Document(text, where)
    if stats.documents == 0:
        if stats.empty_files and stats.empty_files == len(stats.sources):
            raise ScratchError(f"all {stats.empty_files} input file(s) are empty: {', '.join(inputs)}")
        raise ScratchError(f"no documents left in {', '.join(inputs)} ({stats.empty_documents} empty, "
                           f"{stats.too_short} shorter than --min-chars {min_chars}, {stats.duplicates} duplicates)")


# --------------------------------------------------------------------------------------------- builtin corpus
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "turtledemo",
              "encodings", "pydoc_data", "ensurepip", "lib2to3"}


def _docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings of one parsed module, in a fixed (breadth-first) order."""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
    return [d for d in (ast.get_docstring(n, clean=True) for n in nodes) if d and d.strip()]


def _stdlib_dir() -> Path:
    """The standard library's folder: where `ast` itself lives (sysconfig would import a module)."""
    return Path(ast.__file__).resolve().parent


@lru_cache(maxsize=1)
def _pydocs() -> tuple[str, ...]:
    stdlib = _stdlib_dir()
    topics_file = stdlib / "pydoc_data" / "topics.py"
    docs: list[str] = []
    if topics_file.is_file():
        for node in ast.parse(topics_file.read_bytes()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
                topics = ast.literal_eval(node.value)
                docs.extend(topics[k] for k in sorted(topics))
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # test fixtures with deliberately bad syntax or encodings
            continue
        strings = _docstrings(tree)
        if strings:
            docs.append("\n\n".join(strings))
    return tuple(docs)


def pydocs_documents() -> list[str]:
    """The built-in corpus: the topics of `pydoc_data.topics` (sorted by name), then one document per
    standard-library module (sorted by path) made of its docstrings. Read with `ast` only, so no module
    is imported; about 2 MB of English on CPython 3.11. The text depends on the Python version."""
    docs = list(_pydocs())
    if not docs:
        raise ScratchError(f"builtin:pydocs found no documentation under {_stdlib_dir()}")
    return docs
