"""Classification fine-tuning (the book's chapter 6): `scratchllm classify train|eval|predict` and
`scratchllm merge` end to end on a tiny byte-level GPT and a toy spam/ham file, and the parts they are
made of: the objective against hand-computed numbers, the resumable example sampler, padding, text
encoding and the tokenizer's pad token (our files, Hugging Face folders, the SmolLM2 GGUF).

Hermetic: the tokenizer is the 256 bytes + <|endoftext|> (no GPT-2 files), the model is random and
2 blocks x 32 wide, the data 120 rows whose spam words are upper case and ham words lower case, so
2 epochs (20 steps) learn it in about a second on one CPU thread. Each `--train` mode is trained once
per module (the `trained` fixture) and shared by the tests that read its run folder. The CLI's
failure cases (exit 2, `error: ` naming the file, line or flag) are rows of tests/test_cli_errors.py.
"""

import json
import math
import os
import re
import shutil
import signal
from types import SimpleNamespace

import pytest
import torch
from conftest import need
from safetensors import safe_open

import scratchllm.train.objectives as objectives
from scratchllm.cli import main
from scratchllm.common import ScratchError
from scratchllm.configs import TrainConfig
from scratchllm.data.collate import ExampleBatches, in_order, pad_rows
from scratchllm.infer.classifier import Classifier, classifier_folder, encode_texts, require_pad_id
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.heads import SequenceClassifier, set_trainable
from scratchllm.tokenizer import Tokenizer
from scratchllm.train.checkpointing import trainable_state_names
from scratchllm.weights.folder import save_model
from scratchllm.weights.state import state_to_save

TINY = dict(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32)
SPAM, HAM = "WIN CASH PRIZE FREE NOW CLAIM".split(), "see you at home later dinner".split()
MODES = ["head", "last-block", "all", "lora"]
LR = {"head": "1e-1", "last-block": "3e-3", "all": "3e-3", "lora": "3e-3"}  # a random backbone's head needs more
TEXTS = ["WIN CASH NOW", "see you at home later"]


def byte_tokenizer(specials=None, **padding) -> Tokenizer:
    """The 256 single bytes + <|endoftext|> (id 256), no merges (as tests/pretrain_helpers.py)."""
    return Tokenizer({bytes([i]): i for i in range(256)}, "gpt2", specials or {"<|endoftext|>": 256}, name="bytes",
                     **padding)


def toy_text(n: int = 120, seed: int = 0) -> str:
    """`label<TAB>text` lines, ham and spam alternating, 2 to 4 words each (a fixed LCG picks them)."""
    state, lines = seed + 12345, []
    for i in range(n):
        words = SPAM if i % 2 else HAM
        picked = []
        for _ in range(2 + i % 3):
            state = (1103515245 * state + 12345) % 2**31
            picked.append(words[(state >> 16) % len(words)])
        lines.append(("spam" if i % 2 else "ham") + "\t" + " ".join(picked))
    return "\n".join(lines) + "\n"


def cli(*argv) -> int:
    """`scratchllm ARGV` in this process (errors print `error: ...` and return 2, as for a user)."""
    return main([str(a) for a in argv])


def train_args(inputs, out, mode="last-block", *extra):
    return ["classify", "train", "--model", inputs.base, "--data", inputs.data, "--out", out, "--train", mode,
            "--epochs", "2", "--lr", LR[mode], "--lora-rank", "4", "--precision", "fp32", "--device", "cpu",
            "--no-compile", *extra]


def records(run, split=None):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if split is None or r["split"] == split]


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def held_out_texts(run) -> list[str]:
    return [json.loads(x)["text"] for x in (run / "test.jsonl").read_text().splitlines()]



pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(**TINY)), byte_tokenizer(), root / "base")
    (root / "toy.tsv").write_text(toy_text())
    return SimpleNamespace(root=root, base=root / "base", data=root / "toy.tsv")


