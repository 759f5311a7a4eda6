"""LoRA runs of a language model: `pretrain --model M --lora-rank R` trains and saves only the adapters;
`--model RUN` loads base + adapters as one (merged) model; `scratchllm merge` writes it as a plain model
folder that generate and export take like any other."""

import json

import pytest
import torch
from pretrain_helpers import make_inputs, pretrain
from safetensors.torch import load_file

from scratchllm.cli import main
from scratchllm.common import ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.lora import apply_lora
from scratchllm.tokenizer import Tokenizer
from scratchllm.weights.checkpoint import load_model, open_model, save_model


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    inputs = make_inputs(root)
    torch.manual_seed(0)
    base = GPT(ModelConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    save_model(base, Tokenizer.load(inputs["tokenizer"]), root / "base")
    out = root / "run"
    assert pretrain("--data", str(inputs["shards"]), "--model", str(root / "base"), "--out", str(out),
                    "--lora-rank", "4", "--lora-alpha", "8", "--max-steps", "6", "--lr", "1e-2", "--warmup-steps", "0",
                    "--batch-size", "4", "--block-size", "32", "--precision", "fp32", "--device", "cpu",
                    "--eval-every", "3", "--eval-batches", "2", "--checkpoint-every", "0") == 0
    return {"root": root, "base": root / "base", "run": out, "inputs": inputs}


def test_a_lora_run_saves_only_the_adapters(lora_run):
    ckpt = lora_run["run"] / (lora_run["run"] / "latest").read_text().strip()
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert keys and all(k.endswith(("lora_A", "lora_B")) for k in keys)
    assert len(keys) == 2 * 4 * 2  # A and B of 4 targets in each of 2 blocks
    adapter = json.loads((ckpt / "adapter.json").read_text())
    assert adapter["base"] == str(lora_run["base"].resolve()) and adapter["lora"]["rank"] == 4
    assert json.loads((ckpt / "meta.json").read_text())["base_fingerprint"].startswith("sha256:")


def test_model_run_loads_base_plus_adapters_as_one_model(lora_run):
    merged, tok = load_model(lora_run["run"])
    assert tok is not None and all(type(m).__name__ != "LoRALinear" for m in merged.modules())
    # the same model built by hand: base, adapters swapped in, the trained tensors loaded, unmerged
    base, _ = load_model(lora_run["base"])
    apply_lora(base, rank=4, alpha=8)
    ckpt = lora_run["run"] / (lora_run["run"] / "latest").read_text().strip()
    base.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
    idx = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = base.eval()(idx), merged(idx)
        untrained = load_model(lora_run["base"])[0](idx)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, untrained, atol=1e-3)  # the adapters trained: the model changed


def test_merge_writes_a_full_model_that_generate_and_export_take(lora_run, tmp_path, capsys):
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model", str(lora_run["run"]), "--out", str(merged_dir)]) == 0
    assert not (merged_dir / "adapter.json").exists()
    a, _ = load_model(merged_dir)
    b, _ = load_model(lora_run["run"])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    capsys.readouterr()
    assert main(["generate", "--model", str(merged_dir), "--prompt", "the model", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    from_merged = capsys.readouterr().out
    assert main(["generate", "--model", str(lora_run["run"]), "--prompt", "the model", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == from_merged
    assert main(["export", "--model", str(merged_dir), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_a_lora_run_checks_its_base(lora_run, tmp_path):
    """Adapters on a different base are refused (the base fingerprint), and merge refuses a full model."""
    run_copy = tmp_path / "run"
    ckpt = lora_run["run"] / (lora_run["run"] / "latest").read_text().strip()
    import shutil

    shutil.copytree(ckpt, run_copy)
    torch.manual_seed(5)
    other = GPT(ModelConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32))
    save_model(other, Tokenizer.load(lora_run["inputs"]["tokenizer"]), tmp_path / "other")
    spec = json.loads((run_copy / "adapter.json").read_text())
    (run_copy / "adapter.json").write_text(json.dumps({**spec, "base": str(tmp_path / "other")}))
    with pytest.raises(ScratchError, match="sha256|checksum|changed|corrupt"):  # every file is in meta.json
        open_model(run_copy)
    from scratchllm.train.checkpointing import write_meta

    meta = json.loads((run_copy / "meta.json").read_text())
    (run_copy / "meta.json").unlink()
    write_meta(run_copy, {k: v for k, v in meta.items() if k != "files"})  # a consistent folder, wrong base
    with pytest.raises(ScratchError, match="different base model"):
        open_model(run_copy)
    with pytest.raises(ScratchError, match="not a LoRA run"):
        from scratchllm.infer.merge import merge_cmd

        merge_cmd(type("A", (), {"model": str(lora_run["base"]), "out": str(tmp_path / "m"), "overwrite": False})())


def test_lora_flags_need_a_pretrained_model(lora_run, tmp_path):
    with pytest.raises(ScratchError, match="LoRA adapts a pretrained --model"):
        pretrain("--data", str(lora_run["inputs"]["shards"]), "--model-preset", "tiny", "--out", str(tmp_path / "x"),
                 "--lora-rank", "4")
    with pytest.raises(ScratchError, match="lm_head cannot be a target"):
        pretrain("--data", str(lora_run["inputs"]["shards"]), "--model", str(lora_run["base"]),
                 "--out", str(tmp_path / "y"), "--lora-rank", "4", "--lora-targets", "lm_head")
