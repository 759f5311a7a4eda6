"""`scratchllm dpo` (train/dpo.py), objectives.dpo_objective, train/pairs.EncodedPairs and configs.DPOConfig.

References nobody in src/ wrote: answer log-probs summed (or averaged) by hand from log_softmax of the
model's full logits, one answer at a time; the DPO / IPO / conservative-DPO formulas written out here;
the 85/5/10 split re-derived with random.Random(seed); the logged validation metrics of a checkpoint
recomputed from the checkpoint (loaded with open_model) and the starting model.

Hermetic: tiny_chat_tokenizer (ChatML specials), a 2-block x 32-wide random GPT saved as a model folder
(tests/sft_helpers.py), 40 toy preference records (chosen "yes good", rejected "no bad"; two of them with
chosen == rejected, one in the train split and one in the test split), fp32 on one CPU thread. The
losses themselves (dpo_loss, ipo_loss, sequence_logprobs) are tested in tests/test_losses.py.
"""

import copy
import json
import math
import random
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sft_helpers import FAST, TINY, WORDS, base_model, cli, records

from scratchllm.common import ScratchError
from scratchllm.configs import DPOConfig
from scratchllm.data.preferences import Pair
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.lora import apply_lora
from scratchllm.tokenizer.chat import FORMATS
from scratchllm.train.objectives import dpo_objective
from scratchllm.train.pairs import EncodedPairs
from scratchllm.train.sft import encode
from scratchllm.weights.checkpoint import open_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LN2 = math.log(2)
SEED = 7  # FAST's --seed
N = 40  # records: 34 train / 2 val / 4 test
CHATML = FORMATS["chatml"]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")
KINDS = {"full": "a frozen copy of the starting model", "lora": "the policy with its LoRA adapters off",
         "pre": "precomputed", "pre-lora": "precomputed"}


def order(n: int = N, seed: int = SEED) -> list[int]:
    """The record indices in the order the seeded split shuffles them (random.Random(seed).shuffle)."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    return idx


IDENTICAL = (order()[0], order()[36])  # chosen == rejected: one in the train split, one in the test split


def pref_records(n: int = N, identical=IDENTICAL) -> list[dict]:
    """The book's record shape (instruction, input, output, chosen, rejected); every third has an input."""
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        out.append({"instruction": f"Question {i}: what about the {w}?", "input": w if i % 3 == 2 else "",
                    "output": "yes good", "chosen": "yes good",
                    "rejected": "yes good" if i in identical else "no bad"})
    return out


def hand_split(recs: list[dict], fractions=(0.85, 0.05, 0.10), seed: int = SEED) -> list[list[dict]]:
    """train, val, test records of the seeded split, pairs with chosen == rejected dropped after splitting."""
    idx, n = order(len(recs), seed), len(recs)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return [[recs[i] for i in part if recs[i]["chosen"] != recs[i]["rejected"]]
            for part in (idx[:a], idx[a:b], idx[b:])]


def as_pair(rec: dict) -> Pair:
    return Pair(({"role": "user", "content": rec["instruction"], "input": rec.get("input", "")},),
                rec["chosen"], rec["rejected"], "test")


def token_logps(model, idx: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, mean) of log p(idx[t] | idx[<t]) over the t >= 1 with mask[t] = 1, from the full logits."""
    logits = model(idx).float()  # (B, T, V)
    lp = F.log_softmax(logits[:, :-1], -1).gather(-1, idx[:, 1:, None]).squeeze(-1)  # (B, T-1)
    m = mask[:, 1:].float()
    total = (lp * m).sum(-1)
    return total, total / m.sum(-1)


@torch.no_grad()
def answer_logps(model, recs: list[dict], tokenizer, mean: bool = False) -> torch.Tensor:
    """(N, 2) log-probs (chosen, rejected) of each record's answers, one unpadded row at a time."""
    model.eval()
    out = []
    for rec in recs:
        p = as_pair(rec)
        row = []
        for answer in (p.chosen, p.rejected):
            ids, mask = encode(p.conversation(answer), CHATML, tokenizer)
            s, m = token_logps(model, torch.tensor([ids]), torch.tensor([mask]))
            row.append(float((m if mean else s)[0]))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def hand_metrics(pi: torch.Tensor, ref: torch.Tensor, beta: float, loss: str = "sigmoid", eps: float = 0.0) -> dict:
    """The DPO metrics (means over pairs) of policy and reference log-probs, both (N, 2)."""
    d_c, d_r = pi[:, 0] - ref[:, 0], pi[:, 1] - ref[:, 1]
    gap = d_c - d_r
    if loss == "ipo":
        losses = (gap - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - eps) * F.logsigmoid(beta * gap) - eps * F.logsigmoid(-beta * gap)
    return {"loss": float(losses.mean()), "rewards/chosen": float((beta * d_c).mean()),
            "rewards/rejected": float((beta * d_r).mean()), "rewards/margins": float((beta * gap).mean()),
            "rewards/accuracies": float((gap > 0).double().mean()), "logps/chosen": float(pi[:, 0].mean()),
            "logps/rejected": float(pi[:, 1].mean()), "count": len(pi)}