@pytest.fixture(scope="module")
def trained(inputs):
    """trained(mode) -> the run folder of `classify train --train MODE` (trained once per module)."""
    done = {}

    def get(mode: str):
        if mode not in done:
            out = inputs.root / "runs" / mode
            assert cli(*train_args(inputs, out, mode)) == 0
            done[mode] = out
        return done[mode]

    return get


# --------------------------------------------------------------------------------------------- objective
class FixedLogits(torch.nn.Module):
    """Returns the same logits whatever the input (plus a zero parameter, so a Trainer can hold it)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.masks = logits, []
        self.zero = torch.nn.Parameter(torch.zeros(()))

    def forward(self, idx, attention_mask=None):
        self.masks.append(attention_mask)
        return self.logits + self.zero


LOGITS = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, 3.0]])
BATCH = {"idx": torch.zeros(3, 4, dtype=torch.long), "labels": torch.tensor([0, 1, 1]),
         "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])}
# -log softmax: row 0 label 0: log(1 + e^-2); row 1 (a tie) label 1: log 2; row 2 label 1: log(1 + e^-3).
# argmax: row 0 -> 0 right, row 1 -> 0 (the first of a tie) wrong, row 2 -> 1 right: 2 correct of 3
LOSS_SUM = math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(-3))


def test_classification_objective_by_hand():
    model = FixedLogits(LOGITS)
    loss, metrics = objectives.classification_objective(model, BATCH)
    assert loss.item() == pytest.approx(LOSS_SUM, rel=1e-6) and loss.dtype == torch.float32
    assert int(metrics["count"]) == 3 and int(metrics["accuracy"]) == 2 and int(metrics["tokens"]) == 9
    assert model.masks[0] is BATCH["attention_mask"]  # the mask reaches the model
    loss16, _ = objectives.classification_objective(FixedLogits(LOGITS.bfloat16()), BATCH)
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(LOSS_SUM, rel=1e-2)


def test_the_trainer_reports_loss_and_accuracy_per_example(tmp_path):
    from scratchllm.train.core import Trainer

    cfg = TrainConfig(max_steps=1, warmup_steps=0, device="cpu", compile="off", precision="fp32")
    t = Trainer(FixedLogits(LOGITS), cfg, objectives.classification_objective, None, out_dir=tmp_path,
                val_batches=lambda: [BATCH, BATCH])
    val = t.evaluate()
    assert val["loss"] == pytest.approx(LOSS_SUM / 3, rel=1e-6) and val["accuracy"] == pytest.approx(2 / 3)
    assert (val["count"], val["tokens"]) == (6, 18)


# --------------------------------------------------------------------------------------------- batches
def ids(ix):
    return ix


def take(batches, k):
    return [batches.next_batch() for _ in range(k)]


def test_example_batches_deal_each_example_once_per_epoch():
    b = ExampleBatches(23, 4, ids, seed=3)
    assert b.batches_per_epoch == 5  # 23 // 4: the last 3 of each shuffled epoch are dropped
    first, second = take(b, 5), take(b, 5)
    for epoch in (first, second):
        flat = [i for batch in epoch for i in batch]
        assert all(len(batch) == 4 for batch in epoch) and len(set(flat)) == 20 and set(flat) <= set(range(23))
    assert first != second  # a new order every epoch
    assert take(ExampleBatches(23, 4, ids, seed=3), 10) == first + second  # the same seed, the same batches
    assert take(ExampleBatches(23, 4, ids, seed=4), 5) != first


def test_ranks_split_one_process_batch():
    one = ExampleBatches(23, 4, ids, seed=3)
    ranks = [ExampleBatches(23, 2, ids, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert ranks[0].batches_per_epoch == one.batches_per_epoch == 5
    for _ in range(12):  # across two epoch boundaries
        whole, a, b = one.next_batch(), ranks[0].next_batch(), ranks[1].next_batch()
        assert not set(a) & set(b) and sorted(a + b) == sorted(whole)
        assert (a, b) == (whole[0::2], whole[1::2])
    with pytest.raises(ScratchError, match=re.escape("7 training examples are fewer than one global batch (batch "
                                                     "size 4 x 2 process(es))")):
        ExampleBatches(7, 4, ids, world_size=2)


@pytest.mark.parametrize("taken", [3, 5, 7], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_example_batches_resume_with_the_next_batch(taken):
    b = ExampleBatches(23, 4, ids, seed=3)
    take(b, taken)
    state = json.loads(json.dumps(b.state_dict()))  # plain numbers: weights_only-loadable, JSON-able
    expected = take(b, 6)
    resumed = ExampleBatches(23, 4, ids, seed=3)
    resumed.load_state_dict(state)
    assert resumed.epoch == taken / 5 and take(resumed, 6) == expected


def test_example_batches_refuse_another_data_set_on_resume():
    state = ExampleBatches(23, 4, ids, seed=3).state_dict()
    for other, key in [(ExampleBatches(24, 4, ids, seed=3), "n is 23, now 24"),
                       (ExampleBatches(23, 2, ids, seed=3), "batch_size is 4, now 2"),
                       (ExampleBatches(23, 4, ids, seed=9), "seed is 3, now 9"),
                       (ExampleBatches(23, 4, ids, seed=3, world_size=2), "world_size is 1, now 2")]:
        with pytest.raises(ScratchError, match=f"cannot resume the example order: the saved {key}"):
            other.load_state_dict(state)


def test_epoch_is_fractional():
    b = ExampleBatches(20, 4, ids)  # 5 batches per epoch
    assert b.epoch == 0.0
    take(b, 2)
    assert b.epoch == pytest.approx(0.4)
    take(b, 3)
    assert b.epoch == 1.0  # right after the first epoch's last batch
    take(b, 1)
    assert b.epoch == pytest.approx(1.2)


def test_in_order_gives_every_example_once():
    assert list(in_order(10, 4, ids)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(in_order(0, 4, ids)) == []


# --------------------------------------------------------------------------------------------- padding
def test_pad_rows_right_and_left():
    idx, mask = pad_rows([[5, 6, 7], [8]], pad_id=0)
    assert idx.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert idx.dtype == mask.dtype == torch.long
    idx, mask = pad_rows([[5, 6, 7], [8]], pad_id=9, side="left")
    assert idx.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    idx, mask = pad_rows([[1], []], pad_id=9)
    assert idx.tolist() == [[1], [9]] and mask.tolist() == [[1], [0]]
    assert pad_rows([], pad_id=0)[0].shape == (0, 0)
    with pytest.raises(ScratchError, match="padding side 'middle'"):
        pad_rows([[1]], 0, side="middle")


def test_encode_texts_truncates_on_the_chosen_side():
    tok = byte_tokenizer()
    assert encode_texts(tok, ["abcdef", "ab", ""], 4, "right") == [[97, 98, 99, 100], [97, 98], [256]]
    assert encode_texts(tok, ["abcdef"], 4, "left") == [[99, 100, 101, 102]]  # keep the end


# --------------------------------------------------------------------------------------------- pad token
PAD_SPECIALS = {"<|endoftext|>": 256, "<|pad|>": 257}


def test_pad_token_round_trips_and_falls_back_to_endoftext(tmp_path):
    tok = byte_tokenizer(PAD_SPECIALS, pad_token="<|pad|>", padding_side="left")
    plain = byte_tokenizer(PAD_SPECIALS)
    assert (tok.pad_token, tok.pad_id, tok.padding_side) == ("<|pad|>", 257, "left")
    assert (plain.pad_token, plain.pad_id, plain.padding_side) == (None, 256, "right")  # GPT-2's: <|endoftext|>
    assert tok.fingerprint() == plain.fingerprint() and tok.encode("a<|pad|>", allowed_special="all") == [97, 257]
    tok.save(tmp_path / "pad")
    plain.save(tmp_path / "plain")
    meta = json.loads((tmp_path / "pad" / "tokenizer.json").read_text())
    assert (meta["pad_token"], meta["padding_side"]) == ("<|pad|>", "left")
    assert not {"pad_token", "padding_side"} & set(json.loads((tmp_path / "plain" / "tokenizer.json").read_text()))
    back = Tokenizer.load(tmp_path / "pad")
    assert (back.pad_token, back.pad_id, back.padding_side) == ("<|pad|>", 257, "left")
    assert Tokenizer.load(tmp_path / "plain").pad_id == 256
    bare = Tokenizer({bytes([i]): i for i in range(256)}, "gpt2", {}, name="bare")
    assert bare.pad_id is None
    with pytest.raises(ScratchError, match="has no pad token and no <|endoftext|>"):
        require_pad_id(bare, "bare/")


def test_bad_pad_tokens_are_refused(tmp_path):
    with pytest.raises(ScratchError, match=re.escape("pad token '<|pad|>' is not one of the special tokens "
                                                     "(<|endoftext|>)")):
        byte_tokenizer(pad_token="<|pad|>")
    with pytest.raises(ScratchError, match="padding side 'up': expected 'left' or 'right'"):
        byte_tokenizer(padding_side="up")
    byte_tokenizer(PAD_SPECIALS, pad_token="<|pad|>").save(tmp_path / "t")
    path = tmp_path / "t" / "tokenizer.json"
    good = json.loads(path.read_text())
    for field, value, match in [("pad_token", 5, "field 'pad_token' must be a special token, got 5"),
                                ("padding_side", "middle", "field 'padding_side' must be \"left\" or \"right\""),
                                ("pad_token", "<|nope|>", "pad token '<|nope|>' is not one of the special tokens")]:
        path.write_text(json.dumps({**good, field: value}))
        with pytest.raises(ScratchError, match=re.escape(match)) as e:
            Tokenizer.load(tmp_path / "t")
        assert str(path) in str(e.value)


def test_hugging_face_folders_carry_the_pad_token(tmp_path):
    from scratchllm.weights.hf import export_hf, load_hf_tokenizer

    tok = byte_tokenizer(PAD_SPECIALS, pad_token="<|pad|>", padding_side="left")
    export_hf(GPT(ModelConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=16)), tok, tmp_path / "hf")
    path = tmp_path / "hf" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    assert (config["pad_token"], config["padding_side"]) == ("<|pad|>", "left")
    back = load_hf_tokenizer(tmp_path / "hf")
    assert (back.pad_token, back.pad_id, back.padding_side) == ("<|pad|>", 257, "left")
    # transformers also writes {"content": ...} objects; a pad token the vocabulary lacks is ignored
    for pad, side, expected in [({"content": "<|endoftext|>", "special": True}, "right", ("<|endoftext|>", 256, "right")),
                                ("[PAD]", "left", (None, 256, "left")), (None, None, (None, 256, "right"))]:
        path.write_text(json.dumps({**config, "pad_token": pad, "padding_side": side}))
        back = load_hf_tokenizer(tmp_path / "hf")
        assert (back.pad_token, back.pad_id, back.padding_side) == expected, pad


@pytest.mark.slow
def test_transformers_reads_the_pad_token_we_export(tmp_path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        need("transformers", "pip install transformers (the dev extra)")
    from scratchllm.weights.hf import export_hf

    tok = byte_tokenizer(PAD_SPECIALS, pad_token="<|pad|>", padding_side="left")
    export_hf(GPT(ModelConfig(block_size=16, vocab_size=258, n_layer=1, n_head=2, n_embd=16)), tok, tmp_path / "hf")
    ref = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (ref.pad_token, ref.pad_token_id, ref.padding_side) == ("<|pad|>", 257, "left")


@pytest.mark.slow
def test_smollm2_gguf_pad_token(smollm2_tokenizer, smollm2_metadata, smollm2_gguf):
    """SmolLM2's GGUF says padding_token_id 2, which is <|im_end|>; an id that is a regular token, or none,
    gives no pad token (pad_id then falls back to <|endoftext|>, id 0 there)."""
    from scratchllm.tokenizer.convert import tokenizer_from_gguf_metadata

    tok = smollm2_tokenizer
    assert smollm2_metadata["tokenizer.ggml.padding_token_id"] == 2
    assert (tok.pad_token, tok.pad_id, tok.padding_side) == ("<|im_end|>", 2, "right")
    regular = tokenizer_from_gguf_metadata({**smollm2_metadata, "tokenizer.ggml.padding_token_id": 1000},
                                           str(smollm2_gguf))
    assert regular.pad_token is None and regular.pad_id == tok.special_tokens["<|endoftext|>"] == 0
    absent = {k: v for k, v in smollm2_metadata.items() if k != "tokenizer.ggml.padding_token_id"}
    assert tokenizer_from_gguf_metadata(absent, str(smollm2_gguf)).pad_token is None


@pytest.mark.slow
def test_smollm2_pad_token_equals_transformers(smollm2_tokenizer, smollm2_auto_tokenizer):
    ref = smollm2_auto_tokenizer
    assert (ref.pad_token, ref.pad_token_id, ref.padding_side) == (
        smollm2_tokenizer.pad_token, smollm2_tokenizer.pad_id, smollm2_tokenizer.padding_side)


# --------------------------------------------------------------------------------------------- end to end
def expected_keys(inputs, mode) -> set[str]:
    """The tensor names a run of `mode` saves: the trainable ones (everything, a tied head once, for all)."""
    from scratchllm.weights.checkpoint import load_model

    lora = {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}
    clf = set_trainable(SequenceClassifier(load_model(inputs.base)[0], 2), mode, 1, lora)
    return set(state_to_save(clf)) if mode == "all" else trainable_state_names(clf)


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_learns_and_fills_its_run_folder(trained, inputs, mode):
    run = trained(mode)
    for name in ("config.toml", "metrics.jsonl", "labels.json", "test.jsonl", "best/classifier.json",
                 "best/tokenizer/tokenizer.json", "loss.png", "curves.png", "confusion.png", "report.md",
                 "test_metrics.json", "step_0000020/train_state.pt"):
        assert (run / name).exists(), name
    for png in ("curves.png", "confusion.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert json.loads((run / "labels.json").read_text()) == ["ham", "spam"]  # sorted: ham is class 0
    test_rows = [json.loads(x) for x in (run / "test.jsonl").read_text().splitlines()]
    assert len(test_rows) == 24 and {r["label"] for r in test_rows} == {"ham", "spam"}  # 120 x 0.2
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["n"] == 24 and metrics["labels"] == ["ham", "spam"] and metrics["accuracy"] >= 0.9, metrics
    assert sum(map(sum, metrics["confusion"])) == 24
    val = records(run, "val")
    assert [r["step"] for r in val] == [0, 10, 20] == [r["step"] for r in records(run, "train_eval")]
    assert val[-1]["accuracy"] >= 0.9 and val[-1]["count"] == 12
    epochs = [r["epoch"] for r in records(run, "train")]
    assert epochs[0] == pytest.approx(0.1) and epochs[-1] == 2.0
    report = (run / "report.md").read_text()
    assert "## Test set (best/, 24 examples)" in report and report.index("## Test set") < report.index("## Config")
    assert "accuracy" in report[report.index("## Test set"):]

    spec = json.loads((run / "best" / "classifier.json").read_text())
    assert (spec["trainable"], spec["labels"], spec["base"]) == (mode, ["ham", "spam"], str(inputs.base.resolve()))
    assert (spec["lora"] is not None) == (mode == "lora")
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert ("base_fingerprint" in meta) == (mode != "all")  # a partial run names the base it sits on
    for folder in ("best", "step_0000020"):
        assert set(tensors(run / folder / "model.safetensors")) == expected_keys(inputs, mode), folder


def test_eval_json_is_the_test_metrics(trained, capsys):
    run = trained("last-block")
    capsys.readouterr()
    assert cli("classify", "eval", "--model", run, "--json") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    got, saved = json.loads(lines[0]), json.loads((run / "test_metrics.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "confusion", "n"} <= set(got)
    assert {k: saved[k] for k in got} == got
    assert (run / "confusion-eval.png").is_file()


def test_eval_on_other_data_lists_the_most_confident_mistakes(trained, tmp_path, capsys):
    run = trained("last-block")
    flipped = tmp_path / "flipped.jsonl"  # every label swapped: every right answer becomes a mistake
    rows = [json.loads(x) for x in (run / "test.jsonl").read_text().splitlines()]
    flipped.write_text("".join(json.dumps({"text": r["text"], "label": {"ham": "spam", "spam": "ham"}[r["label"]]})
                               + "\n" for r in rows))
    capsys.readouterr()
    assert cli("classify", "eval", "--model", run, "--data", flipped, "--json", "--png", tmp_path / "a.png") == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(
        1 - json.loads((run / "test_metrics.json").read_text())["accuracy"])
    assert cli("classify", "eval", "--model", run, "--data", flipped, "--errors", "3", "--png", tmp_path / "b.png") == 0
    out = capsys.readouterr().out
    assert f"{flipped}: 24 examples" in out and "the 3 most confident mistakes:" in out
    mistakes = [ln for ln in out.splitlines() if ln.startswith(f"  {flipped}:")]
    assert len(mistakes) == 3
    probs = [float(re.search(r"\((\d\.\d+)\)", ln).group(1)) for ln in mistakes]
    assert probs == sorted(probs, reverse=True) and all(", true " in ln for ln in mistakes)
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


def test_predict_prints_label_probability_and_text(trained, tmp_path, capsys):
    run = trained("last-block")
    preds = Classifier.load(run).predict(TEXTS)
    assert [p.label for p in preds] == ["spam", "ham"]
    assert all(p.probability == max(p.probabilities.values()) > 0.5 and
               sum(p.probabilities.values()) == pytest.approx(1) for p in preds)
    expected = [f"{p.label}\t{p.probability:.4f}\t{t}" for p, t in zip(preds, TEXTS)]
    capsys.readouterr()
    assert cli("classify", "predict", "--model", run, *TEXTS) == 0
    assert capsys.readouterr().out.splitlines() == expected
    texts = tmp_path / "texts.txt"
    texts.write_text(TEXTS[0] + "\n\n" + TEXTS[1] + "\n")  # blank lines are skipped
    assert cli("classify", "predict", "--model", run, "--file", texts, "--batch-size", "1") == 0
    assert capsys.readouterr().out.splitlines() == expected


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_predictions_equal_one_text_at_a_time(trained, side):
    loaded = Classifier.load(trained("last-block"))
    tok = Tokenizer.load(loaded.folder / "tokenizer")
    tok.padding_side = side
    clf = Classifier(loaded.model, tok, loaded.spec, loaded.folder)
    texts = held_out_texts(trained("last-block"))
    assert len({len(t) for t in texts}) > 3  # the batches are padded
    alone = torch.cat([clf.probabilities([t]) for t in texts])
    torch.testing.assert_close(clf.probabilities(texts, batch_size=16), alone, rtol=0, atol=1e-5)


def test_a_classifier_loads_from_its_run_best_or_a_checkpoint(trained):
    run = trained("head")
    assert classifier_folder(run) == run / "best" == classifier_folder(run / "best")
    assert classifier_folder(run / "step_0000020") == run / "step_0000020"
    texts = held_out_texts(run)
    last = Classifier.load(run / "step_0000020")
    assert last.spec.labels == ["ham", "spam"] and last.probabilities(texts).shape == (24, 2)


@pytest.mark.parametrize("mode", ["head", "last-block"])
def test_merge_of_a_partial_run_is_a_standalone_classifier(trained, inputs, tmp_path, mode):
    run = trained(mode)
    assert cli("merge", "--model", run, "--out", tmp_path / "merged") == 0
    merged = tmp_path / "merged"
    spec = json.loads((merged / "classifier.json").read_text())
    assert (spec["trainable"], spec["lora"], spec["labels"]) == ("all", None, ["ham", "spam"])
    assert "base_fingerprint" not in json.loads((merged / "meta.json").read_text())
    assert set(tensors(merged / "model.safetensors")) == expected_keys(inputs, "all")
    texts = held_out_texts(run)
    torch.testing.assert_close(Classifier.load(merged).probabilities(texts), Classifier.load(run).probabilities(texts),
                               rtol=0, atol=1e-5)
    assert cli("merge", "--model", run, "--out", merged) == 2  # an existing --out needs --overwrite
    assert cli("merge", "--model", run, "--out", merged, "--overwrite") == 0


def test_merge_of_a_lora_run_needs_no_base(inputs, tmp_path, capsys):
    base, run, merged = tmp_path / "base", tmp_path / "run", tmp_path / "merged"
    shutil.copytree(inputs.base, base)
    assert cli(*train_args(SimpleNamespace(base=base, data=inputs.data), run, "lora")) == 0
    texts = held_out_texts(run)
    before = Classifier.load(run).probabilities(texts)
    assert cli("merge", "--model", run, "--out", merged) == 0
    weights = tensors(merged / "model.safetensors")
    assert not [k for k in weights if "lora_" in k] and "backbone.transformer.h.0.attn.c_attn.weight" in weights
    base.rename(tmp_path / "elsewhere")
    with pytest.raises(ScratchError, match=re.escape(f"{base.resolve()} does not exist")):
        Classifier.load(run)  # the unmerged run rebuilds its base from the path it was trained on
    torch.testing.assert_close(Classifier.load(merged).probabilities(texts), before, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert cli("classify", "predict", "--model", merged, *TEXTS) == 0
    assert [ln.split("\t")[0] for ln in capsys.readouterr().out.splitlines()] == ["spam", "ham"]
    assert cli("classify", "eval", "--model", merged) == 2  # no test.jsonl beside a merged folder
    assert "pass --data FILE" in capsys.readouterr().err
    assert cli("classify", "eval", "--model", merged, "--data", run / "test.jsonl", "--json") == 0
    assert json.loads(capsys.readouterr().out)["n"] == 24


def test_ctrl_c_then_resume_ends_like_an_uninterrupted_run(trained, inputs, tmp_path, monkeypatch, capfd):
    """Ctrl-C during step 13 (after the first epoch's evaluation picked a best/): the run finishes the step,
    checkpoints and exits 130 without test metrics; `--resume` then ends with the uninterrupted run's
    weights (last checkpoint and best/), metrics lines and test metrics, bit for bit (fp32, CPU)."""
    full, run = trained("last-block"), tmp_path / "run"
    real, calls = objectives.classification_objective, []

    def objective(model, batch):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls.append(1)
            if len(calls) == 13:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the Trainer's handler catches it
        return real(model, batch)

    monkeypatch.setattr(objectives, "classification_objective", objective)
    assert cli(*train_args(inputs, run)) == 130
    assert "signal SIGINT" in capfd.readouterr().out
    assert (run / "latest").read_text().strip() == "step_0000013" and (run / "best").is_dir()
    assert not (run / "test_metrics.json").exists()
    monkeypatch.setattr(objectives, "classification_objective", real)
    assert cli("classify", "train", "--out", run, "--resume") == 0
    assert "resumed from" in capfd.readouterr().out
    for folder in ("step_0000020", "best"):
        a, b = tensors(full / folder / "model.safetensors"), tensors(run / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    keep = ("step", "split", "loss", "accuracy", "grad_norm", "lr", "epoch", "count")
    strip = lambda rs: [tuple(r.get(k) for k in keep) for r in rs]  # noqa: E731
    assert strip(records(full)) == strip(records(run))
    assert json.loads((full / "test_metrics.json").read_text()) == json.loads((run / "test_metrics.json").read_text())
    assert json.loads((run / "best" / "meta.json").read_text())["step"] == json.loads(
        (full / "best" / "meta.json").read_text())["step"]


def test_pooling_truncation_and_block_count_reach_the_saved_classifier(inputs, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(*train_args(inputs, run, "last-block", "--pool", "mean", "--max-length", "8", "--truncate", "left",
                           "--train-blocks", "2")) == 0
    spec = json.loads((run / "best" / "classifier.json").read_text())
    assert {k: spec[k] for k in ("pool", "max_length", "truncate", "train_blocks")} == {
        "pool": "mean", "max_length": 8, "truncate": "left", "train_blocks": 2}
    clf = Classifier.load(run)
    assert clf.model.pool == "mean" and json.loads((run / "test_metrics.json").read_text())["accuracy"] >= 0.9
    # left truncation keeps a text's last 8 bytes: the spam start of this one is never seen
    torch.testing.assert_close(clf.probabilities(["WIN CASH PRIZE FREE see you"]), clf.probabilities([" see you"]),
                               rtol=0, atol=0)
    capsys.readouterr()
    assert cli("classify", "predict", "--model", run, "WIN CASH PRIZE FREE see you") == 0
    assert capsys.readouterr().out.startswith("ham\t")


def test_separate_validation_and_test_files(inputs, tmp_path):
    """--val-data/--test-data instead of --split: the whole --data trains, test.jsonl is the test file."""
    lines = toy_text(60, seed=7).splitlines()
    (tmp_path / "val.tsv").write_text("\n".join(lines[:20]) + "\n")
    (tmp_path / "test.tsv").write_text("\n".join(lines[20:]) + "\n")
    run = tmp_path / "run"
    assert cli(*train_args(inputs, run, "head", "--val-data", tmp_path / "val.tsv", "--test-data",
                           tmp_path / "test.tsv", "--epochs", "1")) == 0
    assert len((run / "test.jsonl").read_text().splitlines()) == 40
    assert json.loads((run / "test_metrics.json").read_text())["n"] == 40
    assert records(run, "val")[-1]["count"] == 20
    assert "120 train / 20 val / 40 test examples" in (run / "report.md").read_text()


def test_a_class_missing_from_the_training_split_is_named(inputs, tmp_path, capsys):
    data = tmp_path / "four.tsv"
    data.write_text("ham\thello there\nham\tsee you\nspam\tWIN CASH\nspam\tFREE PRIZE\n")
    args = train_args(inputs, tmp_path / "run", "head", "--data", data, "--balance", "--split", "0.5", "0.25", "0.25",
                      "--seed", "5")  # seed 5 puts both ham rows in the 2-row training split
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "the training split (2 rows) holds no 'spam' example" in err, err


def test_a_refused_run_leaves_its_out_folder_usable(inputs, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*train_args(inputs, out, "head", "--batch-size", "100")) == 2
    assert "84 training examples are fewer than one global batch" in capsys.readouterr().err
    assert cli(*train_args(inputs, out, "head", "--epochs", "1")) == 0, capsys.readouterr().err


def test_evaluation_lines_count_the_tokens_seen_in_training(trained):
    """metrics.jsonl's val/train_eval lines carry the tokens seen so far (the loss plot's x-axis), not the
    token count of the evaluated batches."""
    run = trained("head")
    seen = {r["step"]: r["tokens"] for r in records(run, "train")}
    evals = records(run, "val") + records(run, "train_eval")
    assert evals and all(r["tokens"] == seen.get(r["step"], 0) for r in evals)
