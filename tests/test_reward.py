"""Reward models (RLHF's first half): objectives.reward_objective / reward_std against hand-computed
numbers, reward.fold_normalization, and `scratchllm reward train|score` end to end on a tiny random GPT.

References nobody in src/ wrote: Bradley-Terry losses, gradients, accuracies and margins worked out by
hand; the split recomputed here with random.Random(seed).shuffle on the record indices (the book's
85/5/10 recipe, data/labelled.split's documented rule); the normalisation checked against the scores of
the unnormalised checkpoint of the best step, and the test metrics against scores computed here.

Hermetic: tiny_chat_tokenizer (ChatML specials), a 2-block x 32-wide GPT saved with a ChatML chat.json,
40 toy preference records whose chosen answers are made of "yes"/"good" and rejected ones of "no"/"bad"
(4 with chosen == rejected), fp32 on one CPU thread. Each run is trained once per module (`trained`).
"""

import contextlib
import io
import json
import math
import os
import random
import shutil
import signal

import pytest
import torch
from safetensors import safe_open
from sft_helpers import FAST, WORDS, base_model, cli, records

import scratchllm.train.objectives as objectives
from scratchllm.common import ScratchError
from scratchllm.data.instructions import Conversation
from scratchllm.data.preferences import Pair, read_pairs
from scratchllm.tokenizer.chat import FORMATS
from scratchllm.train.objectives import reward_objective, reward_std
from scratchllm.train.reward import RewardModel, fold_normalization, pair_record, write_pairs
from scratchllm.weights.checkpoint import open_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CHOSEN = ["yes good", "good yes", "yes yes good"]
REJECTED = ["no bad", "bad no", "no no bad"]
IDENTICAL = (5, 17, 29, 36)  # records whose chosen answer equals the rejected one
SPLIT, SEED = (0.6, 0.2, 0.2), 7  # FAST passes --seed 7
LN2 = math.log(2)


def toy_pairs(n: int = 40) -> list[dict]:
    """Book records ({instruction, input}), {prompt} and {messages} records in turn."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        chosen, rejected = CHOSEN[i % 3], REJECTED[(i // 3) % 3]
        if i in IDENTICAL:
            rejected = chosen
        if i % 3 == 0:
            rec = {"instruction": f"Is the {w} nice?", "input": "" if i % 2 else w}
        elif i % 3 == 1:
            rec = {"prompt": f"Tell me about the {w}."}
        else:
            rec = {"messages": [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": f"And the {w}?"}]}
        out.append({**rec, "chosen": chosen, "rejected": rejected})
    return out


def expected_split(recs: list[dict]) -> list[list[dict]]:
    """(train, val, test) records as documented: shuffle with random.Random(seed), cut int(n f0), int(n f1),
    rest; then the pairs with chosen == rejected dropped from each part."""
    order = list(range(len(recs)))
    random.Random(SEED).shuffle(order)
    n_train, n_val = int(len(recs) * SPLIT[0]), int(len(recs) * SPLIT[1])
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return [[recs[i] for i in part if recs[i]["chosen"] != recs[i]["rejected"]] for part in parts]


def expected_identical(inputs) -> list[list[str]]:
    """FILE:LINE of the chosen == rejected records of each split, in split order."""
    order = list(range(len(inputs.recs)))
    random.Random(SEED).shuffle(order)
    n_train, n_val = int(len(order) * SPLIT[0]), int(len(order) * SPLIT[1])
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    return [[f"{inputs.data}:{i + 1}" for i in part if i in IDENTICAL] for part in parts]


def key(pair: Pair) -> tuple:
    return tuple(m["content"] for m in pair.prompt), pair.chosen, pair.rejected


def record_key(rec: dict) -> tuple:
    if "messages" in rec:
        prompt = tuple(m["content"] for m in rec["messages"])
    else:
        prompt = (rec.get("instruction", rec.get("prompt")),)
    return prompt, rec["chosen"], rec["rejected"]


def as_pair(rec: dict, where: str = "x") -> Pair:
    from scratchllm.data.preferences import prompt_messages

    return Pair(prompt_messages(rec, where), rec["chosen"], rec["rejected"], where)


def answers(pairs) -> list[Conversation]:
    """Every chosen and every rejected answer as a conversation."""
    return [p.conversation(a) for p in pairs for a in (p.chosen, p.rejected)]


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------- the objective
class FixedScores(torch.nn.Module):
    """A "reward model" that returns given scores (2B, 1) and records what it was called with."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores, dtype=torch.float32).view(-1, 1).requires_grad_(True)
        self.calls = []

    def forward(self, idx, attention_mask=None):
        self.calls.append((idx, attention_mask))
        return self.scores


