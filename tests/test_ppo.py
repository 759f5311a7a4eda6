"""`scratchllm ppo` (RLHF with PPO, train/ppo.py), its rules (train/rules.py), PPOConfig, and the Trainer's
`optimizer_step(..., advance=False)` / `read_model` that the stage drives.

References nobody in src/ wrote: response positions, the KL controller and rule scores worked out by hand;
the log-probs recomputed from the model's full logits (position t-1 predicts token t); a reward model's
scores of the held-out answers recomputed with `RewardModel.score` on the conversations; a resumed run
checked against the same run done in one go. The losses themselves are tested in test_losses.py.

Hermetic: tiny_chat_tokenizer (ChatML specials), a 2-block x 32-wide random GPT saved with a ChatML
chat.json, the toy instruction records of sft_helpers, rule functions written into a module of this
test's own (on sys.path), fp32 on one CPU thread. Runs shared by several tests are done once (`runs`).
"""

import contextlib
import io
import json
import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from sft_helpers import FAST, TINY, WORDS, base_model, cli, records, toy_records, write_json, write_jsonl

from scratchllm.common import ScratchError
from scratchllm.configs import PPOConfig, TrainConfig
from scratchllm.data.instructions import Conversation
from scratchllm.data.preferences import read_prompts
from scratchllm.tokenizer.chat import FORMATS, turn_stops
from scratchllm.train import rules
from scratchllm.train.optim import lr_at
from scratchllm.train.ppo import (
    adapt_kl_coef,
    gather_rows,
    load_rule,
    response_positions,
    rule_scores,
    token_logprobs,
)
from scratchllm.weights.checkpoint import open_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

SPLIT = ["--split", "0.5", "0.3", "0.2"]  # 24 toy records: 12 train, 7 val, 5 test prompts
RULES = "ppo_test_rules"  # the module the rule functions below live in (unique: importlib caches modules)
RULES_SOURCE = '''
CALLS = []


def length(prompt, response):
    """A reward that differs between responses: the policy gets a signal from the first batch."""
    return len(response) / 8


def letter(prompt, response):
    """A bandit a tiny model can solve: 1 when the answer starts with an ASCII letter."""
    return 1.0 if response[:1].isascii() and response[:1].isalpha() else 0.0


def boom_on_fox(prompt, response):
    if "fox" in prompt:
        raise ValueError("no foxes here")
    return len(response) / 8


def always_boom(prompt, response):
    raise RuntimeError("this rule is broken")
'''


def read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def run_cli(*argv) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `scratchllm ARGV` in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli(*argv)
    return rc, out.getvalue()


# --------------------------------------------------------------------------------------------- pure helpers
def test_response_positions_by_hand():
    """Row 0: prompt 3, response 2; row 1: prompt 5, response 4. The hidden state at prompt_len - 1 + j
    predicts response token j; positions past T - 1 are clamped (they are masked anyway)."""
    pos, mask = response_positions(torch.tensor([3, 5]), torch.tensor([2, 4]), T=9)
    assert pos.tolist() == [[2, 3, 4, 5], [4, 5, 6, 7]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and mask.dtype == torch.float32
    pos, mask = response_positions(torch.tensor([6, 2]), torch.tensor([1, 3]), T=7)
    assert pos.tolist() == [[5, 6, 6], [1, 2, 3]] and mask.tolist() == [[1, 0, 0], [1, 1, 1]]


def test_gather_rows_picks_the_rows_of_each_sequence():
    h = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    pos = torch.tensor([[4, 0], [1, 1]])
    got = gather_rows(h, pos)
    assert got.shape == (2, 2, 3)
    torch.testing.assert_close(got, torch.stack([h[0, [4, 0]], h[1, [1, 1]]]), rtol=0, atol=0)


@pytest.mark.parametrize("kl, expected", [
    (3.0, 0.1 * (1 + 0.2 * 8 / 100)),  # kl / target - 1 = 0.5, clipped to 0.2
    (2.2, 0.1 * (1 + 0.1 * 8 / 100)),  # 0.1: inside the clip
    (1.8, 0.1 * (1 - 0.1 * 8 / 100)),
    (0.0, 0.1 * (1 - 0.2 * 8 / 100)),  # -1, clipped to -0.2
    (2.0, 0.1),  # on target: unchanged
])
def test_adapt_kl_coef_is_ziegler_et_als_controller(kl, expected):
    assert adapt_kl_coef(0.1, kl, target=2.0, n=8, horizon=100) == pytest.approx(expected, rel=1e-12)


def _tiny_gpt(seed=0, **kw):
    from scratchllm.model import GPT, ModelConfig

    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, "vocab_size": 40, **kw})).eval()


