"""weights/state.py, the one home of the state-dict rules: tied (aliased) names, wrapper prefixes,
checked loading with every bad key named, and a run folder's `latest` pointer."""

import pytest
import torch

from scratchllm.common import ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.weights.state import (
    LATEST,
    empty_model,
    load_state_dict_checked,
    read_latest,
    resolve_latest,
    state_to_save,
    tied_names,
    unwrap_key,
    unwrap_model,
    write_latest,
)


def make(**overrides):
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", vocab_size=64, block_size=8, **overrides))


class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel: the model is `.module`
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_tied_names_and_unwrapping():
    tied, untied = make(), make(tie_embeddings=False)
    assert tied_names(tied) == {"lm_head.weight"} and tied_names(untied) == set()
    wrapped = Wrapper(torch.compile(tied))  # not run: only names matter
    assert unwrap_model(wrapped) is tied and tied_names(wrapped) == {"lm_head.weight"}
    assert unwrap_key("module._orig_mod.transformer.wte.weight") == "transformer.wte.weight"
    saved = state_to_save(wrapped)
    assert set(saved) == set(tied.state_dict()) - {"lm_head.weight"}
    assert saved["transformer.wte.weight"].data_ptr() == tied.transformer.wte.weight.data_ptr()  # not copied
    assert set(state_to_save(untied)) == set(untied.state_dict())


def test_checked_load_round_trip_and_every_bad_key_named():
    src = make()
    dst = empty_model(src.config)
    assert dst.lm_head.weight is dst.transformer.wte.weight  # re-tied after allocation
    load_state_dict_checked(dst, {f"_orig_mod.{k}": v for k, v in state_to_save(src).items()}, "src")
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))
    load_state_dict_checked(dst, src.state_dict(), "with head")  # a writer that kept the tied copy: fine

    state = state_to_save(src)
    state.pop("transformer.h.0.ln_1.weight")
    state["extra.weight"] = torch.zeros(1)
    state["transformer.wte.weight"] = torch.zeros(3, 3)
    with pytest.raises(ScratchError) as e:
        load_state_dict_checked(dst, state, "bad.safetensors")
    assert str(e.value).splitlines() == [
        "bad.safetensors: weights do not fit the model config:",
        "  shape mismatch (1):", "    transformer.wte.weight: checkpoint (3, 3) vs model (64, 128)",
        "  missing keys (1):", "    transformer.h.0.ln_1.weight",
        "  unexpected keys (1):", "    extra.weight"]


def test_mismatch_message_is_one_problem_per_line_and_cut():
    """A config that does not fit (another n_embd, more layers) used to be one line of thousands of
    characters; now each key is a line, and every list stops after 8 with a count."""
    src = state_to_save(make())
    with pytest.raises(ScratchError) as e:
        load_state_dict_checked(make(n_layer=4, n_head=2, n_embd=64), src, "m.safetensors")
    lines = str(e.value).splitlines()
    assert max(map(len, lines)) < 120
    assert lines[1].startswith("  shape mismatch (") and "    ... and " in "\n".join(lines)
    assert lines[10].startswith("    ... and ") and lines[10].endswith(" more")  # 1 title + 8 keys + the count
    assert len(lines) <= 1 + 3 * 10


def test_checked_load_of_a_partial_state():
    src, dst = make(), make()
    torch.nn.init.zeros_(dst.transformer.ln_f.weight)
    part = {"transformer.ln_f.weight": src.transformer.ln_f.weight.detach().clone()}
    load_state_dict_checked(dst, part, "head only", expected=part)
    assert torch.equal(dst.transformer.ln_f.weight, src.transformer.ln_f.weight)
    with pytest.raises(ScratchError, match=r"missing keys \(1\):\n    transformer.ln_f.bias"):
        load_state_dict_checked(dst, part, "head only", expected=[*part, "transformer.ln_f.bias"])


def test_latest_pointer(tmp_path):
    run = tmp_path / "run"
    assert read_latest(run) is None
    (run / "step_0000002").mkdir(parents=True)
    (run / "step_0000002" / "meta.json").write_text("{}")
    write_latest(run, "step_0000002")
    assert (run / LATEST).read_text() == "step_0000002\n" and read_latest(run) == "step_0000002"
    assert resolve_latest(run, "meta.json") == run / "step_0000002"
    assert resolve_latest(run / "step_0000002", "meta.json") == run / "step_0000002"  # a checkpoint itself
    with pytest.raises(ScratchError, match=r"points to 'step_0000002', which is not a complete checkpoint folder "
                                           r"\(no .*config.json\)"):
        resolve_latest(run, "config.json")
    (run / LATEST).write_text("../elsewhere\n")  # only a folder inside the run counts
    with pytest.raises(ScratchError, match="points to '../elsewhere'"):
        resolve_latest(run, "meta.json")
    with pytest.raises(ScratchError, match="no meta.json here and no `latest` file"):
        resolve_latest(tmp_path, "meta.json")
    with pytest.raises(ValueError, match="inside the run folder"):
        write_latest(run, "a/b")


def test_read_safetensors_into_equals_the_safetensors_library(tmp_path):
    """Reading each tensor straight into its parameter gives the values safetensors' own load_file
    gives, for fp32 and bf16 files, with a tied head; damaged files and misfits are clear errors."""
    from safetensors.torch import load_file, save_file

    from scratchllm.weights.state import empty_model, read_safetensors_into, state_to_save

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", vocab_size=300, n_layer=2, norm="rmsnorm", positions="rope", mlp="swiglu",
                                  bias=False)
    src = GPT(cfg)
    for dtype in (torch.float32, torch.bfloat16):
        path = tmp_path / f"{dtype}.safetensors"
        save_file({k: v.to(dtype).contiguous() for k, v in state_to_save(src).items()}, str(path))
        model = empty_model(cfg)
        read_safetensors_into(model, path)
        ref = load_file(str(path))
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref.get(k, ref["transformer.wte.weight"]).float()), k
        assert model.lm_head.weight is model.transformer.wte.weight
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-10])
    with pytest.raises(ScratchError, match="short.safetensors: tensor .* lies outside the file"):
        read_safetensors_into(empty_model(cfg), tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ScratchError, match="junk.safetensors: cannot read safetensors file"):
        read_safetensors_into(empty_model(cfg), tmp_path / "junk.safetensors")
    with pytest.raises(ScratchError, match=r"missing keys \(.*\):\n    transformer\.h\.2\."):
        read_safetensors_into(empty_model(ModelConfig(**{**cfg.to_dict(), "n_layer": 3})), path)
