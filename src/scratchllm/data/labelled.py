"""Labelled text files -> `Example(text, label, where)` rows, class balancing and train/val/test splits
(the data side of classification fine-tuning: the book's chapter 6, SMS spam).

Inputs of `read_labelled(spec)`, by extension (blank lines are skipped but counted; LF or CRLF; UTF-8):
  .tsv .tab .txt   one row per line, no quote processing (texts may hold `"`). Without a header a line
                   is `label<TAB>text`, split on the first TAB (later TABs stay in the text). A first
                   line whose fields include `text_field` and `label_field` is a header: columns by name.
  .csv             RFC 4180 (Python's csv module, quotes honoured); same header rule; without a header
                   a row is exactly `label,text`
  .jsonl           one JSON object per line with `text_field` and `label_field`; int/str labels become
                   strings, booleans "true"/"false"
  data:NAME        a dataset of `scratchllm data list` (e.g. data:sms-spam), fetched into the cache first
Labels are stripped of surrounding whitespace, texts are kept as written. Every bad row is a ScratchError
naming FILE:LINE. Tokenization, padding and the model side live elsewhere; this module only reads rows.

    >>> rows = read_labelled("data:sms-spam")  # doctest: +SKIP
    >>> train, val, test = split(balance(rows, seed=123), seed=123)  # doctest: +SKIP
    >>> check_splits(train, val, test, label_names(rows))  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from scratchllm.common import ScratchError

SUPPORTED = (".tsv", ".tab", ".txt", ".csv", ".jsonl")
MAX_CLASSES = 2**16


@dataclass
class Example:
    text: str
    label: str
    where: str  # "FILE:LINE" of the row (its first line for a multi-line CSV record)


# --------------------------------------------------------------------------------------------- reading
def _lines(path: Path) -> list[str]:
    """The file's lines (UTF-8 strict, without a BOM or each line's CR); only LF ends a line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScratchError(f"cannot read {path}: {e.strerror or e}; check that it exists and is readable") from None
    data = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ScratchError(f"{path}:{line}: not valid UTF-8 ({data[e.start:e.start + 4]!r}); convert the file "
                           "to UTF-8") from None
    lines = text.split("\n")  # not splitlines(): texts may hold \x0b, \x1c or U+2028
    if lines[-1] == "":
        lines.pop()
    return [s.removesuffix("\r") for s in lines]


def _header(fields: list[str], where: str, text_field: str, label_field: str) -> dict[str, int] | None:
    """{field: column} when the first row is a header naming both fields, None when it names neither.

    >>> _header(["id", "label", "text"], "f.tsv:1", "text", "label")
    {'text': 2, 'label': 1}
    >>> _header(["ham", "hello"], "f.tsv:1", "text", "label") is None
    True
    """
    names = [f.strip() for f in fields]
    have = [f for f in (text_field, label_field) if f in names]
    if not have:
        return None
    if len(have) == 1:
        missing, flag = (text_field, "--text-field") if have[0] == label_field else (label_field, "--label-field")
        raise ScratchError(f"{where}: the header names {have[0]!r} but no column {missing!r} (columns: {names}); "
                           f"choose the column with {flag}")
    return {text_field: names.index(text_field), label_field: names.index(label_field)}


def _no_tab(line: str, where: str, first: bool) -> ScratchError:
    other = next((c for c in ",;" if c in line), None)
    if other and not first:
        return ScratchError(f"{where}: no TAB (the lines before use TAB; this one has {other!r}): the file "
                            "mixes delimiters; use one")
    hint = f"; this one has {other!r}: rename a comma-separated file to .csv" if other else " (or add a header row)"
    return ScratchError(f"{where}: no TAB; each line of a .tsv/.tab/.txt file is `label<TAB>text`{hint}")


def _one_field(line: str, where: str) -> ScratchError:
    hint = ("it has TABs: this looks like a TSV file, rename it to .tsv" if "\t" in line else
            "it has ';': use ',' between label and text" if ";" in line else "a .csv row is `label,text`")
    return ScratchError(f"{where}: 1 field, no ','; {hint}")


