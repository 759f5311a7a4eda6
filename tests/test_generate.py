"""`scratchllm generate` end to end (in-process, tiny model): a corrupted checkpoint is refused before
any text is produced, and `--tokenizer` says so when it is not the model's own tokenizer."""

import pytest
import torch

from scratchllm.cli import main
from scratchllm.model import GPT, ModelConfig
from scratchllm.tokenizer import train_bpe
from scratchllm.train.checkpointing import save_checkpoint
from scratchllm.weights.checkpoint import write_model_files

TEXT = "hello world, hello there. the cat sat on the mat. " * 20


@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT], vocab_size=280, special_tokens=["<|endoftext|>"])


@pytest.fixture()
def run(tmp_path, tok):
    """A run folder with one checkpoint, written the trainer's way."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=300, block_size=32, n_layer=1)).eval()
    save_checkpoint(tmp_path / "run", 1, lambda f: write_model_files(model, tok, f), {}, {}, keep_last=1)
    return tmp_path / "run"


def generate(*extra):
    return main(["generate", "--prompt", "hello", "--max-new-tokens", "3", "--temperature", "0",
                 "--device", "cpu", "--precision", "fp32", *extra])


def test_generate_runs(run, capsys):
    assert generate("--model", str(run)) == 0
    out = capsys.readouterr()
    assert out.out.startswith("hello") and "warning" not in out.err


@pytest.mark.parametrize("command", ["generate", "export"])
def test_corrupted_weights_are_refused(run, tmp_path, capsys, command):
    """Used to generate (or export) from flipped bytes without a word; only resume checked meta.json."""
    f = run / "step_0000001" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside a tensor: the file still parses
    f.write_bytes(bytes(data))
    if command == "generate":
        code = generate("--model", str(run))
    else:
        code = main(["export", "--model", str(run), "--out", str(tmp_path / "hf")])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert f"error: corrupted checkpoint: {f} does not match its sha256" in out.err
    assert not (tmp_path / "hf").exists()


def test_another_tokenizer_is_named_with_both_fingerprints(run, tok, tmp_path, capsys):
    """Used to replace the model's tokenizer silently when only the vocabulary sizes agreed."""
    other = train_bpe(["completely different text, with other merges! " * 30], vocab_size=280,
                      special_tokens=["<|endoftext|>"])
    assert other.vocab_size == tok.vocab_size and other.fingerprint() != tok.fingerprint()
    other.save(tmp_path / "other")
    assert generate("--model", str(run), "--tokenizer", str(tmp_path / "other")) == 0
    err = capsys.readouterr().err
    assert (f"warning: --tokenizer {tmp_path / 'other'} is not the tokenizer {run} was saved with "
            f"(fingerprint {other.fingerprint()[:16]} vs the model's {tok.fingerprint()[:16]})") in err

    tok.save(tmp_path / "same")  # the model's own tokenizer, from another folder: nothing to say
    assert generate("--model", str(run), "--tokenizer", str(tmp_path / "same")) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_tokenizer_too_big_for_the_model_is_refused(run, tmp_path, capsys):
    big = train_bpe([" ".join(f"w{i} x{i * 7}" for i in range(400))], vocab_size=320,
                    special_tokens=["<|endoftext|>"])
    assert big.vocab_size == 320  # > the model's 300 embedding rows
    big.save(tmp_path / "big")
    assert generate("--model", str(run), "--tokenizer", str(tmp_path / "big")) == 2
    err = capsys.readouterr().err
    assert f"error: --tokenizer {tmp_path / 'big'} with --model {run}: the tokenizer has 320 ids" in err
