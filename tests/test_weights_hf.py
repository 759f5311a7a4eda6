"""HF GPT-2 import / export tests against transformers itself: a random tiny GPT2LMHeadModel saved by
transformers loads into our GPT with equal logits; our export loads in GPT2LMHeadModel and
AutoTokenizer with equal logits and equal token ids; GPT-2's own vocab/merges files are reproduced
from the ranks; bad folders and configs give clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from scratchllm.common import ScratchError
from scratchllm.model import GPT, ModelConfig
from scratchllm.tokenizer import load_tokenizer, train_bpe
from scratchllm.weights.checkpoint import load_model
from scratchllm.weights.hf import export_hf, hf_vocab_and_merges, load_hf_gpt2

transformers = pytest.importorskip("transformers")

TEXT = ("Hello world! The quick brown fox's 3 jumps, 1234 times;\n\n  indented   spaces\t tabs "
        "naïve café 日本語 emoji 🎉 <|endoftext|> and again.")


def perturb_(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def tiny_hf(vocab=120, tie=True):
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=24, n_layer=2, n_head=2, n_embd=16,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    perturb_(model)
    return model


@pytest.fixture(scope="module")
def small_tokenizer():
    corpus = [TEXT * 3, "the cat sat on the mat; the dog sat on the log. " * 20]
    return train_bpe(corpus, vocab_size=330, special_tokens=["<|endoftext|>"])


@pytest.mark.parametrize("tie", [True, False])
def test_import_hf_folder_gives_equal_logits(tmp_path, tie):
    hf = tiny_hf(tie=tie)
    hf.save_pretrained(tmp_path)  # what transformers writes: config.json + model.safetensors
    idx = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(idx).logits
        ours = load_hf_gpt2(tmp_path)
        assert ours.config.attention == "sdpa"
        for model in (ours, _with_attention(ours, "naive")):
            assert (model(idx) - ref).abs().max().item() <= 1e-4
        assert (load_hf_gpt2(tmp_path / "model.safetensors")(idx) - ref).abs().max().item() <= 1e-4
    ours = load_hf_gpt2(tmp_path)
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tie


def _with_attention(model, attention):
    cfg = ModelConfig(**{**model.config.to_dict(), "attention": attention})
    other = GPT(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def test_import_published_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The hub's gpt2 files have keys like `h.0.attn.c_attn.weight` and the `h.N.attn.bias` mask buffers."""
    hf = tiny_hf()
    hf.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    published = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
    for i in range(2):
        published[f"h.{i}.attn.bias"] = torch.ones(1, 1, 24, 24).tril()
    save_file(published, str(tmp_path / "model.safetensors"))
    idx = torch.randint(0, 120, (1, 24))
    with torch.no_grad():
        assert (load_hf_gpt2(tmp_path)(idx) - hf(idx).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_export_loads_in_transformers_with_equal_logits_and_ids(tmp_path, pattern):
    tok = train_bpe([TEXT * 3, "the cat sat on the mat. " * 20], vocab_size=320,
                    special_tokens=["<|endoftext|>"], pattern=pattern)
    torch.manual_seed(0)
    ours = GPT(ModelConfig(block_size=32, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16)).eval()
    perturb_(ours)
    export_hf(ours, tok, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tok.encode(TEXT, allowed_special="all")
    assert hf_tok(TEXT)["input_ids"] == ids
    assert hf_tok.decode(ids) == TEXT
    assert hf_tok.eos_token_id == tok.eot_token
    idx = torch.tensor([ids[:32]])
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-4
    # and back again through load_model: same weights, same tokenizer
    model2, tok2 = load_model(tmp_path / "hf")
    assert tok2.encode(TEXT, allowed_special="all") == ids and tok2.pattern == tok.pattern
    with torch.no_grad():
        assert torch.equal(model2(idx), ours(idx))


@pytest.mark.parametrize("switches", [{"tie_embeddings": False}, {"bias": False}], ids=["untied", "nobias"])
def test_export_untied_head_and_bias_free(tmp_path, small_tokenizer, switches):
    torch.manual_seed(0)
    ours = GPT(ModelConfig(block_size=16, vocab_size=small_tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                           **switches)).eval()
    perturb_(ours)
    export_hf(ours, small_tokenizer, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, small_tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-4


def test_export_into_an_empty_folder_and_refusal_of_a_full_one(tmp_path, small_tokenizer):
    torch.manual_seed(0)
    ours = GPT(ModelConfig(block_size=16, vocab_size=small_tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    out = tmp_path / "hf"
    out.mkdir()  # e.g. made by a job scheduler or a mounted volume: empty, so it is used
    assert export_hf(ours, small_tokenizer, out) == out
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, small_tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-4
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ScratchError, match=r"hf already exists and is not empty \(pass --overwrite"):
        export_hf(ours, small_tokenizer, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # refused before anything was written
    (tmp_path / "file").write_text("x")
    with pytest.raises(ScratchError, match="already exists and is a file"):
        export_hf(ours, small_tokenizer, tmp_path / "file")
    (out / "stray.txt").write_text("old")
    export_hf(ours, small_tokenizer, out, overwrite=True)  # replaced as a whole: the stray file is gone
    assert not (out / "stray.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_gpt2_vocab_and_merges_reproduce_openai_files(shared_data, gpt2_tiktoken):
    vocab, merges = hf_vocab_and_merges(load_tokenizer("gpt2"))
    assert vocab == json.loads((shared_data / "gpt2" / "encoder.json").read_text(encoding="utf-8"))
    lines = (shared_data / "gpt2" / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    assert merges == [ln for ln in lines[1:] if ln]


def test_gpt2_tokenizer_export_matches_tiktoken_in_autotokenizer(tmp_path, gpt2_tiktoken):
    tok = load_tokenizer("gpt2")
    model = GPT(ModelConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=1, n_embd=8))
    export_hf(model, tok, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = TEXT + " Sphinx of black quartz, judge my vow! ''' 'll 've 're\r\n\r\n" * 3
    assert hf_tok(text)["input_ids"] == gpt2_tiktoken.encode(text, allowed_special="all")


def test_errors(tmp_path, small_tokenizer):
    mixed = GPT(ModelConfig.from_preset("tiny", positions="rope"))  # layernorm + rope: neither GPT-2 nor Llama
    with pytest.raises(ScratchError, match="cannot be exported to Hugging Face format"):
        export_hf(mixed, small_tokenizer, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    too_small = GPT(ModelConfig(block_size=8, vocab_size=300, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ScratchError, match="tokenizer has 330 ids but the model only 300"):
        export_hf(too_small, small_tokenizer, tmp_path / "x")

    hf = tiny_hf()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(ScratchError, match=r"shape mismatch \(\d+\):\n(    .*\n)*    transformer\.wte\.weight: checkpoint \(120, 16\) "
                                           r"vs model \(120, 32\)"):
        load_hf_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(ScratchError, match=r"missing keys \(12\):\n    transformer\.h\.2\."):
        load_hf_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ScratchError, match=r"unexpected keys \(12\):\n    transformer\.h\.1\."):
        load_hf_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ScratchError, match="only 'gpt2'"):
        load_hf_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(ScratchError, match="activation_function 'relu'"):
        load_hf_gpt2(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))  # the config is read first: a good one
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(ScratchError, match="model.safetensors not found"):
        load_hf_gpt2(tmp_path / "hf")
    with pytest.raises(ScratchError, match="config.json not found"):
        load_hf_gpt2(tmp_path)


def test_export_cli(tmp_path, small_tokenizer, capsys):
    from scratchllm.cli import main
    from scratchllm.weights.checkpoint import save_model

    torch.manual_seed(0)
    ours = GPT(ModelConfig(block_size=16, vocab_size=small_tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16))
    save_model(ours, small_tokenizer, tmp_path / "m")
    assert main(["export", "--model", str(tmp_path / "m"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, small_tokenizer.vocab_size, (1, 16))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() <= 1e-4
    assert main(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    llama = ModelConfig.from_preset("tiny", positions="rope", vocab_size=small_tokenizer.vocab_size)
    save_model(GPT(llama), small_tokenizer, tmp_path / "llama")
    assert main(["export", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "hf2")]) == 2
    assert "this model cannot be exported to Hugging Face format" in capsys.readouterr().err
    assert not (tmp_path / "hf2").exists()
    save_model(ours, None, tmp_path / "bare")
    assert main(["export", "--model", str(tmp_path / "bare"), "--out", str(tmp_path / "hf3")]) == 2
    assert "no tokenizer/ folder; the HF export needs the model's tokenizer" in capsys.readouterr().err