def _table(records, text_field: str, label_field: str, tsv: bool):
    """(where, fields, line) records of a TSV or CSV file -> (text, label, where), by the header rule."""
    cols = header_at = None
    for where, row, line in records:
        if header_at is None:
            header_at = where
            if cols := _header(row, where, text_field, label_field):
                width = len(row)
                continue
        if cols is not None:
            if tsv and len(row) > width:  # TABs past the header's last column stay in it
                row = [*row[:width - 1], "\t".join(row[width - 1:])]
            if len(row) == 1 < width:
                raise _no_tab(line, where, first=False) if tsv else _one_field(line, where)
            if len(row) != width:
                fix = "fill in every column" if tsv else "quote fields that contain ','"
                raise ScratchError(f"{where}: {len(row)} fields, the header ({header_at}) has {width}; {fix}")
            yield row[cols[text_field]], row[cols[label_field]], where
        elif tsv:
            if len(row) == 1:
                raise _no_tab(line, where, first=where == header_at)
            yield "\t".join(row[1:]), row[0], where
        elif len(row) == 1:
            raise _one_field(line, where)
        elif len(row) != 2:
            raise ScratchError(f"{where}: {len(row)} fields; a headerless .csv row is `label,text`: quote the "
                               f"text (\"...\") when it holds ',', or add a header row naming {text_field!r} "
                               f"and {label_field!r}")
        else:
            yield row[1], row[0], where


def _csv_records(path: Path):
    lines = _lines(path)
    reader = csv.reader((s + "\n" for s in lines), strict=True)
    start = 1
    while True:
        try:
            row = next(reader, None)
        except csv.Error as e:
            raise ScratchError(f"{path}:{start}: cannot parse the CSV record starting here ({e}); check its "
                               "quotes: a quoted field ends with `\"`, and a `\"` inside one is written `\"\"`") from None
        if row is None:
            return
        if row and (len(row) > 1 or row[0].strip()):
            yield f"{path}:{start}", row, lines[start - 1]
        start = reader.line_num + 1


def _jsonl_value(obj: dict, name: str, where: str, label: bool) -> str:
    """A text must be a string; a label a string, an int or a bool ("true"/"false")."""
    value = obj[name]
    if isinstance(value, str) or (label and isinstance(value, int)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    kind = "a string or an integer" if label else "a string"
    raise ScratchError(f"{where}: field {name!r} is {type(value).__name__} {value!r:.40}; it must be {kind}")


def _jsonl(path: Path, text_field: str, label_field: str):
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ScratchError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl "
                               "file must be one JSON object") from None
        if not isinstance(obj, dict):
            raise ScratchError(f"{where}: a JSON {type(obj).__name__}, not an object; each line must be "
                               f"an object with {text_field!r} and {label_field!r}")
        for name, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
            if name not in obj:
                raise ScratchError(f"{where}: no field {name!r} (the object has {sorted(obj)}); choose "
                                   f"it with {flag}")
        yield _jsonl_value(obj, text_field, where, False), _jsonl_value(obj, label_field, where, True), where


def read_labelled(spec: str, text_field: str = "text", label_field: str = "label") -> list[Example]:
    """A labelled file (or `data:NAME`) -> its examples in file order; see the module docstring.

    >>> read_labelled("sms.tsv")[0]  # doctest: +SKIP
    Example(text='Go until jurong point, ...', label='ham', where='sms.tsv:1')
    """
    if spec.startswith("data:"):
        from scratchllm.data import registry

        path = registry.get(spec.removeprefix("data:"), progress=False)
    else:
        path = Path(spec).expanduser()
    ext = path.suffix.lower()
    if ext not in SUPPORTED:
        raise ScratchError(f"{path}: cannot read labelled rows from a {ext or 'extension-less'!r} file; "
                           f"supported: {', '.join(SUPPORTED)}")
    if ext == ".jsonl":
        rows = _jsonl(path, text_field, label_field)
    else:
        records = _csv_records(path) if ext == ".csv" else (
            (f"{path}:{i}", line.split("\t"), line) for i, line in enumerate(_lines(path), 1) if line.strip())
        rows = _table(records, text_field, label_field, tsv=ext != ".csv")
    examples = []
    for text, label, where in rows:
        if not text.strip():
            raise ScratchError(f"{where}: empty text")
        if not label.strip():
            raise ScratchError(f"{where}: empty label")
        examples.append(Example(text, label.strip(), where))
    if not examples:
        raise ScratchError(f"{path}: no labelled rows (the file is empty or holds only a header)")
    return examples