@pytest.mark.parametrize("temperature, n_valid", [(1.0, 40), (0.7, 40), (1.3, 33)])
def test_token_logprobs_are_log_softmax_of_full_logits_at_the_previous_position(temperature, n_valid):
    """Rows of prompt + response, right-padded: log p(token t) comes from the logits at t - 1, divided by
    the temperature, with the ids >= n_valid (padding rows of the head) impossible; the entropy is that
    of the same distribution."""
    model = _tiny_gpt()
    g = torch.Generator().manual_seed(1)
    prompt_lens, resp_lens = [4, 2, 6], [3, 5, 1]
    T = max(p + r for p, r in zip(prompt_lens, resp_lens))
    ids = torch.zeros(3, T, dtype=torch.long)
    tokens = torch.zeros(3, max(resp_lens), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        row = torch.randint(0, n_valid, (p + r,), generator=g)
        ids[b, :p + r] = row
        tokens[b, :r] = row[p:]
    pos, mask = response_positions(torch.tensor(prompt_lens), torch.tensor(resp_lens), T)
    with torch.no_grad():
        logp, hp, ent = token_logprobs(model, ids, pos, tokens, temperature, n_valid, entropy=True)
        logits = model(ids).float() / temperature  # (B, T, V): every position
    logits[..., n_valid:] = float("-inf")
    ref = F.log_softmax(logits, -1)
    assert logp.shape == ent.shape == mask.shape and hp.shape == (3, max(resp_lens), 32)
    for b, (p, r) in enumerate(zip(prompt_lens, resp_lens)):
        for j in range(r):
            t = p + j  # the position of response token j in the row
            want = ref[b, t - 1, ids[b, t]]
            assert float(logp[b, j]) == pytest.approx(float(want), abs=1e-5)
            probs = ref[b, t - 1].exp()
            want_ent = -(probs[:n_valid] * ref[b, t - 1, :n_valid]).sum()
            assert float(ent[b, j]) == pytest.approx(float(want_ent), abs=1e-5)
    assert torch.isfinite(ent).all() and (ent > 0).all()


def test_short_answer_rule():
    f = rules.short_answer
    assert f("q", "") == 0.0 and f("q", "  \n ") == 0.0
    assert f("q", "Paris.") == 1.0 and f("q", "one two three four five") == 1.0
    assert f("q", "one two three four five six") == pytest.approx(5 / 6)
    assert f("q", " ".join(["w"] * 10)) == pytest.approx(0.5)
    assert f("Capital of France?", "a\nb\tc") == 1.0  # words are split on any whitespace


@pytest.fixture()
def isolated_path(monkeypatch):
    """sys.path and sys.modules changes of load_rule undone after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("ppo_rule_"):
            del sys.modules[name]


def test_load_rule_imports_from_the_current_folder(tmp_path, monkeypatch, isolated_path):
    (tmp_path / "ppo_rule_here.py").write_text("def score(prompt, response):\n    return 2.5\nVALUE = 3\n")
    monkeypatch.chdir(tmp_path)
    fn = load_rule("ppo_rule_here:score")
    assert fn("p", "r") == 2.5
    assert load_rule("scratchllm.train.rules:short_answer") is rules.short_answer


def test_load_rule_names_a_missing_module_or_function(tmp_path, monkeypatch, isolated_path):
    (tmp_path / "ppo_rule_there.py").write_text("VALUE = 3\ndef score(p, r):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ScratchError, match=r"--reward ppo_rule_missing:score: cannot import module "
                                           r"'ppo_rule_missing'.*current folder or on PYTHONPATH"):
        load_rule("ppo_rule_missing:score")
    with pytest.raises(ScratchError, match=r"--reward ppo_rule_there:nope: ppo_rule_there has no function 'nope'"):
        load_rule("ppo_rule_there:nope")
    with pytest.raises(ScratchError, match=r"has no function 'VALUE'"):  # there, but not callable
        load_rule("ppo_rule_there:VALUE")


def test_rule_scores_returns_floats_or_a_message_naming_the_prompt():
    prompts, responses, wheres = ["p1", "p2", "p3"], ["a", "bb", "ccc"], ["f.json[0]", "f.json[1]", "f.json[2]"]
    assert rule_scores(lambda p, r: len(r), "m:f", prompts, responses, wheres) == [1.0, 2.0, 3.0]
    assert rule_scores(lambda p, r: "0.5", "m:f", prompts, responses, wheres) == [0.5] * 3  # float()-able

    def raises_on_p2(p, r):
        if p == "p2":
            raise ValueError("bad answer")
        return 0.0

    msg = rule_scores(raises_on_p2, "m:f", prompts, responses, wheres)
    assert msg == "--reward m:f raised ValueError: bad answer on the prompt of f.json[1]"
    msg = rule_scores(lambda p, r: float("nan") if p == "p3" else 1.0, "m:f", prompts, responses, wheres)
    assert isinstance(msg, str) and "m:f" in msg and "nan" in msg and msg.endswith("f.json[2]")
    msg = rule_scores(lambda p, r: math.inf, "m:f", prompts, responses, wheres)
    assert isinstance(msg, str) and "inf" in msg and msg.endswith("f.json[0]")
    msg = rule_scores(lambda p, r: None, "m:f", prompts, responses, wheres)  # not a number at all
    assert isinstance(msg, str) and "TypeError" in msg and msg.endswith("f.json[0]")


# --------------------------------------------------------------------------------------------- PPOConfig
def test_ppo_config_defaults_and_train_settings_merge():
    cfg = PPOConfig(model="m", prompts="p.jsonl", reward="mod:fn", out="o")
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.lr, t.weight_decay, t.schedule) == (40, 8, 1e-5, 0.0, "constant")
    assert (t.eval_every, t.eval_batches, t.best_metric, t.best_mode, t.log_every) == (10, 0, "score", "max", 1)
    assert (cfg.kl_coef, cfg.kl_kind, cfg.gamma, cfg.lam, cfg.ppo_epochs, cfg.mini_batch_size) == \
        (0.05, "k1", 1.0, 0.95, 4, 4)
    assert (cfg.value_head, cfg.value_init, cfg.missing_eos_penalty, cfg.max_kl) == ("shared", "zero", 1.0, 20.0)
    merged = PPOConfig(model="m", prompts="p", reward="mod:fn", out="o", train={"lr": 1e-3, "batch_size": 4})
    assert merged.train.lr == 1e-3 and merged.train.batch_size == 4 and merged.train.best_metric == "score"
    assert isinstance(merged.train, TrainConfig)


OK = dict(model="m", prompts="p.jsonl", reward="mod:fn", out="o")


@pytest.mark.parametrize("kw, says", [
    ({"reward": ""}, "exactly one of --reward-model"),
    ({"reward_model": "rm"}, "exactly one of --reward-model"),
    ({"reward": "nocolon"}, "expected module:function"),
    ({"reward": "a:b:c"}, "expected module:function"),
    ({"reward": "mod:"}, "expected module:function"),
    ({"prompts": ""}, "--prompts FILE is required"),
    ({"kl_kind": "k2"}, "--kl-kind 'k2'"),
    ({"value_head": "both"}, "--value-head 'both'"),
    ({"value_init": "reward", "value_head": "separate"}, "--value-init reward needs"),
    ({"value_init": "reward", "reward": "", "reward_model": "rm"}, "--value-init reward needs"),
    ({"mini_batch_size": 3}, "must be a multiple of --mini-batch-size 3"),
    ({"mini_batch_size": 0}, "mini_batch_size must be >= 1"),
    ({"ppo_epochs": 0}, "ppo_epochs must be >= 1"),
    ({"temperature": 0.0}, "temperature > 0"),
    ({"max_kl": 0.0}, "max_kl > 0"),
    ({"target_kl": -1.0}, "target_kl >= 0"),
    ({"clip_range": 1.0}, "0 < clip_range < 1"),
    ({"lam": 1.5}, "0 <= lam <= 1"),
    ({"eval_prompts": -1}, "eval_prompts and samples must be >= 0"),
])
def test_ppo_config_refuses(kw, says):
    with pytest.raises(ScratchError) as e:
        PPOConfig(**{**OK, **kw})
    assert says in str(e.value), str(e.value)


# --------------------------------------------------------------------------------------------- Trainer changes
def _trainer(tmp_path, **kw):
    from trainer_helpers import CountingBatches, TinyLM

    from scratchllm.train.core import Trainer
    from scratchllm.train.objectives import next_token_objective

    torch.manual_seed(0)
    cfg = TrainConfig(**{**dict(max_steps=4, lr=1e-2, min_lr=0.0, warmup_steps=2, schedule="linear",
                                eval_every=0, checkpoint_every=0, precision="fp32", device="cpu", compile="off"),
                         **kw.pop("cfg", {})})
    batches = CountingBatches()
    return Trainer(TinyLM(), cfg, next_token_objective, batches, out_dir=tmp_path, **kw), batches


def test_optimizer_step_advance_false_keeps_the_step_and_its_learning_rate(tmp_path):
    t, batches = _trainer(tmp_path)
    t.step = 1
    before = [p.detach().clone() for p in t.model.parameters()]
    for k in range(3):
        m = t.optimizer_step([batches.next_batch()], advance=False)
        assert t.step == 1 and m["lr"] == lr_at(1, max_lr=1e-2, warmup_steps=2, max_steps=4, schedule="linear")
        assert t.tokens_seen == 32 * (k + 1) and not m["skipped"]
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))  # it did train
    assert t.optimizer.state[next(iter(t.model.parameters()))]["step"] == 3
    m = t.optimizer_step([batches.next_batch()])  # the default still advances
    assert t.step == 2 and m["lr"] == lr_at(1, max_lr=1e-2, warmup_steps=2, max_steps=4, schedule="linear")


def test_read_model_is_used_to_resume_and_to_load_best(tmp_path):
    """A stage's read_model (the inverse of its write_model) gives the state resume and load_best load."""
    from scratchllm.train.core import write_safetensors
    from scratchllm.weights.state import read_safetensors

    def write_split(folder, state):  # the embedding in a file of its own, as PPO does with the value function
        write_safetensors(folder, {k: v for k, v in state.items() if k != "wte.weight"})
        from safetensors.torch import save_file

        save_file({"wte.weight": state["wte.weight"].contiguous()}, str(folder / "extra.safetensors"))

    calls = []

    def read_split(folder):
        calls.append(folder.name)
        state = read_safetensors(folder / "model.safetensors")
        state.update(read_safetensors(folder / "extra.safetensors"))
        return state

    t, _ = _trainer(tmp_path / "a", write_model=write_split, read_model=read_split, cfg={"max_steps": 2})
    t.fit()
    saved = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.save_best({"loss": 1.0})
    u, _ = _trainer(tmp_path / "a", write_model=write_split, read_model=read_split, cfg={"max_steps": 2})
    assert u.resume(tmp_path / "a") == 2 and calls == ["step_0000002"]
    for k, v in u.model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)
    with torch.no_grad():
        for p in u.model.parameters():
            p.zero_()
    assert u.load_best() and calls == ["step_0000002", "best"]
    torch.testing.assert_close(u.model.wte.weight, saved["wte.weight"], rtol=0, atol=0)
    # without a read_model the default reads model.safetensors alone: the embedding is missing
    v, _ = _trainer(tmp_path / "a", write_model=write_split, cfg={"max_steps": 2})
    with pytest.raises(ScratchError, match="wte"):
        v.resume(tmp_path / "a")