def fake_batch(B: int) -> dict:
    idx = torch.arange(2 * B * 3).view(2 * B, 3)
    return {"idx": idx, "attention_mask": torch.ones_like(idx), "mask": torch.ones_like(idx),
            "tokens": torch.tensor(6 * B)}


def num(x) -> float:
    return float(torch.as_tensor(x).detach())


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def test_reward_objective_by_hand():
    """chosen (2, 0, -1), rejected (1, 0, 1): losses -log sigmoid(1, 0, -2), 1 of 3 pairs right."""
    model = FixedScores([2.0, 0.0, -1.0, 1.0, 0.0, 1.0])
    batch = fake_batch(3)
    loss, m = reward_objective(model, batch)
    (idx, am), = model.calls
    assert idx is batch["idx"] and am is batch["attention_mask"]
    assert loss.item() == pytest.approx(softplus(-1) + LN2 + softplus(2), rel=1e-6)
    assert m["count"] == 3 and int(m["tokens"]) == 18
    assert int(m["accuracy"]) == 1  # 2 > 1; a tie (0, 0) is not right; -1 < 1
    assert num(m["margin"]) == pytest.approx(1 + 0 - 2)
    assert num(m["rewards/chosen"]) == pytest.approx(1.0) and num(m["rewards/rejected"]) == pytest.approx(2.0)
    (s, n), (sq, n2) = m["reward_mean"], m["reward_sq"]
    assert num(s) == pytest.approx(3.0) and num(sq) == pytest.approx(4 + 0 + 1 + 1 + 0 + 1) and n == n2 == 6
    loss.backward()  # d/d r_c of -log sigmoid(r_c - r_r) = -sigmoid(r_r - r_c); the rejected get the opposite
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [-sig(-1), -0.5, -sig(2), sig(-1), 0.5, sig(2)]
    assert model.scores.grad.view(-1).tolist() == pytest.approx(expected, rel=1e-6)


def test_reward_objective_all_zero_scores_give_ln2_per_pair():
    loss, m = reward_objective(FixedScores([0.0] * 8), fake_batch(4))
    assert loss.item() == pytest.approx(4 * LN2, rel=1e-7) and int(m["accuracy"]) == 0 and num(m["margin"]) == 0


def test_reward_objective_center_coef_adds_the_squared_sum():
    """center_coef * (r_c + r_r)^2 per pair: sums 3, 0, 0 -> + 0.5 * 9."""
    scores = [2.0, 0.0, -1.0, 1.0, 0.0, 1.0]
    plain, _ = reward_objective(FixedScores(scores), fake_batch(3))
    centred, m = reward_objective(FixedScores(scores), fake_batch(3), center_coef=0.5)
    assert centred.item() == pytest.approx(plain.item() + 4.5, rel=1e-6)
    assert int(m["accuracy"]) == 1 and num(m["margin"]) == pytest.approx(-1.0)  # metrics are of the scores