def assert_metrics(logged: dict, want: dict, tol: float = 2e-5, logp_tol: float = 2e-4) -> None:
    for k, v in want.items():
        assert logged[k] == pytest.approx(v, abs=logp_tol if k.startswith("logps/") else tol), k


def setting(args: list[str], flag: str, default):
    return type(default)(args[args.index(flag) + 1]) if flag in args else default


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def lines(run, split: str) -> dict[int, dict]:
    return {r["step"]: r for r in records(run, split)}


# --------------------------------------------------------------------------------------------- DPOConfig
def test_dpo_config_defaults_are_the_books_and_train_settings_merge():
    cfg = DPOConfig(model="m", data="d.json", out="o")
    assert (cfg.beta, cfg.loss, cfg.label_smoothing, cfg.logp_mean, cfg.precompute_ref, cfg.lora_rank) == \
        (0.1, "sigmoid", 0.0, False, False, 0)
    t = cfg.train
    assert (t.lr, t.batch_size, t.epochs, t.weight_decay, t.schedule, t.eval_every, t.best_metric, t.best_mode) == \
        (5e-6, 8, 1, 0.01, "constant", 20, "loss", "min")
    merged = DPOConfig(model="m", data="d.json", out="o", train={"lr": 1e-3}).train
    assert merged.lr == 1e-3 and merged.batch_size == 8 and merged.eval_every == 20  # the DPO defaults stay


@pytest.mark.parametrize("kw, says", [
    ({"beta": 0.0}, "--beta must be > 0"),
    ({"beta": -0.5}, "--beta must be > 0"),
    ({"beta": float("nan")}, "--beta must be > 0"),
    ({"label_smoothing": 0.1, "loss": "ipo"}, "--label-smoothing"),
    ({"label_smoothing": 0.5}, "--label-smoothing"),
    ({"label_smoothing": -0.1}, "--label-smoothing"),
    ({"loss": "hinge"}, "--loss 'hinge'"),
    ({"data": ""}, "--data FILE is required"),
    ({"val_data": "v.json"}, "give both --val-data and --test-data"),
    ({"samples": -1}, "samples must be >= 0"),
    ({"lora_rank": 2, "lora_targets": ["lm_head"]}, "lm_head"),
])
def test_dpo_config_refuses(kw, says):
    with pytest.raises(ScratchError) as e:
        DPOConfig(**{"model": "m", "data": "d.json", "out": "o", **kw})
    assert says in str(e.value)