# --------------------------------------------------------------------------------------------- the stage
class Inputs:
    def __init__(self, folder, tokenizer):
        self.folder, self.tokenizer = folder, tokenizer
        self.base = base_model(tokenizer, folder / "base", chat=FORMATS["chatml"])
        self.recs = toy_records(24)
        self.data = write_json(folder / "instr.json", self.recs)
        self.rules = folder / "rules"
        self.rules.mkdir()
        (self.rules / f"{RULES}.py").write_text(textwrap.dedent(RULES_SOURCE))
        self.eot = turn_stops(FORMATS["chatml"], tokenizer)[0][0]


@pytest.fixture(scope="module")
def inputs(tiny_chat_tokenizer, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))  # the stage puts the current folder on sys.path: undone after
        folder = tmp_path_factory.mktemp("ppo_inputs")
        made = Inputs(folder, tiny_chat_tokenizer)
        mp.syspath_prepend(str(made.rules))
        yield made
    sys.modules.pop(RULES, None)


def ppo_args(inputs, out, *extra, reward=f"{RULES}:length", steps=3) -> list:
    """The smoke run: 3 rollout batches of 4 prompts, mini-batches of 2, 8 new tokens, held-out prompts every 2."""
    return ["ppo", "--model", inputs.base, "--prompts", inputs.data, "--out", out, "--max-steps", steps,
            "--batch-size", 4, "--mini-batch-size", 2, "--max-new-tokens", 8, "--eval-every", 2, "--eval-prompts", 4,
            "--lr", "1e-3", *SPLIT, *FAST, *(["--reward", reward] if reward else []), *extra]