def test_reward_objective_accepts_scores_of_shape_2b():
    """A (2B,) or (2B, 1) output reads the same: B is half the rows, chosen first."""
    class Flat(FixedScores):
        def forward(self, idx, attention_mask=None):
            return self.scores.view(-1)

    loss, m = reward_objective(Flat([3.0, -3.0]), fake_batch(1))
    assert loss.item() == pytest.approx(softplus(-6), rel=1e-5) and m["count"] == 1 and int(m["accuracy"]) == 1


def test_reward_std_is_the_population_std_from_mean_and_mean_square():
    scores = torch.tensor([2.0, 0.0, -1.0, 1.0, 0.0, 1.0])
    got = reward_std({"reward_mean": float(scores.mean()), "reward_sq": float((scores ** 2).mean())})
    assert got == {"reward_std": pytest.approx(float(scores.std(unbiased=False)), rel=1e-6)}
    assert got["reward_std"] == pytest.approx(math.sqrt(7 / 6 - 0.25))
    assert reward_std({"reward_mean": 0.5, "reward_sq": 0.25 - 1e-12}) == {"reward_std": 0.0}  # rounding: not NaN


# --------------------------------------------------------------------------------------------- fold_normalization
def test_fold_normalization_by_hand():
    head = torch.nn.Linear(3, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 2.0, 3.0]]))
        head.bias.fill_(0.5)
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -1.0], [2.0, 2.0, 2.0]])
    before = head(x).detach()
    fold_normalization(head, mean=1.5, std=2.0)
    assert head.weight.tolist() == [[0.5, 1.0, 1.5]] and head.bias.tolist() == [-0.5]  # w / std, (b - mean) / std
    torch.testing.assert_close(head(x).detach(), (before - 1.5) / 2.0)
    assert head.weight.requires_grad and head.bias.requires_grad