# --------------------------------------------------------------------------------------------- EncodedPairs
def test_encoded_pairs_render_with_sft_masks_and_collate_chosen_then_rejected(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    recs = pref_records(5, identical=())
    enc = EncodedPairs([as_pair(r) for r in recs], CHATML, tok, 128, pad_id=0)
    assert len(enc) == 5 and enc.cut == enc.skipped == 0
    for (c_ids, c_mask, r_ids, r_mask), rec in zip(enc.rows, recs):
        assert tok.decode([i for i, m in zip(c_ids, c_mask) if m]) == "yes good<|im_end|>"
        assert tok.decode([i for i, m in zip(r_ids, r_mask) if m]) == "no bad<|im_end|>"
        start = c_mask.index(1)
        assert r_mask.index(1) == start and c_ids[:start] == r_ids[:start]  # the same prompt tokens, untrained
        prompt = tok.decode(c_ids[:start])
        assert prompt.startswith("<|im_start|>user\n") and rec["instruction"] in prompt
        assert prompt.endswith("<|im_start|>assistant\n") and (rec["input"] or "") in prompt
    assert enc.tokens == sum(len(r[0]) + len(r[2]) for r in enc.rows)

    batch = enc.collate([3, 0, 4])
    rows = [enc.rows[i][0] for i in (3, 0, 4)] + [enc.rows[i][2] for i in (3, 0, 4)]
    masks = [enc.rows[i][1] for i in (3, 0, 4)] + [enc.rows[i][3] for i in (3, 0, 4)]
    T = max(map(len, rows))
    assert batch["idx"].shape == batch["mask"].shape == (6, T)
    for b, (ids, mask) in enumerate(zip(rows, masks)):
        assert batch["idx"][b].tolist() == ids + [0] * (T - len(ids))
        assert batch["mask"][b].tolist() == mask + [0] * (T - len(ids))
        assert batch["attention_mask"][b].tolist() == [1] * len(ids) + [0] * (T - len(ids))
    assert int(batch["tokens"]) == sum(map(len, rows)) and "ref" not in batch
    enc.ref = torch.arange(10, dtype=torch.float32).view(5, 2)
    assert enc.collate([3, 0, 4])["ref"].tolist() == [[6.0, 7.0], [0.0, 1.0], [8.0, 9.0]]


def test_encoded_pairs_cut_long_answers_and_skip_pairs_with_nothing_left(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    short = {"instruction": "Hi?", "input": "", "chosen": "yes good", "rejected": "no bad"}
    long_answer = {**short, "chosen": "yes good " * 30}
    long_prompt = {**short, "instruction": "What about the sea? " * 30}
    full_len = len(encode(as_pair(long_answer).conversation(long_answer["chosen"]), CHATML, tok)[0])
    short_ids, short_mask = encode(as_pair(short).conversation("yes good"), CHATML, tok)
    rejected_len = len(encode(as_pair(short).conversation("no bad"), CHATML, tok)[0])
    max_length = max(len(short_ids), rejected_len) + 2
    answer_room = max_length - short_mask.index(1)  # the long answer keeps this many trained tokens
    assert full_len > max_length
    enc = EncodedPairs([as_pair(r) for r in (short, long_answer, long_prompt)], CHATML, tok, max_length, 0)
    assert len(enc) == 2 and enc.skipped == 1 and [p.chosen for p in enc.pairs] == [short["chosen"],
                                                                                      long_answer["chosen"]]
    assert enc.cut == 1 + 2  # the long chosen answer, and both answers of the skipped pair
    c_ids, c_mask = enc.rows[1][:2]
    assert len(c_ids) == len(c_mask) == max_length and sum(c_mask) == answer_room  # cut from the right
    assert all(len(r[0]) <= max_length and len(r[2]) <= max_length for r in enc.rows)
    s = enc.summary(max_length)
    assert "3 answers cut" in s and "1 pairs skipped" in s


# --------------------------------------------------------------------------------------------- dpo_objective
def _policy_and_reference(kind: str):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(**TINY))
    if kind == "lora":
        ref = copy.deepcopy(policy)  # the base the adapters sit on
        apply_lora(policy, 2, 4.0)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2)  # adapters that change the model
        return policy, ref
    torch.manual_seed(1)
    return policy, GPT(ModelConfig(**TINY))