RUNS = {  # name -> (extra arguments, reward rule)
    "full": ([], "scratchllm.train.rules:short_answer"),
    "trained": (["--lr", "1e-2", "--checkpoint-every", 2], f"{RULES}:length"),
    "lora": (["--lora-rank", 2, "--lr", "1e-2"], f"{RULES}:length"),
    "separate": (["--value-head", "separate", "--lr", "1e-2", "--schedule", "linear"], f"{RULES}:length"),
}


@pytest.fixture(scope="module")
def runs(inputs, tmp_path_factory):
    """runs(name) -> (run folder, output of the run); each run once per module."""
    done = {}

    def get(name):
        if name not in done:
            extra, reward = RUNS[name]
            run = tmp_path_factory.mktemp(f"ppo_{name}") / "run"
            rc, out = run_cli(*ppo_args(inputs, run, *extra, reward=reward))
            assert rc == 0, out
            done[name] = run, out
        return done[name]

    return get


TRAIN_KEYS = ("score", "kl", "entropy", "clip_frac", "value_loss", "approx_kl", "response_length", "ended",
              "kl_coef", "policy_loss", "loss", "lr", "grad_norm")


@pytest.mark.parametrize("name", ["full", "trained", "lora"])
def test_metrics_lines_per_rollout_batch(runs, name):
    run, out = runs(name)
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3]  # --max-steps counts rollout batches
    for r in train:
        missing = [k for k in TRAIN_KEYS if not isinstance(r.get(k), int | float)]
        assert not missing, (missing, r)
        assert r["count"] == 4 and r["skipped"] is False and r["kl_coef"] == 0.05
        assert 0 <= r["ended"] <= 1 and 1 <= r["response_length"] <= 9 and 0 <= r["clip_frac"] <= 1
        assert 0 < r["entropy"] <= math.log(300) + 1e-4
    assert train[0]["kl"] == 0.0  # the first rollouts are the reference's (a copy of the same weights)
    val = records(run, "val")
    assert [r["step"] for r in val] == [0, 2, 3]
    for r in val:
        assert isinstance(r["score"], float) and r["count"] == 4 and r["loss"] == pytest.approx(-r["score"])
    assert "done: 3 rollout batches" in out


