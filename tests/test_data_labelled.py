"""Tests for scratchllm/data/labelled.py: every input format and every error on small hand-made files,
then the real SMS Spam Collection (../shared/data) read, balanced and split as the book's chapter 6 does
(5574 rows, 747/747 balanced, 1045/149/300 split), directly and as `data:sms-spam` through a mirror.

Runs in well under 5 s: `.venv/bin/python -m pytest -q tests/test_data_labelled.py`.
"""

import re
from pathlib import Path

import pytest

from scratchllm.common import ScratchError
from scratchllm.data.labelled import (
    Example,
    balance,
    check_splits,
    class_counts,
    label_names,
    read_labelled,
    split,
)


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def rows(examples):
    return [(e.label, e.text) for e in examples]


def raises_at(path: str, line: int | None, pattern: str):
    """pytest.raises(ScratchError) whose message starts with FILE:LINE (or FILE) and matches `pattern`."""
    where = re.escape(path if line is None else f"{path}:{line}")
    return pytest.raises(ScratchError, match=rf"^{where}: .*{pattern}")


def make(labels: str) -> list[Example]:
    return [Example(f"t{i}", c, f"f:{i + 1}") for i, c in enumerate(labels)]


# --------------------------------------------------------------------------------------------- TSV
def test_tsv_without_header_splits_on_the_first_tab_and_keeps_quotes(tmp_path):
    f = write(tmp_path, "sms.tsv", 'ham\tGo "until" jurong\nspam\tWIN\t£100 now\r\n\n"ham\t"ok\n\n')
    ex = read_labelled(f)
    assert rows(ex) == [("ham", 'Go "until" jurong'), ("spam", "WIN\t£100 now"), ('"ham', '"ok')]
    assert [e.where for e in ex] == [f"{f}:1", f"{f}:2", f"{f}:4"]  # the blank line 3 is counted


def test_tsv_header_picks_columns_by_name(tmp_path):
    f = write(tmp_path, "d.tab", "id\tmsg\tcat\n1\thi there\tspam\n2\tyo\tham\n")
    assert rows(read_labelled(f, text_field="msg", label_field="cat")) == [("spam", "hi there"), ("ham", "yo")]
    f = write(tmp_path, "d.txt", "label\ttext\nham\ta\tb\n")  # TABs past the last column stay in it
    assert rows(read_labelled(f)) == [("ham", "a\tb")]


def test_utf8_bom_crlf_and_label_whitespace(tmp_path):
    f = write(tmp_path, "d.tsv", "\ufeffham \tcafé \r\nspam\tx\u2028y\x1cz\r\n".encode())
    assert rows(read_labelled(f)) == [("ham", "café "), ("spam", "x\u2028y\x1cz")]  # only LF ends a line


@pytest.mark.parametrize("content, line, pattern", [
    ("ham\thi\nspam,buy now\n", 2, r"no TAB \(the lines before use TAB; this one has ','\): the file mixes delimiters"),
    ("ham\thi\nspam;buy\n", 2, "this one has ';'"),
    ("ham,hi\nspam,buy\n", 1, r"no TAB.*this one has ',': rename a comma-separated file to \.csv"),
    ("ham\thi\nspam buy\n", 2, r"no TAB; each line .* is `label<TAB>text`"),
    ("ham\thi\n\t hi\n", 2, "empty label$"),
    ("ham\thi\nspam\t  \n", 2, "empty text$"),
    ("label\ttext\nham\n", 2, "no TAB"),
    ("label\tmsg\nham\thi\n", 1, r"the header names 'label' but no column 'text'.*--text-field"),
    ("id\ttext\tlabel\n1\thi\n", 2, r"2 fields, the header \(.*:1\) has 3; fill in every column"),
    (b"ham\thi\nspam\t\xff\xfe\n", 2, "not valid UTF-8"),
])
def test_tsv_errors_name_file_and_line(tmp_path, content, line, pattern):
    f = write(tmp_path, "d.tsv", content)
    with raises_at(f, line, pattern):
        read_labelled(f)