@pytest.mark.parametrize("ref_kind", ["frozen", "precomputed", "lora"])
@pytest.mark.parametrize("loss, eps, mean", [("sigmoid", 0.0, False), ("sigmoid", 0.25, True), ("ipo", 0.0, False)])
def test_dpo_objective_against_the_formula_on_full_logits(tiny_chat_tokenizer, ref_kind, loss, eps, mean):
    beta = 0.3
    policy, ref = _policy_and_reference(ref_kind)
    policy.train()
    ref.eval()
    recs = pref_records(6, identical=())
    recs[1]["chosen"] = "no good at all"  # answers of different lengths
    enc = EncodedPairs([as_pair(r) for r in recs], CHATML, tiny_chat_tokenizer, 128, 0)
    batch = enc.collate([4, 1, 0, 5])
    idx, mask = batch["idx"], batch["mask"]
    with torch.no_grad():
        ref_lp = token_logps(ref, idx, mask)[int(mean)]
    B = 4
    ref_pairs = torch.stack([ref_lp[:B], ref_lp[B:]], 1)  # (B, 2)
    kwargs = {}
    if ref_kind == "precomputed":
        batch = {**batch, "ref": ref_pairs.float()}
    elif ref_kind == "frozen":
        kwargs["ref"] = ref

    loss_sum, m = dpo_objective(policy, batch, beta=beta, loss=loss, label_smoothing=eps, logp_mean=mean, **kwargs)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    got_grads = torch.autograd.grad(loss_sum, trainable)

    pi = token_logps(policy, idx, mask)[int(mean)]
    pi_pairs = torch.stack([pi[:B], pi[B:]], 1)
    gap = (pi_pairs[:, 0] - ref_pairs[:, 0]) - (pi_pairs[:, 1] - ref_pairs[:, 1])
    if loss == "ipo":
        want_losses = (gap - 1 / (2 * beta)) ** 2
    else:
        want_losses = -(1 - eps) * F.logsigmoid(beta * gap) - eps * F.logsigmoid(-beta * gap)
    want_grads = torch.autograd.grad(want_losses.sum(), trainable)
    want = hand_metrics(pi_pairs.detach().double(), ref_pairs.double(), beta, loss, eps)

    assert float(loss_sum.detach()) == pytest.approx(float(want_losses.detach().sum()), rel=1e-5, abs=1e-5)
    assert m["count"] == B and int(m["tokens"]) == int(batch["attention_mask"].sum())
    for k in METRICS:
        assert float(m[k]) == pytest.approx(want[k] * B, abs=1e-4), k  # sums over the pairs
    for g, w in zip(got_grads, want_grads):  # the reference is a constant
        assert (g - w).abs().max() <= 1e-4 * w.abs().max() + 1e-6
    assert all(p.grad is None for p in ref.parameters())
    if ref_kind == "lora":
        assert all(mod.enabled for mod in policy.modules() if hasattr(mod, "enabled"))  # adapters back on


def test_dpo_objective_with_policy_equal_to_reference_is_ln2(tiny_chat_tokenizer):
    torch.manual_seed(0)
    policy = GPT(ModelConfig(**TINY))
    enc = EncodedPairs([as_pair(r) for r in pref_records(3, identical=())], CHATML, tiny_chat_tokenizer, 128, 0)
    batch = enc.collate([0, 1, 2])
    loss_sum, m = dpo_objective(policy, batch, beta=0.1, ref=copy.deepcopy(policy))
    assert float(loss_sum.detach()) == pytest.approx(3 * LN2, abs=1e-6)
    assert float(m["rewards/margins"]) == 0 and float(m["rewards/accuracies"]) == 0
    loss_sum, _ = dpo_objective(policy, batch, beta=0.25, loss="ipo", ref=copy.deepcopy(policy))
    assert float(loss_sum.detach()) == pytest.approx(3 * (1 / (2 * 0.25)) ** 2, abs=1e-5)  # (0 - 1/(2 tau))^2 per pair


# --------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_chat_tokenizer):
    root = tmp_path_factory.mktemp("dpo")
    base = base_model(tiny_chat_tokenizer, root / "base", chat=CHATML)
    data = root / "prefs.json"
    data.write_text(json.dumps(pref_records(), indent=1))
    return SimpleNamespace(root=root, base=base, tok=tiny_chat_tokenizer, data=data, recs=pref_records())


def dpo_args(inputs, out, *extra, steps: int = 2, model=None) -> list:
    return ["dpo", "--model", model or inputs.base, "--data", inputs.data, "--out", out, "--max-steps", steps,
            "--batch-size", 4, "--lr", "1e-3", "--eval-every", steps, "--checkpoint-every", steps, "--samples", 0,
            *FAST, *extra]


RUNS = {  # name -> (extra flags, steps); each run once per module
    "full": ([], 2),
    "lora": (["--lora-rank", "2"], 2),
    "pre": (["--precompute-ref"], 2),
    "pre-lora": (["--precompute-ref", "--lora-rank", "2"], 2),
    "mean": (["--logp-mean", "--beta", "0.5"], 2),
    "ipo": (["--loss", "ipo", "--beta", "0.5"], 2),
    "smooth": (["--label-smoothing", "0.2", "--beta", "0.5"], 2),
    "learn": (["--lr", "3e-3", "--eval-every", "12"], 24),
}