def test_each_rollout_batch_is_ppo_epochs_times_minibatch_optimizer_steps(runs):
    """3 rollout batches x 4 PPO epochs x (4 prompts / mini-batches of 2) = 24 AdamW steps."""
    run, _ = runs("full")
    state = torch.load(run / "step_0000003" / "train_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 3
    steps = {int(s["step"]) for s in state["optimizer"]["state"].values()}
    assert steps == {24}


def test_the_policy_learns_from_the_rollouts(runs, inputs):
    """With a reward that varies (the length rule) and lr 1e-2 the policy moves away from the reference:
    KL > 0 after the first batch, and the checkpoint differs from the starting model."""
    run, _ = runs("trained")
    train = records(run, "train")
    assert train[0]["kl"] == 0 and train[1]["kl"] != 0 and train[1]["approx_kl"] != 0
    assert any(r["grad_norm"] > 0 for r in train) and any(r["value_loss"] > 0 for r in train)
    base = tensors(open_model(inputs.base).folder / "model.safetensors")
    got = tensors(run / "step_0000003" / "model.safetensors")
    assert set(got) == set(base)
    assert any(not torch.equal(got[k], base[k]) for k in base)


def _logits(model, n=12):
    ids = torch.arange(n)[None] % 290
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("name", ["full", "trained", "lora", "separate"])
def test_checkpoints_and_best_load_as_language_models_with_the_value_beside(runs, name):
    run, _ = runs(name)
    folder = run / "step_0000003"
    value = tensors(folder / "value.safetensors")
    prefix = "value_model." if name == "separate" else "value_head."
    assert value and all(k.startswith(prefix) for k in value), sorted(value)
    if name != "separate":
        assert set(value) == {"value_head.weight", "value_head.bias"} and value["value_head.weight"].shape == (1, 32)
    else:
        assert "value_model.head.weight" in value and any(k.startswith("value_model.backbone.") for k in value)
    policy = tensors(folder / "model.safetensors")
    assert not any(k.startswith(("value_head.", "value_model.")) for k in policy)
    for f in (folder, run / "best", run):
        loaded = open_model(f)
        assert type(loaded.model).__name__ == "GPT" and not hasattr(loaded.model, "value_head")
        assert loaded.chat.name == "chatml" and loaded.tokenizer.vocab_size == 300
        logits = _logits(loaded.model)
        assert logits.shape == (1, 12, 300) and torch.isfinite(logits).all()
    assert (run / "best" / "value.safetensors").is_file()
    if name == "lora":
        assert (folder / "adapter.json").is_file()
        assert all("lora" in k for k in policy), sorted(policy)


@pytest.mark.parametrize("name", ["trained", "lora"])
def test_the_saved_policy_is_the_trained_one(runs, inputs, name):
    """open_model of the last checkpoint gives other logits than the starting model (it trained), and the
    same as the policy weights the checkpoint holds."""
    run, _ = runs(name)
    base = _logits(open_model(inputs.base).model)
    loaded = open_model(run / "step_0000003").model
    assert not torch.allclose(base, _logits(loaded), atol=1e-4)
    if name == "trained":  # a full checkpoint: the loaded weights are the file's
        state = loaded.state_dict()
        for k, v in tensors(run / "step_0000003" / "model.safetensors").items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_run_folder_outputs(runs, inputs):
    run, _ = runs("full")
    for f in ("ppo.png", "loss.png", "report.md", "samples.jsonl", "test.jsonl", "config.toml", "metrics.jsonl"):
        assert (run / f).is_file(), f
    samples = read_jsonl(run / "samples.jsonl")
    assert [s["step"] for s in samples] == [0] * 4 + [2] * 4 + [3] * 4  # 4 held-out prompts per evaluation
    by_where = {c.where: c for c in read_prompts(str(inputs.data))}
    for s in samples:
        assert set(s) == {"step", "where", "prompt", "response", "score"}
        assert s["where"] in by_where and s["prompt"].startswith(by_where[s["where"]].messages[0]["content"])
    val = records(run, "val")
    for r in val:
        mine = [s["score"] for s in samples if s["step"] == r["step"]]
        assert r["score"] == pytest.approx(sum(mine) / len(mine))
    report = (run / "report.md").read_text()
    assert "## Held-out samples (greedy)" in report and report.index("## Held-out samples") < report.index("## Config")
    assert "### rollout batch 0" in report and "### rollout batch 3" in report and "![score and KL](ppo.png)" in report
    assert "**reward**: rule scratchllm.train.rules:short_answer" in report
    assert f"{inputs.data}: 12 train / 7 val (4 scored per evaluation) / 5 test" in report
    test = read_jsonl(run / "test.jsonl")
    assert len(test) == 5 and all("instruction" in t and "output" not in t for t in test)
    best = json.loads((run / "best" / "meta.json").read_text())
    top = max(r["score"] for r in val)
    assert best["best_metric"] == "score" and best["step"] == next(r["step"] for r in val if r["score"] == top)


def test_the_rules_score_is_the_rule_of_the_answer_minus_the_missing_eos_penalty(runs):
    """Held-out answers of a random model run to the 8-token cap: short_answer - 1 each."""
    run, _ = runs("full")
    for s in read_jsonl(run / "samples.jsonl"):
        assert s["score"] == pytest.approx(rules.short_answer(s["prompt"], s["response"]) - 1.0)


def test_rollout_batch_k_uses_the_learning_rate_of_step_k_minus_1(runs):
    run, _ = runs("separate")  # --schedule linear, --lr 1e-2, 3 rollout batches
    lrs = [r["lr"] for r in records(run, "train")]
    assert lrs == pytest.approx([lr_at(k, max_lr=1e-2, warmup_steps=0, max_steps=3, schedule="linear")
                                 for k in range(3)])


@pytest.mark.parametrize("extra", [
    ["--whiten-rewards", "--kl-kind", "k3"],
    ["--template", "alpaca"],
    ["--temperature", "0.5", "--gamma", "0.9", "--lam", "0.8", "--ppo-epochs", 1, "--mini-batch-size", 4],
    ["--lora-rank", 2, "--value-head", "separate"],
], ids=["whiten-k3", "alpaca", "temperature-gae", "lora-separate"])
def test_other_settings_run(inputs, tmp_path, extra):
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--lr", "1e-2", *extra, steps=2))
    assert rc == 0, out
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert all(math.isfinite(r[k]) for k in TRAIN_KEYS), r
    assert train[0]["kl"] == 0.0
    state = torch.load(run / "step_0000002" / "train_state.pt", map_location="cpu", weights_only=True)
    epochs = 1 if "--ppo-epochs" in extra else 4
    per_batch = 1 if "--ppo-epochs" in extra else 2
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {2 * epochs * per_batch}


def test_long_prompts_keep_their_last_tokens_and_are_counted(inputs, tmp_path):
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--max-length", 6, "--eval-prompts", 0, steps=1))
    assert rc == 0, out
    assert "12 train / 7 val (0 scored per evaluation) / 5 test; 19 prompts cut to their last 6 tokens" in \
        (run / "report.md").read_text()


def test_prompt_and_chat_records_and_the_held_out_test_file(inputs, tmp_path):
    """JSONL with a prompt field or messages (a final assistant turn dropped): test.jsonl holds the
    held-out prompts in a form read_prompts reads back."""
    recs = []
    for i in range(20):
        w = WORDS[i % len(WORDS)]
        if i % 2:
            recs.append({"prompt": f"Say something about the {w}."})
        else:
            recs.append({"messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": f"And the {w}?"},
                                      {"role": "assistant", "content": "An old answer."}]})
    data = write_jsonl(tmp_path / "prompts.jsonl", recs)
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--eval-prompts", 2, steps=1) + ["--prompts", data])
    assert rc == 0, out
    test = read_prompts(str(run / "test.jsonl"))
    assert len(test) == 4  # 20 x 0.2
    originals = {tuple((m["role"], m["content"]) for m in c.messages) for c in read_prompts(str(data))}
    for c in test:
        assert tuple((m["role"], m["content"]) for m in c.messages) in originals
        assert c.messages[-1]["role"] == "user"
    samples = read_jsonl(run / "samples.jsonl")
    assert samples and all(s["prompt"].startswith(("Say something", "And the")) for s in samples)


