"""`scratchllm download gpt2` against a local HTTP server (never the internet): a tiny random GPT-2 made
by transformers plus OpenAI's real vocab files are served under the hub's URL layout through
SCRATCHLLM_MIRROR (the checks table is patched to hold the tiny weights' size and sha256); the
download resumes a dropped connection, checks sizes / sha256 (refusing a corrupted file), caches, and the
folder loads with logits equal to transformers' and token ids equal to tiktoken's."""

import hashlib

import pytest
import torch
from _fileserver import FileServer

from scratchllm.cli import main
from scratchllm.weights import download as gpt2_download
from scratchllm.weights.checkpoint import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, shared_data):
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=16, n_layer=1, n_head=2, n_embd=8)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    hf.save_pretrained(folder)
    files = {"config.json": (folder / "config.json").read_bytes(),
             "model.safetensors": (folder / "model.safetensors").read_bytes(),
             "vocab.json": (shared_data / "gpt2" / "encoder.json").read_bytes(),  # byte-identical to the hub's
             "merges.txt": (shared_data / "gpt2" / "vocab.bpe").read_bytes()}
    return hf, files


def serve(files, repo):
    return FileServer({f"/{repo}/resolve/main/{name}": data for name, data in files.items()})


WEIGHTS_355M = "/openai-community/gpt2-medium/resolve/main/model.safetensors"


def check_tiny_weights_as_355m(monkeypatch, files):
    """Make the checks table hold the served tiny file's size and sha256 as GPT-2 355M's weights."""
    data = files["model.safetensors"]
    monkeypatch.setitem(gpt2_download.GPT2_CHECKS, ("355M", "model.safetensors"),
                        (len(data), hashlib.sha256(data).hexdigest()))


def test_download_resumes_checks_caches_and_loads(tiny_files, tmp_path, monkeypatch, gpt2_tiktoken):
    hf, files = tiny_files
    weights_path = WEIGHTS_355M
    check_tiny_weights_as_355m(monkeypatch, files)  # so the resumed file goes through the sha256 check
    with serve(files, "openai-community/gpt2-medium") as srv:
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
        srv.drop_once[weights_path] = 1000  # the connection drops after 1000 bytes
        assert main(["download", "gpt2", "--size", "355M", "--quiet"]) == 0
        ranges = [r for p, r in srv.requests if p == weights_path]
        assert ranges == [None, "bytes=1000-"]  # resumed where it stopped
        dest = tmp_path / "cache" / "models" / "openai-community" / "gpt2-medium"
        assert (dest / "model.safetensors").read_bytes() == files["model.safetensors"]
        n_requests = len(srv.requests)
        assert main(["download", "gpt2", "--size", "355M", "--quiet"]) == 0
        assert len(srv.requests) == n_requests  # everything came from the cache
    model, tok = load_model(dest)
    text = "Hello world, it's a download test!"
    ids = tok.encode(text)
    assert ids == gpt2_tiktoken.encode(text)
    with torch.no_grad():
        assert (model(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item() <= 1e-4


def test_resumed_download_that_fails_the_checksum_is_refused(tiny_files, tmp_path, monkeypatch, capsys):
    _, files = tiny_files
    check_tiny_weights_as_355m(monkeypatch, files)
    with serve(files, "openai-community/gpt2-medium") as srv:
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        srv.corrupt.add(WEIGHTS_355M)  # same size, one byte flipped: only the sha256 can tell
        srv.drop_once[WEIGHTS_355M] = 1000
        assert main(["download", "gpt2", "--size", "355M", "--dest", str(tmp_path / "g"), "--quiet"]) == 2
        assert [r for p, r in srv.requests if p == WEIGHTS_355M] == [None, "bytes=1000-"]
    err = capsys.readouterr().err
    assert "openai-community/gpt2-medium/resolve/main/model.safetensors" in err
    assert "failed its check: sha256" in err
    assert f"expected {hashlib.sha256(files['model.safetensors']).hexdigest()}" in err
    assert not (tmp_path / "g" / "model.safetensors").exists()
    assert not (tmp_path / "g" / "model.safetensors.part").exists()


def test_download_to_dest_rejects_a_file_that_fails_the_known_checksum(tiny_files, tmp_path, monkeypatch, capsys):
    _, files = tiny_files
    with serve(files, "openai-community/gpt2") as srv:  # the tiny file is not the real 124M checkpoint
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        assert main(["download", "gpt2", "--size", "124M", "--dest", str(tmp_path / "g"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "huggingface.co/openai-community/gpt2/resolve/main/config.json" in err
    assert not (tmp_path / "g" / "config.json").exists()


def test_missing_file_on_the_server_is_a_clear_error(tiny_files, tmp_path, monkeypatch, capsys):
    _, files = tiny_files
    partial = {k: v for k, v in files.items() if k != "model.safetensors"}
    with serve(partial, "openai-community/gpt2-large") as srv:
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        assert main(["download", "gpt2", "--size", "774M", "--dest", str(tmp_path / "g"), "--quiet"]) == 2
    assert "HTTP 404" in capsys.readouterr().err


@pytest.mark.parametrize("published", ["right", "wrong"])
def test_size_without_a_known_checksum_uses_the_hubs_published_sha256(tiny_files, tmp_path, monkeypatch, capsys,
                                                                      published):
    _, files = tiny_files
    data = files["model.safetensors"]
    sha = hashlib.sha256(data if published == "right" else data + b"x").hexdigest()
    assert ("355M", "model.safetensors") not in gpt2_download.GPT2_CHECKS  # nothing known here for 355M
    with serve(files, "openai-community/gpt2-medium") as srv:
        srv.head_headers[WEIGHTS_355M] = {"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))}
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
        code = main(["download", "gpt2", "--size", "355M", "--quiet"])
        assert WEIGHTS_355M in srv.heads  # the hub was asked
    weights = tmp_path / "cache" / "models" / "openai-community" / "gpt2-medium" / "model.safetensors"
    if published == "right":
        assert code == 0 and weights.read_bytes() == data
    else:
        assert code == 2 and "failed its check" in capsys.readouterr().err and not weights.exists()