@pytest.fixture(scope="module")
def runs(inputs):
    """runs(name) -> the run folder of `scratchllm dpo` with RUNS[name] (trained once per module)."""
    done = {}

    def get(name):
        if name not in done:
            extra, steps = RUNS[name]
            out = inputs.root / "runs" / name
            args = dpo_args(inputs, out, steps=steps)
            if "--eval-every" in extra:
                at = args.index("--eval-every")
                del args[at:at + 2]
            assert cli(*args, *extra) == 0
            done[name] = out
        return done[name]

    return get


@pytest.mark.parametrize("kind", list(KINDS))
def test_before_the_first_step_the_policy_is_the_reference(runs, kind):
    run = runs(kind)
    val0 = lines(run, "val")[0]
    assert abs(val0["loss"] - LN2) < 1e-6
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert abs(val0[k]) < 1e-6, k
    first = lines(run, "train")[1]  # the first step's batch is scored before the update
    assert abs(first["loss"] - LN2) < 1e-6 and abs(first["rewards/margins"]) < 1e-6
    assert f"**reference**: {KINDS[kind]}" in (run / "report.md").read_text()
    assert (run / "ref_logps.safetensors").is_file() == kind.startswith("pre")


@pytest.mark.parametrize("name", ["full", "ipo"])
def test_metrics_carry_trls_names_on_train_and_val_lines(runs, name):
    run = runs(name)
    train, val = records(run, "train"), records(run, "val")
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in val] == [0, 2]
    for r in train + val:
        assert all(k in r and math.isfinite(r[k]) for k in (*METRICS, "loss")), r
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-6)
        assert 0 <= r["rewards/accuracies"] <= 1
    assert val[0]["count"] == 2 and train[0]["count"] == 4  # pairs


@pytest.mark.parametrize("name", ["full", "lora", "pre", "pre-lora", "mean", "ipo", "smooth"])
def test_logged_val_metrics_equal_the_checkpoint_scored_by_hand(runs, inputs, name):
    """The last checkpoint (open_model: full weights, or LoRA adapters merged onto the base) against the
    starting model, on the validation pairs of the seeded split: the formula of the run's settings."""
    run, (extra, steps) = runs(name), RUNS[name]
    mean = "--logp-mean" in extra
    loss = setting(extra, "--loss", "sigmoid")
    beta, eps = setting(extra, "--beta", 0.1), setting(extra, "--label-smoothing", 0.0)
    _, val, _ = hand_split(inputs.recs)
    trained = open_model(run / f"step_{steps:07d}").model
    ref = open_model(inputs.base).model
    want = hand_metrics(answer_logps(trained, val, inputs.tok, mean), answer_logps(ref, val, inputs.tok, mean),
                        beta, loss, eps)
    logged = lines(run, "val")[steps]
    assert_metrics(logged, want)
    assert abs(want["rewards/margins"]) > 1e-3  # the policy did move away from the reference
    step0 = lines(run, "val")[0]
    assert step0["loss"] == pytest.approx((1 / (2 * beta)) ** 2 if loss == "ipo" else LN2, abs=1e-5)
    untrained = answer_logps(ref, val, inputs.tok, mean)
    assert step0["logps/chosen"] == pytest.approx(float(untrained[:, 0].mean()), abs=2e-4)
    assert step0["logps/rejected"] == pytest.approx(float(untrained[:, 1].mean()), abs=2e-4)


def test_logp_mean_averages_over_the_answer_tokens(runs, inputs):
    _, val, _ = hand_split(inputs.recs)
    ref = open_model(inputs.base).model
    total, mean = answer_logps(ref, val, inputs.tok), answer_logps(ref, val, inputs.tok, mean=True)
    ids, mask = encode(as_pair(val[0]).conversation("yes good"), CHATML, inputs.tok)
    assert float(total[0, 0] / mean[0, 0]) == pytest.approx(sum(mask[1:]), rel=1e-5)  # answer + <|im_end|>
    assert lines(runs("mean"), "val")[0]["logps/chosen"] == pytest.approx(float(mean[:, 0].mean()), abs=1e-5)
    assert lines(runs("full"), "val")[0]["logps/chosen"] == pytest.approx(float(total[:, 0].mean()), abs=2e-4)
    assert "averaged over the answer's tokens" in (runs("mean") / "report.md").read_text()