# --------------------------------------------------------------------------------------------- resume
def _train_lines(run) -> dict[int, dict]:
    return {r["step"]: r for r in records(run, "train")}


def test_resume_restores_policy_value_and_the_adaptive_kl_coef(inputs, tmp_path):
    """4 rollout batches in one go == 2, then --resume to 4 (every RNG restored): the same scores, KL,
    value losses and adapted kl_coef, which only match when the policy, the value head and kl_coef
    come back from the checkpoint."""
    extra = ["--lr", "1e-2", "--target-kl", "0.5", "--kl-horizon", 8, "--checkpoint-every", 2]
    straight, split = tmp_path / "straight", tmp_path / "split"
    rc, out = run_cli(*ppo_args(inputs, straight, *extra, steps=4))
    assert rc == 0, out
    rc, out = run_cli(*ppo_args(inputs, split, *extra, steps=2))
    assert rc == 0, out
    rc, out = run_cli(*ppo_args(inputs, split, *extra, "--resume", steps=4))
    assert rc == 0, out
    assert "resumed from" in out
    a, b = _train_lines(straight), _train_lines(split)
    assert sorted(b) == [1, 2, 3, 4]
    coefs = [a[k]["kl_coef"] for k in (1, 2, 3, 4)]
    assert coefs[0] == 0.05 and coefs[2] != 0.05 and len(set(coefs)) > 1  # it adapts
    for k in (3, 4):
        for key in ("kl_coef", "score", "kl", "value_loss", "entropy", "policy_loss", "response_length"):
            assert b[k][key] == pytest.approx(a[k][key], rel=1e-5, abs=1e-7), (k, key)
    assert b[3]["value_loss"] > 0  # a restarted (zero) value head would show here
    va, vb = {r["step"]: r for r in records(straight, "val")}, {r["step"]: r for r in records(split, "val")}
    assert vb[4]["score"] == pytest.approx(va[4]["score"])
    for f in ("model.safetensors", "value.safetensors"):
        x, y = tensors(straight / "step_0000004" / f), tensors(split / "step_0000004" / f)
        assert set(x) == set(y)
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["separate", "lora"])
def test_resume_of_a_separate_value_network_or_lora_adapters(runs, inputs, tmp_path, name):
    """A separate value network (value_model.*) and LoRA adapters (save="trainable", checked against the
    base) come back on --resume: the run continues from step 3 with the state it had."""
    import shutil

    run, _ = runs(name)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    extra, reward = RUNS[name]
    rc, out = run_cli(*ppo_args(inputs, copy, *extra, "--resume", reward=reward, steps=4))
    assert rc == 0, out
    assert "resumed from" in out and "(step 3," in out
    assert [r["step"] for r in records(copy, "train")] == [1, 2, 3, 4]
    for f in ("model.safetensors", "value.safetensors"):
        assert set(tensors(copy / "step_0000004" / f)) == set(tensors(run / "step_0000003" / f))


def test_resumed_run_keeps_the_earlier_held_out_samples(runs, inputs, tmp_path):
    import shutil

    run, _ = runs("trained")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    extra, reward = RUNS["trained"]
    rc, out = run_cli(*ppo_args(inputs, copy, *extra, "--resume", reward=reward, steps=4))
    assert rc == 0, out
    steps = sorted({s["step"] for s in read_jsonl(copy / "samples.jsonl")})
    assert steps == [0, 2, 3, 4]


# --------------------------------------------------------------------------------------------- learning
def test_a_tiny_model_learns_a_bandit(inputs, tmp_path):
    """One new token, reward 1 when it starts with an ASCII letter (~1 in 5 of the 300 ids): the mean
    score of the last rollout batches climbs well above that of the first ones."""
    run = tmp_path / "run"
    rc, out = run_cli("ppo", "--model", inputs.base, "--prompts", inputs.data, "--out", run, "--max-steps", 12,
                      "--batch-size", 8, "--mini-batch-size", 4, "--max-new-tokens", 1, "--missing-eos-penalty", 0,
                      "--eval-prompts", 0, "--lr", "3e-2", *SPLIT, *FAST, "--reward", f"{RULES}:letter")
    assert rc == 0, out
    scores = [r["score"] for r in records(run, "train")]
    first, last = sum(scores[:3]) / 3, sum(scores[-4:]) / 4
    assert last > first + 0.4 and last >= 0.75, scores
    entropy = [r["entropy"] for r in records(run, "train")]
    assert entropy[-1] < entropy[0] - 0.5  # the policy sharpened


