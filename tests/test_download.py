"""Downloads against a local HTTP server on 127.0.0.1: resume after a dropped connection (HTTP Range),
retries of a busy server (429/5xx), checksum refusal that keeps the old good file, mirrors (folder and
base URL), cache folder.

The reference for "correct bytes" is ../shared/data's SHA256SUMS, written by nobody here."""

import hashlib
import os
from types import SimpleNamespace

import pytest
from _fileserver import FileServer

import scratchllm.io.download as download_mod
from scratchllm.common import ScratchError
from scratchllm.io.download import cache_dir, download, resolve_url

VERDICT_SHA = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
SHAKES_SHA = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@pytest.fixture()
def files(shared_data):
    return {"/d/the-verdict.txt": (shared_data / "the-verdict.txt").read_bytes(),
            "/d/shakespeare.txt": (shared_data / "tinyshakespeare.txt").read_bytes()}


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv("SCRATCHLLM_MIRROR", raising=False)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def fail_first(srv: FileServer, answers: list[tuple[int, dict]]) -> None:
    """Make `srv` answer its next requests with these (status, headers) before serving files again."""
    queue = list(answers)

    class Failing(srv.httpd.RequestHandlerClass):
        def do_GET(self):
            if not queue:
                return super().do_GET()
            status, headers = queue.pop(0)
            srv.requests.append((self.path, self.headers.get("Range")))
            self.send_response(status)
            for k, v in {**headers, "Content-Length": "0"}.items():
                self.send_header(k, v)
            self.end_headers()

    srv.httpd.RequestHandlerClass = Failing


@pytest.fixture()
def sleeps(monkeypatch):
    """The waits between attempts, recorded instead of slept."""
    waited = []
    monkeypatch.setattr(download_mod, "time", SimpleNamespace(sleep=waited.append))  # only this module's
    return waited


def test_download_verifies_and_caches(files, tmp_path):
    with FileServer(files) as srv:
        dest = download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", sha256=VERDICT_SHA,
                        size=20479, progress=False)
        assert sha(dest) == VERDICT_SHA
        assert not (tmp_path / "v.txt.part").exists()
        n = len(srv.requests)
        download(srv.url + "/d/the-verdict.txt", dest, sha256=VERDICT_SHA, progress=False)
        assert len(srv.requests) == n  # a good cached file needs no request


def test_dropped_connection_is_resumed_with_range(files, tmp_path):
    with FileServer(files) as srv:
        srv.drop_once["/d/shakespeare.txt"] = 400_000
        dest = download(srv.url + "/d/shakespeare.txt", tmp_path / "s.txt", sha256=SHAKES_SHA,
                        size=1115394, progress=False)
        assert sha(dest) == SHAKES_SHA
        assert srv.requests == [("/d/shakespeare.txt", None), ("/d/shakespeare.txt", "bytes=400000-")]


def test_partial_file_survives_failure_and_next_call_resumes(files, tmp_path):
    url_path = "/d/shakespeare.txt"
    with FileServer(files) as srv:
        srv.drop_once[url_path] = 300_000
        with pytest.raises(ScratchError, match=r"cannot download http://127\.0\.0\.1:\d+/d/shakespeare.* "
                                               r"300000 bytes kept in .*s\.txt\.part, run again to resume"):
            download(srv.url + url_path, tmp_path / "s.txt", sha256=SHAKES_SHA, retries=0, progress=False)
        assert (tmp_path / "s.txt.part").stat().st_size == 300_000
        assert not (tmp_path / "s.txt").exists()
        download(srv.url + url_path, tmp_path / "s.txt", sha256=SHAKES_SHA, retries=0, progress=False)
        assert srv.requests[-1] == (url_path, "bytes=300000-")
        assert sha(tmp_path / "s.txt") == SHAKES_SHA