def test_fold_normalization_standardises_the_scores_it_was_computed_on():
    torch.manual_seed(0)
    head, x = torch.nn.Linear(8, 1), torch.randn(50, 8)
    s = head(x).detach().view(-1)
    fold_normalization(head, float(s.mean()), float(s.std(unbiased=False)))
    t = head(x).detach().view(-1)
    assert abs(float(t.mean())) < 1e-5 and float(t.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------------------------- pair records
def test_pair_records_round_trip_through_read_pairs(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", toy_pairs(9))
    pairs = read_pairs(str(data)).pairs
    assert pair_record(pairs[0]) == {"instruction": "Is the cat nice?", "input": "cat", "chosen": "yes good",
                                     "rejected": "no bad"}
    assert pair_record(pairs[1]) == {"messages": [{"role": "user", "content": "Tell me about the dog."}],
                                     "chosen": "good yes", "rejected": "no bad"}
    write_pairs(tmp_path / "out.jsonl", pairs)
    back = read_pairs(str(tmp_path / "out.jsonl")).pairs
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [(p.prompt, p.chosen, p.rejected) for p in pairs]


# --------------------------------------------------------------------------------------------- the stage
class Inputs:
    def __init__(self, folder, tokenizer):
        self.folder = folder
        self.base = base_model(tokenizer, folder / "base", chat=FORMATS["chatml"])
        self.recs = toy_pairs()
        self.data = write_jsonl(folder / "pairs.jsonl", self.recs)
        self.train, self.val, self.test = expected_split(self.recs)


@pytest.fixture(scope="module")
def inputs(tiny_chat_tokenizer, tmp_path_factory):
    return Inputs(tmp_path_factory.mktemp("reward_inputs"), tiny_chat_tokenizer)


def train_args(inputs, out, *extra, steps: int = 20, lr: str = "3e-3") -> list:
    return ["reward", "train", "--model", inputs.base, "--data", inputs.data, "--out", out, "--max-steps", steps,
            "--batch-size", 4, "--lr", lr, "--eval-every", 5, "--checkpoint-every", 5, "--keep-last", 10,
            "--split", *SPLIT, *FAST, *extra]


RUNS = {  # name -> extra arguments
    "all": [],
    "head": ["--train", "head", "--lr", "1e-1"],  # a random backbone's head needs a larger lr
    "lora": ["--train", "lora", "--lora-rank", "2"],
}


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """trained(name) -> (run folder, stdout of the run); each run once per module."""
    done = {}

    def get(name):
        if name not in done:
            run = tmp_path_factory.mktemp(f"reward_{name}") / "run"
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                rc = cli(*train_args(inputs, run), *RUNS[name])
            assert rc == 0, out.getvalue()
            done[name] = run, out.getvalue()
        return done[name]

    return get


def best_step(run) -> int:
    """The step of best/ by the Trainer's rule: the first evaluation with the highest val accuracy."""
    val = records(run, "val")
    top = max(r["accuracy"] for r in val)
    return next(r["step"] for r in val if r["accuracy"] == top)


def test_step_zero_loss_is_ln2_and_validation_accuracy_rises(trained, inputs):
    run, _ = trained("all")
    val, train_eval = records(run, "val"), records(run, "train_eval")
    assert [r["step"] for r in val] == [0, 5, 10, 15, 20] and [r["step"] for r in train_eval] == [0, 5, 10, 15, 20]
    for first in (val[0], train_eval[0]):  # the zero-initialised head scores every answer 0
        assert first["loss"] == pytest.approx(LN2, abs=1e-6)
        assert first["accuracy"] == 0 and first["margin"] == 0 and first["reward_std"] == 0
    assert val[0]["count"] == len(inputs.val) and train_eval[0]["count"] == len(inputs.val)  # sample of train
    assert val[-1]["accuracy"] == 1 and val[-1]["loss"] < 0.6 * LN2 and val[-1]["margin"] > 0.5
    assert val[-1]["reward_std"] == pytest.approx(math.sqrt(val[-1]["reward_sq"] - val[-1]["reward_mean"] ** 2))
    train = records(run, "train")
    assert len(train) == 20 and train[0]["loss"] == pytest.approx(LN2, abs=1e-6) and train[-1]["loss"] < 0.6 * LN2


def test_the_split_is_the_documented_one_and_identical_pairs_are_named(trained, inputs):
    run, out = trained("all")
    test = read_pairs(str(run / "test.jsonl")).pairs
    assert [key(p) for p in test] == [record_key(r) for r in inputs.test]
    skipped = len(IDENTICAL)
    for part in expected_identical(inputs):  # one line per split that had any, naming their lines
        if part:
            assert (f"skipped {len(part)} pairs whose chosen answer equals the rejected one: "
                    f"{', '.join(part[:5])}") in out, out
    report = (run / "report.md").read_text()
    assert (f"{inputs.data}: {len(inputs.train)} train / {len(inputs.val)} val / {len(inputs.test)} test pairs "
            f"({skipped} skipped: chosen == rejected)") in report, report
    assert f"train {len(inputs.train)} pairs" in out


def test_best_is_normalised_on_the_training_answers(trained, inputs):
    run, _ = trained("all")
    spec = json.loads((run / "best" / "classifier.json").read_text())
    assert spec["labels"] == ["reward"] and spec["pool"] == "last"
    extra = spec["extra"]
    assert extra["kind"] == "reward" and extra["template"] == "chatml"
    stats = extra["normalization"]
    assert set(stats) == {"mean", "std", "pairs"} and stats["pairs"] == len(inputs.train)
    rm = RewardModel.load(run)
    assert rm.folder == run / "best" and rm.stats == stats and rm.fmt.name == "chatml"
    train_pairs = [as_pair(r) for r in inputs.train]
    s = rm.score(answers(train_pairs))
    assert s.shape == (2 * len(train_pairs),)
    assert abs(float(s.mean())) < 1e-3 and float(s.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    # the statistics are those of the unnormalised model of the best step, on the training answers
    raw = RewardModel.load(run / f"step_{best_step(run):07d}")
    assert raw.stats is None
    r = raw.score(answers(train_pairs))
    assert stats["mean"] == pytest.approx(float(r.mean()), abs=1e-4)
    assert stats["std"] == pytest.approx(float(r.std(unbiased=False)), rel=1e-3)
    torch.testing.assert_close(s, (r - stats["mean"]) / stats["std"], rtol=0, atol=1e-4)


def test_best_is_an_earlier_step_here(trained):
    """The toy pairs are learned early: best/ (first top val accuracy) is not the last step, so the next
    test checks something."""
    run, _ = trained("all")
    step = best_step(run)
    assert step < 20
    assert f"best/ (accuracy {records(run, 'val')[step // 5]['accuracy']:.4f} at step {step})" in \
        (run / "report.md").read_text()


def test_best_meta_names_the_step_its_weights_are_from(trained):
    run, _ = trained("all")
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["step"] == best_step(run)


def test_test_metrics_and_report_section(trained, inputs):
    run, _ = trained("all")
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert set(metrics) == {"n", "accuracy", "margin", "reward_mean", "reward_std"}
    assert metrics["n"] == len(inputs.test)
    rm = RewardModel.load(run)
    test = [as_pair(r) for r in inputs.test]
    c = rm.score([p.conversation(p.chosen) for p in test])
    r = rm.score([p.conversation(p.rejected) for p in test])
    assert metrics["accuracy"] == pytest.approx(float((c > r).float().mean()))
    assert metrics["margin"] == pytest.approx(float((c - r).mean()), abs=1e-5)
    both = torch.cat([c, r])
    assert metrics["reward_mean"] == pytest.approx(float(both.mean()), abs=1e-5)
    assert metrics["reward_std"] == pytest.approx(float(both.std(unbiased=False)), abs=1e-5)
    assert metrics["accuracy"] >= 0.8
    report = (run / "report.md").read_text()
    section = f"## Test pairs (best/, {len(inputs.test)} pairs)"
    assert section in report and report.index(section) < report.index("## Config")
    assert f"pairwise accuracy {metrics['accuracy']:.4f}, mean margin {metrics['margin']:.4f}" in report


def test_scores_do_not_depend_on_the_batch(trained, inputs):
    """Right padding and the last-token pool: a text scores the same alone and in a padded batch."""
    rm = RewardModel.load(trained("all")[0])
    convs = answers([as_pair(r) for r in inputs.recs[:6]])
    assert len({len(rm.encode(c)) for c in convs}) > 1  # rows of different lengths: padding happens
    together = rm.score(convs, batch_size=16)
    alone = torch.cat([rm.score([c], batch_size=1) for c in convs])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------- reward score
def test_reward_score_defaults_to_the_runs_test_pairs(trained, capsys):
    run, _ = trained("all")
    metrics = json.loads((run / "test_metrics.json").read_text())
    capsys.readouterr()
    for model in (run, run / "best"):
        assert cli("reward", "score", "--model", model, "--json") == 0
        got = json.loads(capsys.readouterr().out)
        assert got.keys() == metrics.keys() and got == pytest.approx(metrics, abs=1e-6)
    assert cli("reward", "score", "--model", run) == 0
    out = capsys.readouterr().out
    assert f"{run / 'test.jsonl'}: {metrics['n']} pairs" in out and f"pairwise accuracy {metrics['accuracy']:.4f}" in out


def test_reward_score_out_writes_one_line_per_pair(trained, inputs, tmp_path, capsys):
    run, _ = trained("all")
    out = tmp_path / "scores.jsonl"
    assert cli("reward", "score", "--model", run, "--out", out, "--json") == 0
    capsys.readouterr()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == len(inputs.test)
    assert [r["where"] for r in rows] == [f"{run / 'test.jsonl'}:{i}" for i in range(1, len(rows) + 1)]
    rm = RewardModel.load(run)
    test = [as_pair(r) for r in inputs.test]
    torch.testing.assert_close(torch.tensor([r["chosen"] for r in rows]),
                               rm.score([p.conversation(p.chosen) for p in test]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor([r["rejected"] for r in rows]),
                               rm.score([p.conversation(p.rejected) for p in test]), rtol=0, atol=1e-5)


def test_reward_score_of_prompt_and_response_records(trained, tmp_path, capsys):
    """One score per record (prompt/messages/instruction + response or output), each that of the same
    prompt + answer scored as a pair's answer."""
    run, _ = trained("all")
    recs = [{"prompt": "Tell me about the dog.", "response": "yes good"},
            {"messages": [{"role": "system", "content": "Answer briefly."},
                          {"role": "user", "content": "And the sun?"}], "response": "no bad"},
            {"instruction": "Is the cat nice?", "input": "cat", "output": "good yes"}]
    data = write_jsonl(tmp_path / "responses.jsonl", recs)
    rm = RewardModel.load(run)
    expected = rm.score([as_pair({**r, "chosen": r.get("response", r.get("output")), "rejected": ""}).conversation(
        r.get("response", r.get("output"))) for r in recs]).tolist()
    capsys.readouterr()
    assert cli("reward", "score", "--model", run, "--data", data) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(x) for x in lines[:-1]]
    assert [r["where"] for r in rows] == [f"{data}:{i}" for i in (1, 2, 3)]
    assert [r["score"] for r in rows] == pytest.approx(expected, abs=1e-5)
    assert lines[-1].startswith(f"{data}: 3 responses, mean score")
    assert expected[0] > expected[1] and expected[2] > expected[1]  # the learned preference
    out = tmp_path / "scored.jsonl"
    assert cli("reward", "score", "--model", run, "--data", data, "--out", out, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    mean = sum(expected) / 3
    assert summary == pytest.approx({"n": 3, "reward_mean": mean,
                                     "reward_std": math.sqrt(sum((s - mean) ** 2 for s in expected) / 3)}, abs=1e-5)
    assert [json.loads(x)["score"] for x in out.read_text().splitlines()] == pytest.approx(expected, abs=1e-5)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "no answer"}])
    assert cli("reward", "score", "--model", run, "--data", bad) == 2
    assert f"{bad}:2: no 'response' (or 'output') string to score" in capsys.readouterr().err


def test_reward_score_without_data_beside_a_copied_model_asks_for_it(trained, tmp_path, capsys):
    run, _ = trained("all")
    shutil.copytree(run / "best", tmp_path / "rm")
    assert cli("reward", "score", "--model", tmp_path / "rm") == 2
    assert "has no test.jsonl beside it: pass --data FILE" in capsys.readouterr().err
    assert cli("reward", "score", "--model", tmp_path / "rm", "--data", run / "test.jsonl", "--json") == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(json.loads((run / "test_metrics.json").read_text()),
                                                                abs=1e-6)


# --------------------------------------------------------------------------------------------- refusals
def test_a_reward_model_is_not_a_classifier_nor_a_language_model(trained, capsys):
    run, _ = trained("all")
    capsys.readouterr()
    assert cli("classify", "eval", "--model", run) == 2
    err = capsys.readouterr().err
    assert "is a reward model, not a text classifier" in err and "scratchllm reward score" in err, err
    assert cli("classify", "predict", "--model", run, "hello") == 2
    assert "is a reward model, not a text classifier" in capsys.readouterr().err
    with pytest.raises(ScratchError, match="is a reward model, not a language model: use it with `scratchllm reward"):
        open_model(run / "best")
    assert cli("generate", "--model", run / "best", "--prompt", "hi", "--device", "cpu") == 2
    assert "is a reward model, not a language model" in capsys.readouterr().err
    assert cli("generate", "--model", run / "best", "--chat", "hi", "--device", "cpu") == 2
    assert "is a reward model, not a language model" in capsys.readouterr().err


def test_reward_score_refuses_a_text_classifier(trained, tmp_path, capsys):
    run, _ = trained("all")
    folder = tmp_path / "clf"
    shutil.copytree(run / "best", folder)
    spec = json.loads((folder / "classifier.json").read_text())
    del spec["extra"]["kind"]  # what `classify train` writes: no kind
    (folder / "classifier.json").write_text(json.dumps(spec))
    with pytest.raises(ScratchError, match="is a text classifier, not a reward model"):
        RewardModel.load(folder)
    assert cli("reward", "score", "--model", folder, "--data", run / "test.jsonl") == 2
    assert "is a text classifier, not a reward model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- partial runs
@pytest.mark.parametrize("mode", ["head", "lora"])
def test_partial_runs_save_what_trained_and_reload(trained, inputs, mode):
    run, out = trained(mode)
    keys = set(tensors(run / "best" / "model.safetensors"))
    if mode == "head":
        assert keys == {"head.weight", "head.bias"}
    else:
        assert {"head.weight", "head.bias"} < keys and all(k.startswith("head.") or "lora_" in k for k in keys)
        assert any(".lora_A" in k for k in keys) and any(".lora_B" in k for k in keys)
    assert json.loads((run / "best" / "meta.json").read_text()).get("base_fingerprint")
    spec = json.loads((run / "best" / "classifier.json").read_text())
    assert spec["trainable"] == mode and spec["extra"]["kind"] == "reward"
    val = records(run, "val")
    assert val[0]["loss"] == pytest.approx(LN2, abs=1e-6) and val[-1]["accuracy"] > val[0]["accuracy"]
    rm = RewardModel.load(run)  # the base rebuilt from its path, this folder loaded on top
    assert rm.stats == spec["extra"]["normalization"] and rm.stats["pairs"] == len(inputs.train)
    s = rm.score(answers([as_pair(r) for r in inputs.train]))
    assert abs(float(s.mean())) < 1e-3 and float(s.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    metrics = json.loads((run / "test_metrics.json").read_text())
    test = [as_pair(r) for r in inputs.test]
    c = rm.score([p.conversation(p.chosen) for p in test])
    r = rm.score([p.conversation(p.rejected) for p in test])
    assert metrics["margin"] == pytest.approx(float((c - r).mean()), abs=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((c > r).float().mean()))


def test_head_only_leaves_the_backbone_as_it_was(trained, inputs):
    run, _ = trained("head")
    base = tensors(inputs.base / "model.safetensors")
    rm = RewardModel.load(run)
    state = rm.model.backbone.state_dict()
    same = [k for k in base if k in state]
    assert same and all(torch.equal(base[k], state[k]) for k in same)


# --------------------------------------------------------------------------------------------- resume
def test_ctrl_c_then_resume_ends_like_an_uninterrupted_run(trained, inputs, tmp_path, monkeypatch, capfd):
    """Ctrl-C during step 13 of 20: the run checkpoints step 13 and exits 130 without test metrics;
    `--resume` then ends with the uninterrupted run's weights (step 20 and the normalised best/), metrics
    lines, normalisation statistics and test metrics (fp32, CPU)."""
    full, _ = trained("all")
    run = tmp_path / "run"
    real, calls = objectives.reward_objective, []

    def objective(model, batch, **kw):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls.append(1)
            if len(calls) == 13:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the Trainer's handler catches it
        return real(model, batch, **kw)

    monkeypatch.setattr(objectives, "reward_objective", objective)
    assert cli(*train_args(inputs, run)) == 130
    assert "signal SIGINT" in capfd.readouterr().out
    assert (run / "latest").read_text().strip() == "step_0000013" and (run / "best").is_dir()
    assert not (run / "test_metrics.json").exists()
    monkeypatch.setattr(objectives, "reward_objective", real)
    assert cli("reward", "train", "--out", run, "--resume") == 0
    assert "resumed from" in capfd.readouterr().out
    for folder in ("step_0000020", "best"):
        a, b = tensors(full / folder / "model.safetensors"), tensors(run / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    keep = ("step", "split", "loss", "accuracy", "margin", "grad_norm", "lr", "epoch", "count")
    strip = lambda rs: [tuple(r.get(k) for k in keep) for r in rs]  # noqa: E731
    assert strip(records(full)) == strip(records(run))
    spec = lambda r: json.loads((r / "best" / "classifier.json").read_text())["extra"]  # noqa: E731
    assert spec(full)["normalization"] == spec(run)["normalization"]
    assert json.loads((full / "test_metrics.json").read_text()) == json.loads((run / "test_metrics.json").read_text())
    assert (full / "test.jsonl").read_text() == (run / "test.jsonl").read_text()


def test_a_finished_run_resumed_keeps_its_normalisation_statistics(inputs, tmp_path):
    """A finished run resumed again: the statistics recorded in classifier.json stay those of the raw
    scores (scratchllm only re-does the finishing steps)."""
    run = tmp_path / "run"
    assert cli(*train_args(inputs, run, steps=5)) == 0
    before = json.loads((run / "best" / "classifier.json").read_text())["extra"]["normalization"]
    assert before["std"] < 0.9  # five steps from a zero head: the raw scores are not yet of std 1
    assert cli("reward", "train", "--out", run, "--resume") == 0
    after = json.loads((run / "best" / "classifier.json").read_text())["extra"]["normalization"]
    assert after == pytest.approx(before, rel=1e-6), (before, after)


def test_separate_validation_and_test_files(inputs, tmp_path, capsys):
    """--val-data/--test-data instead of --split: all of --data trains (its identical pairs dropped), the
    test file becomes RUN/test.jsonl, and the normalisation counts every training pair."""
    val = write_jsonl(tmp_path / "val.jsonl", inputs.recs[:8])  # holds record 5: chosen == rejected
    test = write_jsonl(tmp_path / "test.jsonl", inputs.recs[8:20])  # holds record 17
    run = tmp_path / "run"
    assert cli(*train_args(inputs, run, "--val-data", val, "--test-data", test, steps=4)) == 0
    out = capsys.readouterr().out
    n_train = len(inputs.recs) - len(IDENTICAL)
    assert [key(p) for p in read_pairs(str(run / "test.jsonl")).pairs] == [
        record_key(r) for r in inputs.recs[8:20] if r["chosen"] != r["rejected"]]
    assert records(run, "val")[0]["count"] == 7
    assert json.loads((run / "best" / "classifier.json").read_text())["extra"]["normalization"]["pairs"] == n_train
    assert json.loads((run / "test_metrics.json").read_text())["n"] == 11
    assert f"{inputs.data}: {n_train} train / 7 val / 11 test pairs (6 skipped: chosen == rejected)" in \
        (run / "report.md").read_text()
    assert f"skipped 1 pairs whose chosen answer equals the rejected one: {val}:6" in out  # FILE:LINE


def test_a_validation_split_of_identical_pairs_is_explained(inputs, tmp_path, capsys):
    order = list(range(10))
    random.Random(SEED).shuffle(order)
    val = set(order[6:8])  # the validation records of 10 split 0.6 / 0.2 / 0.2
    recs = [{"prompt": f"q{i}", "chosen": "yes good", "rejected": "yes good" if i in val else "no bad"}
            for i in range(10)]
    data = write_jsonl(tmp_path / "pairs.jsonl", recs)
    args = ["reward", "train", "--model", inputs.base, "--data", data, "--out", tmp_path / "run", "--max-steps", 1,
            "--batch-size", 2, "--split", *SPLIT, *FAST]
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "chosen == rejected" in err or "identical" in err, err
    assert "raise it" not in err, err