# --------------------------------------------------------------------------------------------- errors
def test_a_rule_that_raises_skips_the_batch_and_names_the_prompt(inputs, tmp_path):
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--eval-prompts", 0, reward=f"{RULES}:boom_on_fox"))
    assert rc == 0, out
    train = records(run, "train")
    skipped = [r["step"] for r in train if r["skipped"]]
    assert [r["step"] for r in train] == [1, 2, 3] and 1 <= len(skipped) < 3, (skipped, out)
    lines = [x for x in out.splitlines() if "skipped:" in x]
    assert len(lines) == len(skipped)
    for step, line in zip(skipped, lines):
        assert line.startswith(f"rollout batch {step} skipped: --reward {RULES}:boom_on_fox raised ValueError: "
                               "no foxes here on the prompt of "), line
        where = line.rsplit("on the prompt of ", 1)[1]
        index = int(where.rsplit("[", 1)[1].rstrip("]"))
        assert where.startswith(str(inputs.data)) and "fox" in json.dumps(inputs.recs[index])
    for r in train:
        if r["skipped"]:
            assert r["count"] == 0 and "score" not in r
        else:
            assert r["count"] == 4 and isinstance(r["score"], float)
    assert f"**skipped steps**: {len(skipped)}" in (run / "report.md").read_text()


def test_a_rule_that_always_raises_stops_after_max_bad_steps(inputs, tmp_path):
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--eval-prompts", 0, "--max-bad-steps", 2, reward=f"{RULES}:always_boom",
                                steps=5))
    assert rc == 2
    assert "error: 2 rollout batches in a row were skipped (last: --reward ppo_test_rules:always_boom raised " \
           "RuntimeError: this rule is broken on the prompt of " in out
    assert "fix the reward function" in out
    assert out.count("skipped: --reward") == 2


def test_a_rule_that_raises_on_a_held_out_prompt_stops_with_its_name(inputs, tmp_path):
    rc, out = run_cli(*ppo_args(inputs, tmp_path / "run", reward=f"{RULES}:always_boom"))
    assert rc == 2
    assert f"error: held-out evaluation: --reward {RULES}:always_boom raised RuntimeError" in out
    assert f"on the prompt of {inputs.data}[" in out


def test_a_runaway_kl_stops_naming_the_last_good_checkpoint(inputs, tmp_path):
    """k3 (never negative) is exactly 0 on the first batch (policy == reference) and positive after
    updates at a high lr: the second batch is over --max-kl 1e-6."""
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--lr", "5e-2", "--kl-kind", "k3", "--max-kl", "1e-6",
                                "--checkpoint-every", 1, "--eval-prompts", 0, steps=5))
    assert rc == 2, out
    assert "error: the KL to the reference reached" in out and "at rollout batch 2 (over --max-kl 1e-06)" in out
    assert f"Last good checkpoint: step_0000001 in {run}" in out and "--resume" in out
    assert (run / "step_0000001").is_dir() and not (run / "step_0000002").exists()


@pytest.mark.parametrize("extra, says", [
    (["--reward-model", "somewhere"], "give exactly one of --reward-model"),
    ([], "give exactly one of --reward-model"),
    (["--batch-size", 6, "--mini-batch-size", 4], "--batch-size 6 (prompts per rollout batch) must be a multiple of "
                                                  "--mini-batch-size 4"),
    (["--value-head", "separate", "--value-init", "reward"], "--value-init reward needs --value-head separate and "
                                                             "--reward-model"),
])
def test_the_cli_refuses_bad_settings(inputs, tmp_path, extra, says):
    reward = None if extra == [] else f"{RULES}:length"
    args = ppo_args(inputs, tmp_path / "run", reward=reward)
    rc, out = run_cli(*args, *extra)
    assert rc == 2 and says in out, out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------- reward models
PAIR_ANSWERS = (["yes good", "good yes", "yes yes good"], ["no bad", "bad no", "no no bad"])


def pair_records(n=24) -> list[dict]:
    return [{"instruction": f"Is the {WORDS[i % len(WORDS)]} nice?", "input": "",
             "chosen": PAIR_ANSWERS[0][i % 3], "rejected": PAIR_ANSWERS[1][i % 3]} for i in range(n)]


def train_reward_model(base, folder):
    data = write_jsonl(folder / "pairs.jsonl", pair_records())
    rc, out = run_cli("reward", "train", "--model", base, "--data", data, "--out", folder / "rm", "--max-steps", 4,
                      "--batch-size", 4, "--lr", "3e-3", "--eval-every", 4, "--checkpoint-every", 4,
                      "--split", 0.6, 0.2, 0.2, *FAST)
    assert rc == 0, out
    return folder / "rm"


@pytest.fixture(scope="module")
def reward_model(inputs, tmp_path_factory):
    """A reward model trained on the policy's own base model (same tokenizer, ChatML)."""
    return train_reward_model(inputs.base, tmp_path_factory.mktemp("rm_same"))