def test_busy_server_is_retried_honouring_retry_after(files, tmp_path, sleeps):
    with FileServer(files) as srv:
        fail_first(srv, [(503, {}), (429, {"Retry-After": "3"})])
        dest = download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", sha256=VERDICT_SHA, progress=False)
        assert len(srv.requests) == 3
    assert sha(dest) == VERDICT_SHA
    assert sleeps == [0.2, 3.0]  # backoff after the 503, the server's Retry-After after the 429


def test_a_failing_server_gives_up_after_the_retries(files, tmp_path, sleeps):
    with FileServer(files) as srv:
        fail_first(srv, [(500, {})] * 3)
        with pytest.raises(ScratchError, match=r"the-verdict.txt: HTTP 500 .* on all 3 attempts; the server is busy"):
            download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", retries=2, progress=False)
        assert len(srv.requests) == 3 and sleeps == [0.2, 0.4]
        with pytest.raises(ScratchError, match="HTTP 404"):
            download(srv.url + "/d/missing.txt", tmp_path / "m.txt", progress=False)
        assert len(srv.requests) == 4  # a 404 is not retried
    assert not (tmp_path / "v.txt").exists()


def test_server_ignoring_range_restarts_from_zero(files, tmp_path):
    (tmp_path / "v.txt.part").write_bytes(b"garbage that is not the start of the file")
    with FileServer(files) as srv:
        srv.ignore_range = True
        download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", sha256=VERDICT_SHA, progress=False)
        assert srv.requests[0][1] is not None  # it did ask for a range
    assert sha(tmp_path / "v.txt") == VERDICT_SHA


def test_complete_part_gets_416_and_restarts(files, tmp_path, shared_data):
    (tmp_path / "v.txt.part").write_bytes((shared_data / "the-verdict.txt").read_bytes())
    with FileServer(files) as srv:
        download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", sha256=VERDICT_SHA, progress=False)
        assert srv.requests == [("/d/the-verdict.txt", "bytes=20479-"), ("/d/the-verdict.txt", None)]
    assert sha(tmp_path / "v.txt") == VERDICT_SHA


def test_a_wrong_content_range_is_not_appended(files, tmp_path):
    (tmp_path / "v.txt.part").write_bytes(b"0123456789")
    with FileServer(files) as srv:
        srv.wrong_range = True
        with pytest.raises(ScratchError, match="Range: bytes=10- with Content-Range 'bytes 0-20478/20479'"):
            download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", retries=1, progress=False)
    assert (tmp_path / "v.txt.part").read_bytes() == b"0123456789"


def test_corrupted_file_is_refused(files, tmp_path):
    with FileServer(files) as srv:
        srv.corrupt.add("/d/the-verdict.txt")
        with pytest.raises(ScratchError, match=f"the-verdict.txt.*expected {VERDICT_SHA}"):
            download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", sha256=VERDICT_SHA, progress=False)
    assert not (tmp_path / "v.txt").exists()
    assert not (tmp_path / "v.txt.part").exists()  # a corrupted part is not resumed later


def test_corrupted_redownload_keeps_the_old_good_file(files, tmp_path, shared_data):
    dest = tmp_path / "v.txt"
    dest.write_bytes((shared_data / "the-verdict.txt").read_bytes())
    with FileServer(files) as srv:
        srv.corrupt.add("/d/the-verdict.txt")
        with pytest.raises(ScratchError, match="was kept"):
            download(srv.url + "/d/the-verdict.txt", dest, sha256=VERDICT_SHA, force=True, progress=False)
        assert len(srv.requests) == 1
    assert sha(dest) == VERDICT_SHA


def test_size_mismatch_and_http_errors(files, tmp_path):
    with FileServer(files) as srv:
        with pytest.raises(ScratchError, match="size 20479 bytes, expected 20480"):
            download(srv.url + "/d/the-verdict.txt", tmp_path / "v.txt", size=20480, progress=False)
        with pytest.raises(ScratchError, match="missing.txt.*HTTP 404"):
            download(srv.url + "/d/missing.txt", tmp_path / "m.txt", progress=False)
    with pytest.raises(ScratchError, match="cannot download http://127.0.0.1:9/x"):
        download("http://127.0.0.1:9/x", tmp_path / "x", retries=0, timeout=2, progress=False)