# --------------------------------------------------------------------------------------------- classes
def class_counts(examples: list[Example]) -> dict[str, int]:
    """{label: rows}, sorted by label.

    >>> class_counts([Example("a", "spam", "f:1"), Example("b", "ham", "f:2"), Example("c", "ham", "f:3")])
    {'ham': 2, 'spam': 1}
    """
    return dict(sorted(Counter(e.label for e in examples).items()))


def label_names(examples: list[Example]) -> list[str]:
    """The sorted distinct labels (class id i is label_names[i]); one class, or over 2**16, is an error.

    >>> label_names([Example("a", "spam", "f:1"), Example("b", "ham", "f:2")])
    ['ham', 'spam']
    """
    counts = class_counts(examples)
    file = examples[0].where.rsplit(":", 1)[0] if examples else "the data"
    if len(counts) < 2:
        only = ", ".join(f"{k!r} ({v} rows)" for k, v in counts.items()) or "nothing (no rows)"
        raise ScratchError(f"{file}: the label column holds one class only: {only}; a classifier needs "
                           "two or more: check --label-field and the file")
    if len(counts) > MAX_CLASSES:
        raise ScratchError(f"{file}: {len(counts)} distinct labels (more than {MAX_CLASSES}); does "
                           "--label-field name the text column?")
    return list(counts)


def balance(examples: list[Example], seed: int) -> list[Example]:
    """Undersample every class to the size of the smallest (random.Random(seed)); file order is kept.

    >>> rows = [Example(t, l, f"f:{i}") for i, (t, l) in enumerate([("a", "x"), ("b", "y"), ("c", "x")])]
    >>> [e.text for e in balance(rows, seed=0)]
    ['b', 'c']
    """
    label_names(examples)
    rng, keep = random.Random(seed), []
    by_class: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_class.setdefault(e.label, []).append(i)
    smallest = min(map(len, by_class.values()))
    for label in sorted(by_class):
        keep += rng.sample(by_class[label], smallest)
    return [examples[i] for i in sorted(keep)]


# --------------------------------------------------------------------------------------------- splits
def split(examples: list[Example], fractions=(0.7, 0.1, 0.2), *,
          seed: int) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle a copy with random.Random(seed), then cut train = int(n*f0), val = int(n*f1), test = rest.

    >>> [len(s) for s in split([Example(str(i), "x", f"f:{i}") for i in range(1494)], seed=123)]
    [1045, 149, 300]
    """
    fr = tuple(fractions) if isinstance(fractions, list | tuple) else ()
    if (len(fr) != 3 or not all(isinstance(f, int | float) and not isinstance(f, bool) and f >= 0 for f in fr)
            or abs(sum(fr) - 1) > 1e-6):
        raise ScratchError(f"split fractions must be 3 non-negative numbers (train, val, test) that sum to 1, "
                           f"got {fractions!r}; e.g. 0.7,0.1,0.2")
    rows = list(examples)
    random.Random(seed).shuffle(rows)
    n = len(rows)
    n_train, n_val = int(n * fr[0]), int(n * fr[1])
    parts = rows[:n_train], rows[n_train:n_train + n_val], rows[n_train + n_val:]
    for name, f, part in zip(("train", "val", "test"), fr, parts):
        if f > 0 and not part:
            raise ScratchError(f"the {name} split is empty ({f} of {n} rows rounds down to 0); use more rows "
                               f"or a larger {name} fraction")
    return parts


def check_splits(train: list[Example], val: list[Example], test: list[Example], labels: list[str]) -> None:
    """Every class of `labels` is in train, and val/test hold no label that train lacks."""
    seen = {e.label for e in train}
    for label in labels:
        if label not in seen:
            raise ScratchError(f"the training split ({len(train)} rows) holds no {label!r} example; use more "
                               "rows, a larger train fraction or another --seed (after --balance every "
                               "class has only as many rows as the smallest)")
    for name, e in [("val", e) for e in val] + [("test", e) for e in test]:
        if e.label not in seen:
            raise ScratchError(f"{e.where}: the {name} split holds label {e.label!r}, which the training "
                               f"split never shows (train labels: {sorted(seen)})")