# --------------------------------------------------------------------------------------------- CSV
def test_csv_honours_quotes_and_headers(tmp_path):
    f = write(tmp_path, "d.csv", 'ham,"hi, there"\n\nspam,"say ""yes""\non two lines"\nham,ok\r\n')
    ex = read_labelled(f)
    assert rows(ex) == [("ham", "hi, there"), ("spam", 'say "yes"\non two lines'), ("ham", "ok")]
    assert [e.where for e in ex] == [f"{f}:1", f"{f}:3", f"{f}:5"]
    f = write(tmp_path, "h.csv", 'text,id,label\n"a, b",1,spam\nc,2,ham\n')
    assert rows(read_labelled(f)) == [("spam", "a, b"), ("ham", "c")]


@pytest.mark.parametrize("content, line, pattern", [
    ("ham,hi\nspam,buy, now, cheap\n", 2, r"4 fields; a headerless \.csv row is `label,text`: quote the text"),
    ("ham\thi\nspam\tbuy\n", 1, r"1 field, no ','; it has TABs: this looks like a TSV file"),
    ("ham;hi\n", 1, "it has ';'"),
    ("ham,hi\nspam\n", 2, "1 field, no ','"),
    ("ham,hi\nspam,\"unterminated\nham,x\n", 2, "cannot parse the CSV record starting here"),
    ('ham,"a"b\n', 1, r"',' expected after"),
    ("text,label\nhi,ham,extra\n", 2, r"3 fields, the header \(.*:1\) has 2; quote fields"),
    ("text,label\n\"\",ham\n", 2, "empty text$"),
    ("text,cat\nhi,ham\n", 1, r"names 'text' but no column 'label'.*--label-field"),
])
def test_csv_errors_name_file_and_line(tmp_path, content, line, pattern):
    f = write(tmp_path, "d.csv", content)
    with raises_at(f, line, pattern):
        read_labelled(f)


# --------------------------------------------------------------------------------------------- JSONL
def test_jsonl_labels_become_strings(tmp_path):
    good = '{"text": "a", "label": 1, "x": 0}\n\n{"text": "b", "label": true}\n{"text": "c", "label": "spam"}\r\n'
    ex = read_labelled(write(tmp_path, "d.jsonl", good))
    assert rows(ex) == [("1", "a"), ("true", "b"), ("spam", "c")] and ex[2].where.endswith("d.jsonl:4")
    ex = read_labelled(write(tmp_path, "e.jsonl", '{"body": "d", "y": false}\n'), "body", "y")
    assert rows(ex) == [("false", "d")]
    f = write(tmp_path, "f.jsonl", good + '{"body": "d", "y": false}\n')
    with raises_at(f, 5, r"no field 'text' \(the object has \['body', 'y'\]\); choose it with --text-field"):
        read_labelled(f)