def test_offline_download_does_not_claim_a_part_file(tmp_path, sleeps):
    """Nothing arrives (no network, a refused connection): the message used to say '0 bytes kept in
    x.part, run again to resume' about a .part that does not exist."""
    (tmp_path / "x.part").write_bytes(b"")  # an empty one left by someone: removed, not resumed
    with pytest.raises(ScratchError) as e:
        download("http://127.0.0.1:9/x", tmp_path / "x", retries=2, timeout=2, progress=False)
    msg = str(e.value)
    assert "after 3 attempts" in msg and "nothing was downloaded; check the network connection" in msg
    assert "SCRATCHLLM_MIRROR" in msg and "kept" not in msg and ".part" not in msg
    assert list(tmp_path.iterdir()) == [] and sleeps == [0.2, 0.4]


def test_local_problems_with_the_destination_are_named(files, tmp_path, sleeps):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_dir").mkdir()
    with FileServer(files) as srv:
        url = srv.url + "/d/the-verdict.txt"
        with pytest.raises(ScratchError, match=r"cannot create the folder .*a_file"):
            download(url, tmp_path / "a_file" / "v.txt", progress=False)
        with pytest.raises(ScratchError, match=r"a_dir: that is a folder"):
            download(url, tmp_path / "a_dir", progress=False)
        (tmp_path / "v.txt.part").mkdir()  # cannot be written: a local problem, not retried
        with pytest.raises(ScratchError, match=r"v\.txt\.part: Is a directory"):
            download(url, tmp_path / "v.txt", progress=False)
    assert sleeps == []


def test_resolve_url_mirrors(monkeypatch, tmp_path):
    url = "https://raw.example.org/owner/repo/main/a%20b.txt?raw=1"
    assert resolve_url(url) == url
    monkeypatch.setenv("SCRATCHLLM_MIRROR", "http://127.0.0.1:8000/m/")
    assert resolve_url(url) == "http://127.0.0.1:8000/m/owner/repo/main/a%20b.txt?raw=1"
    monkeypatch.setenv("SCRATCHLLM_MIRROR", str(tmp_path))
    assert resolve_url(url) == str(tmp_path / "owner/repo/main/a b.txt")


def test_mirror_as_base_url(files, tmp_path, monkeypatch):
    mirrored = {"/mirror" + k: v for k, v in files.items()}
    with FileServer(mirrored) as srv:
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url + "/mirror")
        download("https://nowhere.invalid/d/the-verdict.txt", tmp_path / "v.txt", sha256=VERDICT_SHA,
                 progress=False)
        assert srv.requests == [("/mirror/d/the-verdict.txt", None)]
    assert sha(tmp_path / "v.txt") == VERDICT_SHA


def test_mirror_as_folder(shared_data, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "d").mkdir(parents=True)
    os.symlink(shared_data / "the-verdict.txt", mirror / "d" / "the-verdict.txt")
    monkeypatch.setenv("SCRATCHLLM_MIRROR", str(mirror))
    dest = download("https://nowhere.invalid/d/the-verdict.txt", tmp_path / "v.txt", sha256=VERDICT_SHA,
                    size=20479, progress=False)
    assert sha(dest) == VERDICT_SHA
    with pytest.raises(ScratchError, match="mirror file .*other.txt does not exist"):
        download("https://nowhere.invalid/d/other.txt", tmp_path / "o.txt", progress=False)
    (mirror / "d" / "bad.txt").write_bytes(b"not the verdict")
    with pytest.raises(ScratchError, match="failed its check"):
        download("https://nowhere.invalid/d/bad.txt", tmp_path / "b.txt", sha256=VERDICT_SHA, progress=False)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SCRATCHLLM_CACHE")
    assert cache_dir() == cache_dir().home() / ".cache" / "scratchllm"
