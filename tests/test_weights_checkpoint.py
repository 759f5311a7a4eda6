"""Model folder tests: save_model / load_model round trips (tied, untied, Llama-style), wrapper prefixes
stripped, run folders followed through `latest`, atomic writes, and clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from scratchllm.common import ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.tokenizer import train_bpe
from scratchllm.weights.checkpoint import load_model, save_model


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["hello world, hello there. " * 10], vocab_size=270, special_tokens=["<|endoftext|>"])


def make(**overrides):
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", vocab_size=300, block_size=16, **overrides)).eval()


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False},
                                       {"norm": "rmsnorm", "positions": "rope", "mlp": "swiglu", "n_kv_head": 2}],
                         ids=["tied", "untied", "llama"])
def test_round_trip(tmp_path, tok, overrides):
    model = make(**overrides)
    save_model(model, tok, tmp_path / "m", meta={"step": 3})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "meta.json", "model.safetensors",
                                                                  "tokenizer"]
    keys = load_file(str(tmp_path / "m" / "model.safetensors")).keys()
    assert ("lm_head.weight" in keys) == (not model.config.tie_embeddings)  # a tied head is stored once
    loaded, tok2 = load_model(tmp_path / "m")
    assert loaded.config == model.config and tok2 == tok and not loaded.training
    idx = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert (loaded.lm_head.weight is loaded.transformer.wte.weight) == model.config.tie_embeddings


def test_compiled_wrapper_prefix_is_stripped_and_run_folder_is_followed(tmp_path, tok):
    model = make()
    wrapped = torch.compile(model)  # not run: only its state_dict keys (`_orig_mod.`) matter here
    assert next(iter(wrapped.state_dict())).startswith("_orig_mod.")
    save_model(wrapped, tok, tmp_path / "run" / "step_0000010")
    (tmp_path / "run" / "latest").write_text("step_0000010\n")
    loaded, _ = load_model(tmp_path / "run")
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    (tmp_path / "run" / "latest").write_text("step_0000020\n")
    with pytest.raises(ScratchError, match="not a complete checkpoint"):
        load_model(tmp_path / "run")


def test_path_to_model_safetensors_loads_its_folder(tmp_path, tok):
    model = make()
    save_model(model, tok, tmp_path / "m")
    loaded, tok2 = load_model(tmp_path / "m" / "model.safetensors")
    assert tok2 == tok
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    with pytest.raises(ScratchError, match="config.json is a file: give a model folder"):
        load_model(tmp_path / "m" / "config.json")


def test_failed_save_leaves_nothing_behind(tmp_path, tok, monkeypatch):
    def broken_save(self, directory, overwrite=False):
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    monkeypatch.setattr(type(tok), "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(make(), tok, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_load_errors(tmp_path, tok):
    with pytest.raises(ScratchError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScratchError, match="no config.json"):
        load_model(tmp_path / "empty")
    save_model(make(), tok, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_ctx": 3}))
    with pytest.raises(ScratchError, match="unknown key.*n_ctx"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "n_head": 8, "n_embd": 64}))
    with pytest.raises(ScratchError, match=r"shape mismatch \(52\):\n(    .*\n)*    transformer\.h\.0\.attn\.c_attn"
                                           r"\.weight: checkpoint \(384, 128\) vs model \(192, 64\)\n(    .*\n)*"
                                           r"    \.\.\. and 44 more"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 260}))
    with pytest.raises(ScratchError, match="shape mismatch"):
        load_model(tmp_path / "m")
    with pytest.raises(ScratchError, match="tokenizer has 270 ids but the model only 260"):
        save_model(GPT(ModelConfig.from_preset("tiny", vocab_size=260)), tok, tmp_path / "m2")


# --------------------------------------------------------------------------------------------- integrity
def training_checkpoint(tmp_path, tok):
    """A run folder with one checkpoint written the trainer's way (meta.json with a `files` table)."""
    from scratchllm.train.checkpointing import save_checkpoint
    from scratchllm.weights.checkpoint import write_model_files

    model = make()
    save_checkpoint(tmp_path / "run", 2, lambda folder: write_model_files(model, tok, folder),
                    {"step": 2}, {"tokens_seen": 64}, keep_last=1)
    return tmp_path / "run", tmp_path / "run" / "step_0000002", model


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_is_refused_on_load(tmp_path, tok):
    """Bytes flipped in model.safetensors (same size: only the sha256 can tell) or the file cut short:
    load_model (behind generate, export, pretrain --model) names the file, as resume always did."""
    run, ckpt, model = training_checkpoint(tmp_path, tok)
    loaded, _ = load_model(run)
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight)
    flip_last_byte(ckpt / "model.safetensors")
    with pytest.raises(ScratchError, match=r"corrupted checkpoint: .*step_0000002/model\.safetensors does not "
                                           r"match its sha256 in .*meta\.json"):
        load_model(run)
    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:-10])
    with pytest.raises(ScratchError, match=r"model\.safetensors does not match its size .*\(\d+ bytes, expected \d+\)"):
        load_model(ckpt / "model.safetensors")
    (ckpt / "tokenizer" / "ranks.tiktoken").unlink()
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ScratchError, match=r"model\.safetensors is missing \(it is listed in .*meta\.json\)"):
        load_model(ckpt)


