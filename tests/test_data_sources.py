"""sources.py: every input shape, the cleaning options, the errors users hit, and builtin:pydocs.

References: the shared data README (marker lines, story counts, line endings), hand-made files, and
the interpreter itself (sys.modules shows what was imported)."""

import json
import subprocess
import sys

import pytest

import scratchllm.data.sources as sources
from scratchllm.common import ScratchError
from scratchllm.data.sources import SourceStats, expand_inputs, iter_documents, strip_gutenberg_text


def texts(inputs, **kw):
    return [d.text for d in iter_documents([str(i) for i in inputs], **kw)]


def test_files_folders_globs_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "b" / "1.md").write_text("one")
    (tmp_path / "b" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "b" / ".hidden.txt").write_text("hidden")
    (tmp_path / "a.txt").write_text("a")
    assert texts([tmp_path / "b"]) == ["one", "two"]
    assert texts([tmp_path / "a.txt", tmp_path / "b"]) == ["a", "one", "two"]
    assert texts([f"{tmp_path}/**/*.txt"]) == ["a", "two"]
    stats = SourceStats()
    list(iter_documents([str(tmp_path / "a.txt")], stats=stats))
    assert stats.sources == [{"path": str(tmp_path / "a.txt"), "bytes": 1,
                              "sha256": "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"}]


def test_dotted_parts_above_the_folder_do_not_hide_it(tmp_path, monkeypatch):
    """Only names below the given folder count as hidden: `../data` and `~/.cache/...` are read."""
    hidden_parent = tmp_path / ".cache" / "datasets"
    (hidden_parent / "sub").mkdir(parents=True)
    (hidden_parent / "sub" / "a.txt").write_text("a")
    (hidden_parent / ".skip.txt").write_text("hidden")
    (hidden_parent / ".git").mkdir()
    (hidden_parent / ".git" / "b.txt").write_text("hidden too")
    assert texts([hidden_parent]) == ["a"]
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert expand_inputs(["../.cache/datasets"]) == ["../.cache/datasets/sub/a.txt"]


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(ScratchError, match="nope.txt does not exist"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(ScratchError, match=r"pattern .*\*\.txt' matches no files"):
        expand_inputs([f"{tmp_path}/*.txt"])
    (tmp_path / "d").mkdir()
    with pytest.raises(ScratchError, match="holds no"):
        expand_inputs([str(tmp_path / "d")])
    with pytest.raises(ScratchError, match="unknown built-in corpus"):
        expand_inputs(["builtin:nothing"])


def test_empty_files_are_skipped_and_counted_all_empty_is_an_error(tmp_path):
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("  \n")
    (tmp_path / "full.txt").write_text("text")
    stats = SourceStats()
    assert texts([tmp_path], stats=stats) == ["text"]
    assert stats.empty_files == 2 and stats.documents == 1
    with pytest.raises(ScratchError, match="all 2 input file"):
        texts([tmp_path / "e1.txt", tmp_path / "e2.txt"])


def test_undecodable_bytes_name_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xc3\xa9 ok \xff\xfe rest")
    with pytest.raises(ScratchError, match=r"bad.txt: bytes at offset 9 are not valid UTF-8.*--errors replace"):
        texts([bad])
    assert texts([bad], errors="replace") == ["café ok \ufffd\ufffd rest"]
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfHello \xff")
    with pytest.raises(ScratchError, match=r"bom.txt: bytes at offset 9 "):
        texts([bom])
    assert texts([bom], errors="replace") == ["Hello \ufffd"]
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "fine"}\n{"text": "\xff"}\n')
    with pytest.raises(ScratchError, match=r"bad.jsonl:2: bytes at offset 27 "):
        texts([jl])