@pytest.mark.parametrize("content, pattern", [
    ('{"text": "a", "label": 1}\n{"text": "b"}\n', r"no field 'label' \(the object has \['text'\]\).*--label-field"),
    ('{"text": "a", "label": 1}\n{"text": "b", label: 2}\n', r"not valid JSON \(.* at column \d+\)"),
    ('{"text": "a", "label": 1}\n["b", 2]\n', "a JSON list, not an object"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": 2.5}\n', "field 'label' is float 2.5; it must be a string or an integer"),
    ('{"text": "a", "label": 1}\n{"text": null, "label": 2}\n', "field 'text' is NoneType None; it must be a string"),
    ('{"text": "a", "label": 1}\n{"text": "b", "label": " "}\n', "empty label$"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, content, pattern):
    f = write(tmp_path, "d.jsonl", content)
    with raises_at(f, 2, pattern):
        read_labelled(f)


# --------------------------------------------------------------------------------------------- files
def test_unsupported_missing_and_empty_files(tmp_path):
    f = write(tmp_path, "d.parquet", "x")
    with raises_at(f, None, r"supported: \.tsv, \.tab, \.txt, \.csv, \.jsonl"):
        read_labelled(f)
    with pytest.raises(ScratchError, match="cannot read .*nope.tsv"):
        read_labelled(str(tmp_path / "nope.tsv"))
    for name, content in [("e.tsv", ""), ("b.tsv", "\n \n"), ("h.csv", "text,label\n"), ("j.jsonl", "\n")]:
        f = write(tmp_path, name, content)
        with raises_at(f, None, "no labelled rows"):
            read_labelled(f)
    with pytest.raises(ScratchError, match="unknown dataset 'nope'"):
        read_labelled("data:nope")


# --------------------------------------------------------------------------------------------- classes
def test_label_names_and_counts():
    ex = make("bab")
    assert label_names(ex) == ["a", "b"] and class_counts(ex) == {"a": 1, "b": 2}
    with pytest.raises(ScratchError, match=r"^f: the label column holds one class only: 'ham' \(3 rows\)"):
        label_names([Example("t", "ham", f"f:{i}") for i in range(3)])
    with pytest.raises(ScratchError, match=r"65537 distinct labels \(more than 65536\); does --label-field"):
        label_names([Example("t", str(i), f"f:{i}") for i in range(2**16 + 1)])


def test_balance_undersamples_deterministically_in_file_order():
    ex = make("aabaaabbaa")
    got = balance(ex, seed=1)
    assert class_counts(got) == {"a": 3, "b": 3}
    assert got == sorted(got, key=ex.index)  # original order
    assert got == balance(ex, seed=1)
    assert {tuple(e.where for e in balance(ex, seed=s)) for s in range(10)} != {tuple(e.where for e in got)}
    with pytest.raises(ScratchError, match="one class only"):
        balance(make("aaa"), seed=0)


def test_split_sizes_determinism_and_errors():
    ex = make("ab" * 50)
    train, val, test = split(ex, seed=3)
    assert (len(train), len(val), len(test)) == (70, 10, 20)
    assert sorted(train + val + test, key=ex.index) == ex  # a partition
    assert split(ex, seed=3) == (train, val, test) and split(ex, seed=4) != (train, val, test)
    assert [len(s) for s in split(ex, (0.5, 0, 0.5), seed=0)] == [50, 0, 50]
    for bad in [(0.7, 0.2), (0.7, 0.2, 0.2), (1.2, -0.1, -0.1), ("a", "b", "c"), 0.7, (float("nan"), 0, 1)]:
        with pytest.raises(ScratchError, match="3 non-negative numbers .* that sum to 1"):
            split(ex, bad, seed=0)
    with pytest.raises(ScratchError, match=r"the val split is empty \(0.1 of 5 rows rounds down to 0\)"):
        split(make("ababa"), seed=0)


def test_check_splits():
    check_splits(make("ab"), make("a"), make("b"), ["a", "b"])
    with pytest.raises(ScratchError, match=r"training split \(2 rows\) holds no 'b' example.*after --balance"):
        check_splits(make("aa"), [], make("b"), ["a", "b"])
    with pytest.raises(ScratchError, match=r"^f:1: the test split holds label 'c', which the training split"):
        check_splits(make("ab"), make("a"), make("c"), ["a", "b"])


# --------------------------------------------------------------------------------------------- real data
def test_sms_spam_as_the_book_uses_it(shared_data):
    ex = read_labelled(str(shared_data / "SMSSpamCollection.tsv"))
    assert len(ex) == 5574 and class_counts(ex) == {"ham": 4827, "spam": 747}
    assert label_names(ex) == ["ham", "spam"]
    assert sum('"' in e.text for e in ex) == 145  # quotes are text, not CSV quoting
    bal = balance(ex, seed=123)
    assert class_counts(bal) == {"ham": 747, "spam": 747}
    parts = split(bal, seed=123)
    assert [len(p) for p in parts] == [1045, 149, 300]
    check_splits(*parts, label_names(ex))
    assert split(bal, seed=123) == parts and split(bal, seed=124) != parts


def test_data_spec_through_the_shared_mirror(shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_MIRROR", str(shared_data))
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path))
    ex = read_labelled("data:sms-spam")
    assert len(ex) == 5574 and class_counts(ex) == {"ham": 4827, "spam": 747}
    assert ex[0].where == f"{tmp_path / 'datasets' / 'SMSSpamCollection.tsv'}:1"
    direct = read_labelled(str(shared_data / "SMSSpamCollection.tsv"))
    assert rows(ex) == rows(direct)