def test_files_load_model_does_not_read_are_not_required(tmp_path, tok):
    run, ckpt, _ = training_checkpoint(tmp_path, tok)
    (ckpt / "train_state.pt").unlink()  # shared without its optimizer state: still a loadable model
    load_model(run)


def test_hashes_are_checked_once_per_file_version(tmp_path, tok, monkeypatch):
    """The first load hashes; later loads of the untouched files only compare sizes and the record in
    .verified.json. A rewrite, even with the old size and mtime put back, is hashed again."""
    import os

    from scratchllm.weights import state

    run, ckpt, _ = training_checkpoint(tmp_path, tok)
    hashed = []
    real = state.sha256_file
    monkeypatch.setattr(state, "sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    load_model(run)
    assert "model.safetensors" in hashed and "config.json" in hashed and "train_state.pt" not in hashed
    assert (ckpt / state.VERIFIED).is_file()
    hashed.clear()
    load_model(run)
    assert hashed == []
    f = ckpt / "model.safetensors"
    st = f.stat()
    flip_last_byte(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; the ctime still moves
    with pytest.raises(ScratchError, match="does not match its sha256"):
        load_model(run)
    assert hashed == ["model.safetensors"]


def test_unwritable_folder_is_verified_every_time(tmp_path, tok, monkeypatch):
    from scratchllm.weights import state

    run, ckpt, _ = training_checkpoint(tmp_path, tok)

    def read_only(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(state, "atomic_write_text", read_only)
    load_model(run)
    assert not (ckpt / state.VERIFIED).exists()
    flip_last_byte(ckpt / "model.safetensors")
    with pytest.raises(ScratchError, match="does not match its sha256"):
        load_model(run)


@pytest.mark.parametrize("files, match", [
    ({}, r"its `files` table is empty, so nothing in .*step_0000002 can be checked for corruption"),
    (None, "its `files` table is missing"),
    ([], "its `files` table is a list"),
    ({"model.safetensors": {"size": 1}}, r"`files` entry 'model.safetensors' must name a file inside"),
    ({"../x": {"size": 1, "sha256": "00"}}, r"`files` entry '\.\./x'"),
    ({"config.json": {"size": 1, "sha256": "00"}}, r"does not list model\.safetensors"),
])
def test_an_empty_or_broken_files_table_is_refused(tmp_path, tok, files, match):
    """An empty `files` table used to switch the check off without a word, on load and on resume."""
    from scratchllm.train.checkpointing import verify_checkpoint

    run, ckpt, _ = training_checkpoint(tmp_path, tok)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta.pop("files")
    if files is not None:
        meta["files"] = files
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ScratchError, match=match) as e:
        load_model(run)
    assert str(ckpt / "meta.json") in str(e.value)
    if "does not list" not in match:
        with pytest.raises(ScratchError, match=match):
            verify_checkpoint(ckpt)
    if files == {}:
        assert "remove meta.json to load the model unchecked" in str(e.value)
        (ckpt / "meta.json").unlink()  # the way out the message names
        assert (ckpt / "config.json").is_file() and load_model(ckpt)[0] is not None


def test_save_model_with_meta_lists_its_files(tmp_path, tok):
    save_model(make(), tok, tmp_path / "m", meta={"step": 3})
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert meta["step"] == 3 and {"model.safetensors", "config.json", "tokenizer/ranks.tiktoken"} <= set(meta["files"])
    flip_last_byte(tmp_path / "m" / "model.safetensors")
    with pytest.raises(ScratchError, match="does not match its sha256"):
        load_model(tmp_path / "m")


def test_partial_checkpoint_is_named_as_such(tmp_path, tok):
    run, ckpt, _ = training_checkpoint(tmp_path, tok)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "base_fingerprint": "sha256:abc"}))
    with pytest.raises(ScratchError, match=r"holds only the trainable parameters .* base model sha256:abc"):
        load_model(run)