def test_jsonl_fields_and_line_numbered_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n\n{"text": "second", "id": 2}\n')  # with a BOM
    assert texts([f]) == ["first", "second"]
    g = tmp_path / "g.jsonl"
    g.write_text('{"body": "x"}\n')
    assert texts([g], text_field="body") == ["x"]
    with pytest.raises(ScratchError, match=r"g.jsonl:1: no field 'text' \(found \['body'\]\).*--text-field"):
        texts([g])
    h = tmp_path / "h.jsonl"
    h.write_text('{"text": "ok"}\n{"text": "unterminated\n')
    with pytest.raises(ScratchError, match=r"h.jsonl:2: not valid JSON"):
        texts([h])
    k = tmp_path / "k.jsonl"
    k.write_text('{"text": 5}\n')
    with pytest.raises(ScratchError, match=r"k.jsonl:1: field 'text' is a int"):
        texts([k])
    n = tmp_path / "n.jsonl"
    n.write_text('{"text": null}\n{"text": "kept"}\n')  # a null is an empty document, as in Parquet
    stats = SourceStats()
    assert texts([n], stats=stats) == ["kept"] and stats.empty_documents == 1


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha", None, "beta"], "n": [1, 2, 3]}), tmp_path / "t.parquet")
    stats = SourceStats()
    assert texts([tmp_path / "t.parquet"], text_field="content", stats=stats) == ["alpha", "beta"]
    assert (stats.empty_documents, stats.documents) == (1, 2)  # the null is skipped and counted
    with pytest.raises(ScratchError, match=r"t.parquet: no column 'text' \(columns: \['content', 'n'\]\)"):
        texts([tmp_path / "t.parquet"])
    with pytest.raises(ScratchError, match=r"t.parquet:row 0: field 'n' is a int, not a string"):
        texts([tmp_path / "t.parquet"], text_field="n")


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "plain"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"story": ["t"]}),
                               "validation": datasets.Dataset.from_dict({"story": ["v1", "v2"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert texts([f"hf:{tmp_path / 'plain'}"]) == ["one", "two"]
    assert texts([f"hf:{tmp_path / 'dict'}:validation"], text_field="story") == ["v1", "v2"]
    with pytest.raises(ScratchError, match="no split 'test'"):
        texts([f"hf:{tmp_path / 'dict'}:test"], text_field="story")
    with pytest.raises(ScratchError, match="row 0 has no field 'text'"):
        texts([f"hf:{tmp_path / 'dict'}"])
    mixed = datasets.Dataset.from_dict({"text": ["one", None, "three"], "n": [1, 2, 3]})
    mixed.save_to_disk(str(tmp_path / "mixed"))
    stats = SourceStats()
    assert texts([f"hf:{tmp_path / 'mixed'}"], stats=stats) == ["one", "three"]
    assert stats.empty_documents == 1  # the null is skipped and counted
    with pytest.raises(ScratchError, match=r"hf:.*mixed:row 0: field 'n' is a int, not a string"):
        texts([f"hf:{tmp_path / 'mixed'}"], text_field="n")


def test_gutenberg_stripping_matches_the_marker_lines(shared_data):
    raw = (shared_data / "gutenberg" / "pg1342.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
    # reference, by hand: text after the START marker line and before the (indented) END marker line
    start = raw.index("\n", raw.index("*** START OF THE PROJECT GUTENBERG EBOOK")) + 1
    end = raw.rindex("\n", 0, raw.index("*** END OF THE PROJECT GUTENBERG EBOOK")) + 1
    [doc] = texts([shared_data / "gutenberg" / "pg1342.txt"], strip_gutenberg=True)
    assert doc == raw[start:end].strip()
    assert "Project Gutenberg License" not in doc and "It is a truth universally acknowledged" in doc
    body_only = (shared_data / "gutenberg" / "pg11.txt").read_text(encoding="utf-8").replace("\r\n", "\n")
    assert strip_gutenberg_text(body_only) == body_only  # no markers: unchanged


def test_crlf_normalisation(shared_data):
    path = shared_data / "gutenberg" / "pg11.txt"
    raw = path.read_bytes().decode("utf-8")
    assert "\r\n" in raw
    assert texts([path]) == [raw.replace("\r\n", "\n")]
    assert texts([path], normalize_newlines=False) == [raw]


def test_min_chars_and_dedup(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["short", "a longer one", "a longer one", "x"]))
    stats = SourceStats()
    assert texts([f], min_chars=6, dedup=True, stats=stats) == ["a longer one"]
    assert (stats.too_short, stats.duplicates, stats.documents) == (2, 1, 1)
    with pytest.raises(ScratchError, match="no documents left.*4 shorter than --min-chars 100"):
        texts([f], min_chars=100)


def test_endoftext_separates_documents(shared_data):
    stories = texts([shared_data / "tinystories" / "tinystories_sample_cs336.txt"])
    assert len(stories) == 5  # README: 5 stories, each ending with <|endoftext|>
    assert stories[0].startswith("Once upon a time there was a little boy named Ben")
    assert not any("<|endoftext|>" in s or s.startswith("\n") or s.endswith("\n") for s in stories)
    big = texts([shared_data / "tinystories" / "tinystories_sample_2MiB.txt"])
    assert len(big) == 2316 + 1  # README: 2316 complete stories, then one cut off
    assert big[0].startswith("One day, a little girl named Lily found a needle")


_PYDOCS_CHECK = """
import hashlib, sys, json
from scratchllm.data.sources import pydocs_documents
before = set(sys.modules)
docs = pydocs_documents()
new = sorted(set(sys.modules) - before)
print(json.dumps({"n": len(docs), "sha": hashlib.sha256("\\0".join(docs).encode()).hexdigest(), "new": new}))
"""


@pytest.mark.slow
def test_builtin_pydocs_is_deterministic_and_imports_nothing_it_reads():
    """`this` prints the Zen of Python and `antigravity` opens a browser when imported: reading them
    with ast must not import them (nor any other module it reads)."""
    from scratchllm.data.sources import pydocs_documents

    out = subprocess.run([sys.executable, "-c", _PYDOCS_CHECK], capture_output=True, text=True, check=True)
    assert "Beautiful is better than ugly" not in out.stdout
    child = json.loads(out.stdout)
    # reading ~600 stdlib files imported none of them (only a codec, when a file declares its encoding)
    assert [m for m in child["new"] if not m.startswith("encodings.")] == [], child["new"]
    docs = pydocs_documents()
    assert child["n"] == len(docs) > 300
    import hashlib

    assert child["sha"] == hashlib.sha256("\0".join(docs).encode()).hexdigest()  # same in two processes
    assert sum(map(len, docs)) > 1_000_000
    from pydoc_data.topics import topics  # the reference: the module itself (imported here, not in the child)

    assert docs[:len(topics)] == [topics[k] for k in sorted(topics)]
    assert texts(["builtin:pydocs"])[:3] == docs[:3]


def test_hf_hub_names_are_streamed(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"text": "streamed one"}, {"text": "streamed two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources, "_hub_unreachable", lambda: None)  # as if online
    assert texts(["hf:roneneldan/TinyStories:validation"]) == ["streamed one", "streamed two"]
    assert texts(["hf:someone/corpus"]) == ["streamed one", "streamed two"]
    assert calls == [("roneneldan/TinyStories", "validation", True), ("someone/corpus", "train", True)]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split, streaming: iter([{"text": ["a", "list"]}]))
    with pytest.raises(ScratchError, match=r"hf:someone/corpus:row 0: field 'text' is a list, not a string"):
        texts(["hf:someone/corpus"])


# --------------------------------------------------------------------------------------------- hardening
def test_devices_fifos_and_broken_links_are_not_called_missing(tmp_path):
    """`prepare --input /dev/zero` used to say the file "does not exist"; reading it would never end."""
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    for path in ("/dev/zero", fifo):
        with pytest.raises(ScratchError, match=r"is not a regular file \(a device, FIFO or socket\)"):
            expand_inputs([str(path)])
    with pytest.raises(ScratchError, match="link.txt is a broken symbolic link"):
        expand_inputs([str(tmp_path / "link.txt")])
    with pytest.raises(ScratchError, match="missing.txt does not exist"):
        expand_inputs([str(tmp_path / "missing.txt")])


def test_a_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_text("some text")
    real = type(f).read_bytes

    def denied(self):
        if self == f:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(type(f), "read_bytes", denied)  # chmod 000 does not stop root
    with pytest.raises(ScratchError, match=r"cannot read .*a.txt: Permission denied"):
        texts([f])


def test_a_parquet_name_on_other_bytes(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "t.parquet").write_text("just text, not parquet")
    with pytest.raises(ScratchError, match=r"t.parquet: not a valid Parquet file"):
        texts([tmp_path / "t.parquet"])


def test_hf_hub_offline_fails_at_once_and_says_what_to_do(monkeypatch):
    """Offline, datasets retried for about 25 s and ended in a ConnectionError traceback."""
    import time

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the check comes first"))
    start = time.perf_counter()
    with pytest.raises(ScratchError, match=r"hf:someone/corpus: cannot reach the Hugging Face Hub \(127.0.0.1:9.*"
                                           r"save_to_disk.*HF_DATASETS_OFFLINE=1"):
        expand_inputs(["hf:someone/corpus"])  # before any work: prepare calls this first
    assert time.perf_counter() - start < 6


def test_hf_errors_of_the_datasets_library_become_messages(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the local cache only: no probe

    def not_cached(name, split, streaming):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    with pytest.raises(ScratchError, match=r"hf:someone/corpus: cannot open the dataset \(ConnectionError: "):
        texts(["hf:someone/corpus"])

    def broken_stream(name, split, streaming):
        yield {"text": "one"}
        raise ConnectionError("connection reset")

    monkeypatch.setattr(datasets, "load_dataset", broken_stream)
    with pytest.raises(ScratchError, match=r"hf:someone/corpus: reading row 1 failed \(ConnectionError"):
        texts(["hf:someone/corpus"])


def test_hf_folder_that_is_not_a_saved_dataset(tmp_path):
    """load_from_disk on an ordinary folder raised FileNotFoundError (a traceback)."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    with pytest.raises(ScratchError, match=r"texts is not a dataset saved with `save_to_disk`.*drop the hf: prefix"):
        expand_inputs([f"hf:{tmp_path / 'texts'}"])
    with pytest.raises(ScratchError, match=r"folder \./nowhere does not exist"):
        expand_inputs(["hf:./nowhere"])  # written as a path: not looked up on the Hub
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["t"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ScratchError, match=r"no split 'test' \(splits: \['train'\]\)"):
        expand_inputs([f"hf:{tmp_path / 'dict'}:test"])  # before any work
    assert expand_inputs([f"hf:{tmp_path / 'dict'}"]) == [f"hf:{tmp_path / 'dict'}"]
