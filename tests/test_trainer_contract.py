"""The Trainer contract for stages that are not language modelling: a toy classification objective
(frozen backbone, adapter + new head) reports accuracy in metrics.jsonl, keeps RUN_DIR/best/, stops
early, saves only what trains and resumes bit-exactly on top of its base; plus metric reduction,
frozen models and custom optimisation loops. The 2-process DDP twin is in test_trainer_contract_ddp.py."""

import json
import math

import pytest
import torch
from classify_helpers import Batches, base_model, classification_objective, classifier, val_set
from safetensors.torch import load_file
from trainer_helpers import CountingBatches, TinyLM

from scratchllm.common import ScratchError
from scratchllm.configs import TrainConfig
from scratchllm.train import checkpointing
from scratchllm.train.core import Trainer
from scratchllm.train.objectives import next_token_objective


def cfg(**kw):
    base = dict(max_steps=12, lr=3e-2, warmup_steps=0, schedule="constant", eval_every=2, checkpoint_every=0,
                best_metric="accuracy", best_mode="max", precision="fp32", device="cpu", compile="off")
    return TrainConfig(**{**base, **kw})


def classify_trainer(out, model=None, **kw):
    return Trainer(model or classifier(), cfg(**kw), classification_objective, Batches(), out_dir=out,
                   val_batches=val_set(), save="trainable")


def records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def best_acc(val):
    return max(r["accuracy"] for r in val)


def test_classification_reports_accuracy_keeps_best_and_stops_early(tmp_path):
    t = classify_trainer(tmp_path, max_steps=200, patience=3)
    summary = t.fit()
    val = [r for r in records(tmp_path) if r["split"] == "val"]
    train = [r for r in records(tmp_path) if r["split"] == "train"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in val + train)
    assert val[0]["accuracy"] < 0.6 and best_acc(val) > 0.9  # it learned the task
    # early stop: 3 evaluations after the best one, a normal end (not an interruption)
    best = max(val, key=lambda r: (r["accuracy"], -r["step"]))
    assert summary["early_stopped"] and not summary["interrupted"] and summary["step"] < 200
    assert summary["step"] == best["step"] + 3 * 2 and val[-1]["step"] == summary["step"]
    assert summary["best"]["value"] == best_acc(val) and summary["best"]["step"] == best["step"]
    report = (tmp_path / "report.md").read_text()
    assert "stopped early" in report and "did not improve for 3 evaluations" in report and "val accuracy" in report
    # best/: model files of the best evaluation, checksummed, never pruned; a normal checkpoint at the end
    meta = checkpointing.verify_checkpoint(tmp_path / "best")
    assert meta["step"] == best["step"] and meta["metrics"]["accuracy"] == best_acc(val)
    assert checkpointing.list_checkpoints(tmp_path)[-1].name == f"step_{summary['step']:07d}"
    # resuming an early-stopped run does nothing more
    again = classify_trainer(tmp_path, max_steps=200, patience=3)
    again.resume(tmp_path)
    assert again.fit()["step"] == summary["step"]


def test_only_head_and_adapter_are_saved_and_load_on_the_base(tmp_path):
    t = classify_trainer(tmp_path, max_steps=4)
    t.fit()
    ckpt = tmp_path / "step_0000004"
    saved = load_file(str(ckpt / "model.safetensors"))
    assert set(saved) == {"adapter.A.weight", "adapter.B.weight", "head.weight", "head.bias"}
    meta = checkpointing.verify_checkpoint(ckpt)
    assert meta["base_fingerprint"] == checkpointing.base_fingerprint(classifier())
    # base + adapter folder = the trained model (a fresh head/adapter init is overwritten)
    x = torch.randint(0, 32, (5, 6))
    fresh = checkpointing.load_partial(classifier(seed=99), tmp_path)
    torch.testing.assert_close(fresh.classify(x), t.model.classify(x), rtol=0, atol=0)
    best = checkpointing.load_partial(classifier(seed=99), tmp_path / "best")
    assert best.head.weight.shape == (2, 48)