@pytest.fixture(scope="module")
def foreign_reward_model(tmp_path_factory):
    """A reward model on a base saved with another tokenizer (trained on other text, same specials)."""
    from open_weights_helpers import CHAT_SPECIALS

    from scratchllm.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("rm_foreign")
    text = "yes good no bad " * 20 + "Is the cat nice? Is the dog nice? sun sea tree fox bird rain " * 10
    tok = train_bpe([text], vocab_size=300, special_tokens=CHAT_SPECIALS, name="other")
    base = base_model(tok, folder / "base", chat=FORMATS["chatml"], seed=3)
    return train_reward_model(base, folder), tok


def _conversations(inputs) -> dict[str, Conversation]:
    return {c.where: c for c in read_prompts(str(inputs.data))}


def _rm_scores(rm_folder, inputs, samples) -> torch.Tensor:
    from scratchllm.train.reward import RewardModel

    rm = RewardModel.load(rm_folder)
    convs = _conversations(inputs)
    return rm.score([Conversation(convs[s["where"]].messages + ({"role": "assistant", "content": s["response"]},),
                                  s["where"]) for s in samples])


def test_a_reward_model_with_the_policys_tokenizer_scores_rollouts(inputs, reward_model, tmp_path):
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--reward-model", reward_model, "--lr", "1e-2", reward=None))
    assert rc == 0, out
    report = (run / "report.md").read_text()
    assert f"**reward**: reward model {reward_model / 'best'}" in report
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(isinstance(r["score"], float) and math.isfinite(r["score"]) for r in train)
    assert len({r["score"] for r in train}) > 1  # a learned, text-dependent score
    assert all(isinstance(r["score"], float) for r in records(run, "val"))


def test_a_reward_model_with_another_tokenizer_needs_retokenize(inputs, foreign_reward_model, tmp_path):
    rm, _ = foreign_reward_model
    rc, out = run_cli(*ppo_args(inputs, tmp_path / "refused", "--reward-model", rm, reward=None))
    assert rc == 2
    assert "has another tokenizer than the policy" in out and "--retokenize" in out
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--reward-model", rm, "--retokenize", "--missing-eos-penalty", 0,
                                reward=None))
    assert rc == 0, out
    assert f"**reward**: reward model {rm / 'best'}" in (run / "report.md").read_text()
    assert all(math.isfinite(r["score"]) for r in records(run, "train"))
    # the held-out scores are the reward model's scores of prompt + decoded answer, re-tokenized by it
    samples = read_jsonl(run / "samples.jsonl")
    want = _rm_scores(rm, inputs, samples)
    torch.testing.assert_close(torch.tensor([s["score"] for s in samples]), want, rtol=0, atol=1e-4)


def test_value_init_reward_refuses_a_reward_model_with_another_tokenizer(inputs, foreign_reward_model, tmp_path):
    rm, _ = foreign_reward_model
    rc, out = run_cli(*ppo_args(inputs, tmp_path / "run", "--reward-model", rm, "--retokenize", "--value-head",
                                "separate", "--value-init", "reward", reward=None, steps=1))
    assert rc == 2 and "tokenizer" in out, out


def ending_policy(inputs, folder):
    """The base model edited so that it always answers <|im_end|> at once (an empty answer that ends its
    turn): the final norm outputs 10 e_0 everywhere and only <|im_end|>'s embedding has a 0th component."""
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.weights.folder import save_model

    torch.manual_seed(0)
    model = GPT(ModelConfig(**TINY))
    with torch.no_grad():
        ln = model.transformer.ln_f
        ln.weight.zero_()
        ln.bias.zero_()
        ln.bias[0] = 10.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[inputs.eot, 0] = 50.0
    return save_model(model, inputs.tokenizer, folder, chat=FORMATS["chatml"])


def test_an_ended_answer_gets_the_reward_models_score_of_the_conversation(inputs, reward_model, tmp_path):
    """Same tokenizer and format: the score is still that of prompt + answer rendered as the reward model's
    training answers were (ChatML ends a turn with <|im_end|>\\n, not just the policy's <|im_end|>)."""
    policy = ending_policy(inputs, tmp_path / "policy")
    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--reward-model", reward_model, "--max-steps", 1, "--eval-every", 1,
                                reward=None) + ["--model", policy])
    assert rc == 0, out
    train = records(run, "train")
    assert train[0]["ended"] == 1.0 and train[0]["response_length"] == 1.0  # the edit works: just <|im_end|>
    samples = read_jsonl(run / "samples.jsonl")
    assert samples and all(s["response"] == "" for s in samples)
    want = _rm_scores(reward_model, inputs, samples)
    torch.testing.assert_close(torch.tensor([s["score"] for s in samples]), want, rtol=0, atol=1e-4)


def test_value_init_reward_starts_the_value_network_from_the_reward_model(inputs, reward_model, tmp_path):
    from scratchllm.train.reward import RewardModel

    run = tmp_path / "run"
    rc, out = run_cli(*ppo_args(inputs, run, "--reward-model", reward_model, "--value-head", "separate",
                                "--value-init", "reward", "--lr", "1e-12", reward=None, steps=1))
    assert rc == 0, out
    value = tensors(run / "step_0000001" / "value.safetensors")
    rm = RewardModel.load(reward_model).model.state_dict()
    assert value["value_model.head.weight"].shape == rm["head.weight"].shape
    assert {k.removeprefix("value_model.") for k in value} <= set(rm) and len(value) >= len(rm) - 1  # (a tied head once)
    for k, v in value.items():  # lr 1e-12: the value network is still the reward model after one batch
        torch.testing.assert_close(v, rm[k.removeprefix("value_model.")], rtol=0, atol=1e-9)