def test_ipo_and_label_smoothing_are_what_the_report_says(runs):
    assert "**loss**: ipo, beta 0.5" in (runs("ipo") / "report.md").read_text()
    assert "label smoothing 0.2" in (runs("smooth") / "report.md").read_text()
    ipo = lines(runs("ipo"), "val")
    assert ipo[0]["loss"] == pytest.approx(1.0, abs=1e-5) and ipo[2]["loss"] < ipo[0]["loss"]


# --------------------------------------------------------------------------------------------- the reference cache
def test_precomputed_reference_log_probs_are_the_frozen_models(runs, inputs):
    run = runs("pre")
    cached = tensors(run / "ref_logps.safetensors")
    assert sorted(cached) == ["test", "train", "val"]
    ref = open_model(inputs.base).model
    for name, recs in zip(("train", "val", "test"), hand_split(inputs.recs)):
        assert cached[name].shape == (len(recs), 2) and cached[name].dtype == torch.float32
        want = answer_logps(ref, recs, inputs.tok)
        assert torch.allclose(cached[name].double(), want, atol=2e-4, rtol=0), name
    with safe_open(str(run / "ref_logps.safetensors"), "pt") as f:
        assert len((f.metadata() or {}).get("key", "")) == 64  # the sha256 the cache is keyed by
    lora_cached = tensors(runs("pre-lora") / "ref_logps.safetensors")  # adapters off == the starting model
    assert all(torch.allclose(lora_cached[k], cached[k], atol=1e-5) for k in cached)


@pytest.mark.parametrize("pre, live", [("pre", "full"), ("pre-lora", "lora")])
def test_training_on_precomputed_references_equals_the_live_reference(runs, pre, live):
    for split in ("train", "val"):
        a, b = records(runs(pre), split), records(runs(live), split)
        assert [r["step"] for r in a] == [r["step"] for r in b]
        for x, y in zip(a, b):
            for k in ("loss", *METRICS):
                assert x[k] == pytest.approx(y[k], abs=1e-5), (split, x["step"], k)
    assert json.loads((runs(pre) / "test_metrics.json").read_text())["loss"] == pytest.approx(
        json.loads((runs(live) / "test_metrics.json").read_text())["loss"], abs=1e-5)


def _drop_checkpoints(run) -> None:
    """A run that died before its first checkpoint: --resume then starts afresh in the same folder."""
    for p in run.iterdir():
        if p.name.startswith("step_"):
            shutil.rmtree(p)
        elif p.name == "latest":
            p.unlink()


def test_resume_reuses_the_cache_or_rebuilds_it_from_the_starting_model(inputs, capsys):
    root = inputs.root / "resume-pre"
    straight, first, again = root / "straight", root / "first", root / "again"
    assert cli(*dpo_args(inputs, straight, "--precompute-ref", "--eval-every", 2, "--checkpoint-every", 2,
                         steps=4)) == 0
    assert cli(*dpo_args(inputs, first, "--precompute-ref", steps=2)) == 0
    shutil.copytree(first, again)
    cache = (first / "ref_logps.safetensors").read_bytes()
    capsys.readouterr()

    assert cli(*dpo_args(inputs, first, "--resume", "--max-steps", 4, steps=2)) == 0
    out = capsys.readouterr().out
    assert f"reference log-probs read from {first / 'ref_logps.safetensors'}" in out and "cached in" not in out
    assert (first / "ref_logps.safetensors").read_bytes() == cache

    (again / "ref_logps.safetensors").unlink()  # the trained policy must not become the reference
    assert cli(*dpo_args(inputs, again, "--resume", "--max-steps", 4, steps=2)) == 0
    assert "is missing: computing the reference log-probs with a fresh copy" in capsys.readouterr().out
    rebuilt, old = tensors(again / "ref_logps.safetensors"), tensors(straight / "ref_logps.safetensors")
    assert all(torch.allclose(rebuilt[k], old[k], atol=1e-5) for k in old)

    for run in (first, again):
        for split in ("train", "val"):
            got, want = lines(run, split), lines(straight, split)
            assert sorted(got) == sorted(want) == ([1, 2, 3, 4] if split == "train" else [0, 2, 4])
            for step in want:
                for k in ("loss", *METRICS):
                    assert got[step][k] == pytest.approx(want[step][k], abs=1e-5), (run.name, split, step, k)