def test_partial_run_resumes_bit_exactly(tmp_path):
    full = classify_trainer(tmp_path / "full", max_steps=8)
    full.fit()
    part = classify_trainer(tmp_path / "part", max_steps=8, checkpoint_every=3)
    part.cfg.max_steps = 5  # stop early (as if killed after the step-3 checkpoint)
    part.fit()
    again = classify_trainer(tmp_path / "part", model=classifier(seed=7), max_steps=8)
    assert again.resume(tmp_path / "part" / "step_0000003") == 3
    again.fit()
    for (name, a), b in zip(full.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name
    strip = lambda rs: [(r["step"], r["split"], r["loss"], r["accuracy"]) for r in rs]  # noqa: E731
    assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "part"))


def test_a_different_base_is_refused_naming_both_fingerprints(tmp_path):
    classify_trainer(tmp_path, max_steps=2).fit()
    other = classifier(base_seed=5)
    want = checkpointing.base_fingerprint(classifier())
    have = checkpointing.base_fingerprint(other)
    with pytest.raises(ScratchError, match=f"base fingerprint is {want}.*given now is {have}"):
        checkpointing.load_partial(other, tmp_path)
    with pytest.raises(ScratchError, match=f"different base model.*{want}.*{have}"):
        classify_trainer(tmp_path, model=classifier(base_seed=5)).resume(tmp_path)
    # a full run cannot resume a partial checkpoint, nor the other way round
    with pytest.raises(ScratchError, match="holds only trainable parameters"):
        Trainer(classifier(), cfg(), classification_objective, Batches(), out_dir=tmp_path / "x",
                val_batches=val_set()).resume(tmp_path)


def test_unknown_best_metric_is_a_clear_error(tmp_path):
    t = classify_trainer(tmp_path, best_metric="f1")
    with pytest.raises(ScratchError, match=r"best_metric 'f1' is not a validation metric.*loss, accuracy"):
        t.fit()


@pytest.mark.parametrize("kw, msg", [
    (dict(patience=-1), r"patience must be >= 0"),
    (dict(best_mode="up"), r"best_mode 'up'"),
    (dict(patience=2, best_metric=""), r"patience needs train.best_metric"),
    (dict(patience=2, eval_every=0), r"patience counts evaluations"),
])
def test_bad_early_stopping_settings(kw, msg):
    with pytest.raises(ScratchError, match=msg):
        cfg(**kw)


def test_metric_pairs_counts_and_the_whole_validation_set(tmp_path):
    seen = []

    def objective(model, batch):
        x, y = batch
        loss, m = next_token_objective(model, batch)
        seen.append(len(x))
        # a ratio with its own denominator: rows whose first target is even, per row
        even = ((y[:, 0] % 2) == 0).sum()
        return loss, {**m, "even_rows": (even, len(x)), "rows": len(x)}

    data = [CountingBatches(seed=s).next_batch() for s in range(5)]
    torch.manual_seed(0)
    t = Trainer(TinyLM(), cfg(eval_batches=0, best_metric="loss", best_mode="min"), objective, CountingBatches(),
                out_dir=tmp_path, val_batches=lambda: iter(data))
    seen.clear()
    val = t.evaluate()
    assert len(seen) == 5  # eval_batches=0: every validation batch
    ys = torch.cat([y for _, y in data])
    assert val["count"] == ys.numel()
    assert val["even_rows"] == pytest.approx(((ys[:, 0] % 2) == 0).float().mean().item())
    assert val["rows"] == pytest.approx(len(ys) / ys.numel())  # a plain metric is per count
    step = t.train_step()
    assert step["count"] == 4 * 8 and "even_rows" in step


