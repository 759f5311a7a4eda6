"""registry.py: every registered dataset's size/sha256 agrees with ../shared/data's SHA256SUMS (the
reference), and `data get` fetches each one from a local server standing in for the canonical hosts
(via SCRATCHLLM_MIRROR), from a ../shared/data-style folder, and refuses corrupted files."""

import hashlib
import io
import zipfile
from urllib.parse import urlsplit

import pytest
from _fileserver import FileServer

from scratchllm.cli import main
from scratchllm.common import ScratchError
from scratchllm.data.registry import DATASETS, get


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SCRATCHLLM_MIRROR", raising=False)


def sums(shared_data) -> dict[str, str]:
    out = {}
    for line in (shared_data / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.removeprefix("./")] = digest
    return out


def canonical_bytes(ds, shared_data) -> bytes:
    """What the canonical URL serves, rebuilt from the shared copy (README notes 1 and the zip)."""
    data = (shared_data / ds.file).read_bytes()
    if ds.transform == "cp1252-to-utf8":
        return data.decode("utf-8").encode("cp1252")
    if ds.transform and ds.transform.startswith("unzip:"):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(ds.transform.removeprefix("unzip:"), data)
            z.writestr("readme", b"the UCI readme")
        return buf.getvalue()
    return data


def test_registry_numbers_agree_with_the_shared_checksums(shared_data):
    ref = sums(shared_data)
    required = {"the-verdict", "tinyshakespeare", "sms-spam", "instruction-data",
                "instruction-data-with-preference", "tinystories-sample"}
    assert required <= set(DATASETS) and sum(d.file.startswith("gutenberg/") for d in DATASETS.values()) >= 3
    for ds in DATASETS.values():
        assert ds.saved_sha256 == ref[ds.file], ds.name
        assert ds.saved_size == (shared_data / ds.file).stat().st_size, ds.name
        assert ds.url.startswith("https://")
        if ds.transform == "cp1252-to-utf8":  # README note 1 lists the original sha256 of these files
            raw = canonical_bytes(ds, shared_data)
            assert (hashlib.sha256(raw).hexdigest(), len(raw)) == (ds.sha256, ds.size), ds.name


def test_get_everything_through_a_mirror_server(shared_data, tmp_path, monkeypatch):
    files = {urlsplit(ds.url).path: canonical_bytes(ds, shared_data) for ds in DATASETS.values()}
    with FileServer(files) as srv:
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        for ds in DATASETS.values():
            path = get(ds.name, progress=False)
            assert path == tmp_path / "cache" / "datasets" / ds.file
            assert path.read_bytes() == (shared_data / ds.file).read_bytes(), ds.name
        n = len(srv.requests)
        get("moby-dick", progress=False)
        assert len(srv.requests) == n  # cached and verified: no request
        srv.corrupt.add(urlsplit(DATASETS["the-verdict"].url).path)
        with pytest.raises(ScratchError, match="the-verdict.txt.*failed its check.*was kept"):
            get("the-verdict", force=True, progress=False)
        assert (tmp_path / "cache" / "datasets" / "the-verdict.txt").read_bytes() == \
            (shared_data / "the-verdict.txt").read_bytes()


def test_corrupted_archive_member_is_refused(shared_data, monkeypatch, tmp_path):
    ds = DATASETS["sms-spam"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("SMSSpamCollection", b"ham\tnot the real file\n")
    with FileServer({urlsplit(ds.url).path: buf.getvalue()}) as srv:
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        with pytest.raises(ScratchError, match="sms-spam: the file derived from .* has size 22 bytes.*not saved"):
            get("sms-spam", progress=False)
    assert not (tmp_path / "cache" / "datasets" / "SMSSpamCollection.tsv").exists()
    assert not (tmp_path / "cache" / "datasets" / ".raw" / "sms+spam+collection.zip").exists()


def test_shared_data_folder_works_as_a_mirror(shared_data, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SCRATCHLLM_MIRROR", str(shared_data))
    assert main(["data", "get", "the-verdict", "frankenstein", "--dest", str(tmp_path / "d"), "--quiet"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / "d" / "the-verdict.txt"), str(tmp_path / "d" / "pg84.txt")]
    assert (tmp_path / "d" / "pg84.txt").read_bytes() == (shared_data / "gutenberg" / "pg84.txt").read_bytes()
    assert main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in DATASETS)
    lines = listing.splitlines()
    assert "cached" in lines[0]  # the-verdict is now in the cache
    assert lines[1].split() == ["sha256", "b41e41a68f03", DATASETS["the-verdict"].url]  # SHA256SUMS' digest
    for ds in DATASETS.values():  # each entry: its URL and the start of the saved file's sha256
        assert f"sha256 {ds.saved_sha256[:12]}  {ds.url}" in listing, ds.name
    assert "sha256 7d039a24a608  https://archive.ics.uci.edu/" in listing  # sms-spam: the extracted file's


def test_unknown_names_fail_before_any_download(capsys):
    assert main(["data", "get", "the-verdict", "the-verdikt"]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'the-verdikt'" in err and "tinyshakespeare" in err


def test_registered_names_are_prepare_inputs(shared_data, monkeypatch, tmp_path):
    from scratchllm.data.sources import iter_documents

    monkeypatch.setenv("SCRATCHLLM_MIRROR", str(shared_data))
    [doc] = iter_documents(["data:the-verdict"])
    assert doc.text == (shared_data / "the-verdict.txt").read_text()
    assert doc.source == str(tmp_path / "cache" / "datasets" / "the-verdict.txt")
    with pytest.raises(ScratchError, match="unknown dataset 'nope'"):
        list(iter_documents(["data:nope"]))


def test_a_dest_that_is_a_file_fails_before_any_download(tmp_path, capsys, monkeypatch):
    import scratchllm.data.registry as registry

    monkeypatch.setattr(registry, "download", lambda *a, **k: pytest.fail("no download before the checks"))
    (tmp_path / "f").write_text("x")
    assert main(["data", "get", "the-verdict", "--dest", str(tmp_path / "f")]) == 2  # was FileExistsError
    assert "--dest" in (err := capsys.readouterr().err) and "is a file, not a folder" in err
    assert main(["data", "get", "the-verdict", "--dest", str(tmp_path / "f" / "sub")]) == 2
    assert "cannot create" in capsys.readouterr().err