def test_resume_with_a_frozen_copy_continues_the_run(inputs, capsys):
    root = inputs.root / "resume-full"
    assert cli(*dpo_args(inputs, root / "straight", "--eval-every", 2, "--checkpoint-every", 2, steps=4)) == 0
    assert cli(*dpo_args(inputs, root / "split", steps=2)) == 0
    assert cli(*dpo_args(inputs, root / "split", "--resume", "--max-steps", 4, steps=2)) == 0
    assert "resum" in capsys.readouterr().out.lower()
    got, want = lines(root / "split", "train"), lines(root / "straight", "train")
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-5)
        assert got[step]["rewards/margins"] == pytest.approx(want[step]["rewards/margins"], abs=1e-5)
    assert lines(root / "split", "val")[4]["loss"] == pytest.approx(lines(root / "straight", "val")[4]["loss"],
                                                                    abs=1e-5)


def test_a_changed_setting_recomputes_the_cache(runs, inputs, capsys):
    run = inputs.root / "changed-setting"
    shutil.copytree(runs("pre"), run)
    _drop_checkpoints(run)
    capsys.readouterr()
    assert cli(*dpo_args(inputs, run, "--precompute-ref", "--logp-mean", "--resume")) == 0
    out = capsys.readouterr().out
    assert "was computed for other data or settings: computing it again" in out and "read from" not in out
    _, val, _ = hand_split(inputs.recs)
    want = answer_logps(open_model(inputs.base).model, val, inputs.tok, mean=True)
    assert torch.allclose(tensors(run / "ref_logps.safetensors")["val"].double(), want, atol=1e-5)
    assert abs(lines(run, "val")[0]["loss"] - LN2) < 1e-6


def test_another_model_does_not_reuse_the_cache(runs, inputs, capsys):
    other = base_model(inputs.tok, inputs.root / "base-other", chat=CHATML, seed=1)
    run = inputs.root / "changed-model"
    shutil.copytree(runs("pre"), run)
    _drop_checkpoints(run)
    capsys.readouterr()
    assert cli(*dpo_args(inputs, run, "--precompute-ref", "--resume", model=other)) == 0
    assert "read from" not in capsys.readouterr().out
    assert abs(lines(run, "val")[0]["loss"] - LN2) < 1e-6  # the new policy is its own reference


# --------------------------------------------------------------------------------------------- learning and outputs
def test_a_tiny_model_learns_the_preference(runs, inputs):
    run = runs("learn")
    val = lines(run, "val")
    assert sorted(val) == [0, 12, 24]
    last = val[24]
    assert last["rewards/accuracies"] == 1.0 and last["rewards/margins"] > 0.5 and last["loss"] < LN2 - 0.2
    assert last["rewards/chosen"] > last["rewards/rejected"]
    assert last["logps/chosen"] - last["logps/rejected"] > val[0]["logps/chosen"] - val[0]["logps/rejected"]
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["model"] == "best/" and test["rewards/accuracies"] == 1.0 and test["count"] == 3
    _, _, held_out = hand_split(inputs.recs)
    best, ref = answer_logps(open_model(run / "best").model, held_out, inputs.tok), \
        answer_logps(open_model(inputs.base).model, held_out, inputs.tok)
    assert_metrics(test, {k: v for k, v in hand_metrics(best, ref, 0.1).items() if not k.startswith("logps/")})
    report = (run / "report.md").read_text()
    assert "## Test pairs (best/, 3 pairs)" in report and report.index("## Test pairs") < report.index("## Config")