def test_frozen_models_are_passed_never_trained_or_saved(tmp_path):
    torch.manual_seed(3)
    ref = TinyLM().train()
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    calls = []

    def objective(model, batch, ref):
        assert not ref.training and not any(p.requires_grad for p in ref.parameters())
        with torch.no_grad():
            ref_logits = ref(batch[0])
        loss, m = next_token_objective(model, batch)
        calls.append(ref_logits.shape)
        return loss + 0.0 * ref_logits.sum(), m

    torch.manual_seed(0)
    t = Trainer(TinyLM(), cfg(max_steps=3, eval_every=0), objective, CountingBatches(), out_dir=tmp_path,
                frozen={"ref": ref})
    t.fit()
    assert len(calls) == 3
    assert all(torch.equal(ref_before[k], v) for k, v in ref.state_dict().items())
    opt_params = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in ref.parameters()}
    saved = load_file(str(tmp_path / "step_0000003" / "model.safetensors"))
    assert set(saved) == set(t.model_state())  # the trained model's tensors only


def test_a_frozen_model_on_another_device_is_refused(tmp_path):
    with torch.device("meta"):
        elsewhere = TinyLM()
    with pytest.raises(ScratchError, match=r"frozen model 'ref' lives on meta but training runs on cpu"):
        Trainer(TinyLM(), cfg(), next_token_objective, CountingBatches(), out_dir=tmp_path, frozen={"ref": elsewhere})
    shared = TinyLM()
    with pytest.raises(ScratchError, match="shares parameters"):
        Trainer(shared, cfg(), next_token_objective, CountingBatches(), out_dir=tmp_path, frozen={"ref": shared})


def test_a_custom_loop_of_optimizer_steps_keeps_checkpoints_and_logs(tmp_path):
    """A PPO-like stage: each iteration makes its own micro-batches and runs two optimizer steps."""
    torch.manual_seed(0)
    source = CountingBatches(seed=4)
    t = Trainer(TinyLM(), cfg(max_steps=9, checkpoint_every=4, eval_every=0), next_token_objective, source,
                out_dir=tmp_path)

    def iteration():
        rollout = [source.next_batch() for _ in range(2)]  # "rollouts", then 2 epochs of 1-batch steps
        last = {}
        for _ in range(2):
            for mb in rollout:
                last = t.optimizer_step([mb])
        return last

    summary = t.fit(iteration)
    assert summary["step"] == 12 and not summary["interrupted"]  # 3 iterations of 4 steps reach 9
    steps = [r["step"] for r in records(tmp_path) if r["split"] == "train"]
    assert steps == [4, 8, 12]
    names = [p.name for p in checkpointing.list_checkpoints(tmp_path)]
    assert names == ["step_0000004", "step_0000008", "step_0000012"]
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path))
    with pytest.raises(ScratchError, match="no micro-batches"):
        t.optimizer_step([])


def test_objective_without_count_is_a_clear_error(tmp_path):
    def objective(model, batch):
        loss, _ = next_token_objective(model, batch)
        return loss, {"n": 1}

    t = Trainer(TinyLM(), cfg(), objective, CountingBatches(), out_dir=tmp_path)
    with pytest.raises(ScratchError, match=r"returned no metrics\['count'\]"):
        t.train_step()


def test_base_model_fingerprint_ignores_trainable_parts():
    a, b = classifier(seed=1), classifier(seed=2)
    assert checkpointing.base_fingerprint(a) == checkpointing.base_fingerprint(b)
    assert checkpointing.base_fingerprint(a) != checkpointing.base_fingerprint(classifier(base_seed=3))
    assert base_model(0).wte.weight.requires_grad  # the helper's backbone is trainable until wrapped


@pytest.mark.slow
def test_objective_methods_run_through_torch_compile(tmp_path):
    """`model.classify(...)` in the objective runs through the compiled wrapper, with the same numbers."""
    eager = classify_trainer(tmp_path / "eager", max_steps=3)
    compiled = classify_trainer(tmp_path / "compiled", max_steps=3, compile="on")
    for _ in range(3):
        a, b = eager.train_step(), compiled.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]
    for name, p in eager.model.named_parameters():
        torch.testing.assert_close(p, dict(compiled.model.named_parameters())[name], rtol=1e-4, atol=1e-5)
