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
    with pytest.raises(ScratchError, match=r"shape mismatch \(52\): .*transformer\.h\.0\.attn\.c_attn\.weight: "
                                           r"checkpoint \(384, 128\) vs model \(192, 64\); .*\(40 more\)"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "vocab_size": 260}))
    with pytest.raises(ScratchError, match="shape mismatch"):
        load_model(tmp_path / "m")
    with pytest.raises(ScratchError, match="tokenizer has 270 ids but the model only 260"):
        save_model(GPT(ModelConfig.from_preset("tiny", vocab_size=260)), tok, tmp_path / "m2")