@pytest.mark.parametrize("name", ["full", "lora"])
def test_best_and_checkpoints_load_as_language_models(runs, inputs, name):
    run = runs(name)
    base = open_model(inputs.base).model.state_dict()
    for folder in (run / "best", run / "step_0000002"):
        assert json.loads((folder / "chat.json").read_text())["name"] == "chatml"
        loaded = open_model(folder)
        assert isinstance(loaded.model, GPT) and loaded.tokenizer is not None and loaded.chat.name == "chatml"
        state = loaded.model.state_dict()
        assert state.keys() == base.keys()
        assert any(not torch.equal(state[k], base[k]) for k in base)  # trained weights
        saved = tensors(folder / "model.safetensors")
        if name == "lora":
            assert (folder / "adapter.json").is_file()
            assert saved and all("lora_" in k for k in saved)  # the adapters only
        else:
            assert not (folder / "adapter.json").exists() and not any("lora_" in k for k in saved)
            assert sum(v.numel() for v in saved.values()) == sum(p.numel() for p in loaded.model.parameters())
    assert (run / "step_0000002" / "train_state.pt").is_file() and (run / "config.toml").is_file()


def test_test_jsonl_holds_the_held_out_pairs(runs, inputs):
    _, _, test = hand_split(inputs.recs)
    assert read_jsonl(runs("full") / "test.jsonl") == [
        {"instruction": r["instruction"], "input": r["input"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in test]


def test_dpo_holds_out_the_records_sft_holds_out(runs, inputs):
    """The same seed splits the preference file as SFT splits the same records: the pairs whose chosen
    answer equals the rejected one are dropped after the split, so they shift nothing."""
    sft_run = inputs.root / "sft"
    assert cli("sft", "--model", inputs.base, "--data", inputs.data, "--out", sft_run, "--max-steps", 1,
               "--samples", 0, *FAST) == 0
    sft_test = [r["instruction"] for r in read_jsonl(sft_run / "test.jsonl")]
    identical = {inputs.recs[i]["instruction"] for i in IDENTICAL}
    assert len(sft_test) == 4 and len(identical & set(sft_test)) == 1  # the split holds an identical pair
    dpo_test = [r["instruction"] for r in read_jsonl(runs("full") / "test.jsonl")]
    assert dpo_test == [q for q in sft_test if q not in identical]
    assert "(2 skipped: chosen == rejected)" in (runs("full") / "report.md").read_text()


# --------------------------------------------------------------------------------------------- bad input
def _write(path, recs):
    path.write_text(json.dumps(recs))
    return path


GOOD = {"instruction": "Say yes.", "input": "", "chosen": "yes", "rejected": "no"}


@pytest.mark.parametrize("what, recs, extra, says", [
    ("no chosen", [GOOD, {"instruction": "Say yes.", "rejected": "no"}], [], "data.json[1]: no 'chosen' field"),
    ("no rejected", [{"instruction": "Say yes.", "chosen": "yes"}], [], "data.json[0]: no 'rejected' field"),
    ("neither", [GOOD, {"instruction": "Say yes."}], [], "no 'chosen' and no 'rejected' field"),
    ("beta 0", [GOOD] * 40, ["--beta", "0"], "--beta must be > 0"),
    ("label smoothing with ipo", [GOOD] * 40, ["--loss", "ipo", "--label-smoothing", "0.1"],
     "needs --loss sigmoid"),
    ("all pairs identical", [{**GOOD, "rejected": "yes"}] * 40, [], "every pair has chosen == rejected"),
    ("an identical val file", [GOOD] * 40, ["--val-data", "{w}/same.json", "--test-data", "{w}/data.json"],
     "same.json: every pair has chosen == rejected"),
])
def test_bad_input_is_refused_before_training(inputs, tmp_path, capsys, what, recs, extra, says):
    data = _write(tmp_path / "data.json", recs)
    _write(tmp_path / "same.json", [{**GOOD, "rejected": "yes"}] * 4)
    out = tmp_path / "run"
    args = dpo_args(inputs, out, *[e.format(w=tmp_path) for e in extra])
    args[args.index("--data") + 1] = data
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err
    assert not (out / "metrics.jsonl").exists()


def test_a_split_of_only_identical_pairs_names_them(inputs, tmp_path, capsys):
    val = set(order()[34:36])
    recs = [{**r, "rejected": r["chosen"] if i in val else r["rejected"]} for i, r in enumerate(pref_records())]
    args = dpo_args(inputs, tmp_path / "run")
    args[args.index("--data") + 1] = _write(tmp_path / "data.json", recs)
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert "chosen == rejected" in err and "--max-length" not in err
