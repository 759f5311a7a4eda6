"""The Trainer on a tiny model: accumulation == one big batch, non-finite guard, checkpoints (pruning,
corruption, a full disk), in-process resume, and the run folder's files."""

import errno
import json
import math

import pytest
import torch
from trainer_helpers import CountingBatches, TinyLM

from scratchllm.common import IGNORE_INDEX, ScratchError
from scratchllm.configs import TrainConfig
from scratchllm.train import checkpointing
from scratchllm.train.core import Trainer
from scratchllm.train.objectives import next_token_objective


def cfg(**kw):
    base = dict(max_steps=6, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, checkpoint_every=0,
                precision="fp32", device="cpu", compile="off")
    return TrainConfig(**{**base, **kw})


def trainer(tmp_path, batches=None, seed=0, **kw):
    torch.manual_seed(seed)
    return Trainer(TinyLM(), cfg(**kw), next_token_objective, batches or CountingBatches(), out_dir=tmp_path)


class Masked(CountingBatches):
    """Micro-batches with very different numbers of valid targets (so mean-of-means would be wrong)."""

    def next_batch(self):
        x, y = super().next_batch()
        y = y.clone()
        y[:, : 1 + (self.k * 3) % self.block] = IGNORE_INDEX
        return x, y


class Joined:
    """One batch made of the next k micro-batches of another source, concatenated."""

    def __init__(self, inner, k):
        self.inner, self.k = inner, k

    def next_batch(self):
        parts = [self.inner.next_batch() for _ in range(self.k)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_accumulation_equals_one_big_batch(tmp_path):
    a = trainer(tmp_path / "a", Masked(batch_size=2), grad_accum=4, max_steps=3)
    b = trainer(tmp_path / "b", Joined(Masked(batch_size=2), 4), grad_accum=1, max_steps=3)
    for _ in range(3):
        ra, rb = a.train_step(), b.train_step()
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
        assert ra["tokens"] == rb["tokens"]
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_grad_norm_is_logged_before_clipping(tmp_path):
    t = trainer(tmp_path, grad_clip=1e-3)
    before = [p.detach().clone() for p in t.model.parameters()]
    r = t.train_step()
    assert r["grad_norm"] > 1e-3  # the pre-clip norm, not the clipped one
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def nan_on(steps):
    calls = {"n": 0}

    def objective(model, batch):
        loss, m = next_token_objective(model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in steps else loss), m
    return objective


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    t = trainer(tmp_path)
    t.objective = nan_on({2})
    t.train_step()
    before = [p.detach().clone() for p in t.model.parameters()]
    r = t.train_step()
    assert r["skipped"] and math.isnan(r["loss"]) and t.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert all(p.grad is None for p in t.model.parameters())  # nothing leaks into the next step
    assert not t.train_step()["skipped"] and t.bad_steps == 0


class InfGrad(torch.autograd.Function):
    """Identity forward (a finite loss), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def test_finite_loss_with_non_finite_gradient_is_skipped(tmp_path):
    t = trainer(tmp_path)

    def objective(model, batch):
        loss, m = next_token_objective(model, batch)
        return InfGrad.apply(loss), m

    t.objective = objective
    before = [p.detach().clone() for p in t.model.parameters()]
    r = t.train_step()
    assert math.isfinite(r["loss"]) and not math.isfinite(r["grad_norm"])
    assert r["skipped"] and t.skipped_steps == 1 and t.bad_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, t.model.parameters()))


def test_non_finite_steps_in_a_row_abort_and_keep_the_checkpoint(tmp_path):
    t = trainer(tmp_path, max_steps=20, checkpoint_every=2, max_bad_steps=3)
    t.objective = nan_on({5, 6, 7})
    with pytest.raises(ScratchError, match=r"non-finite for 3 steps in a row.*step_0000004"):
        t.fit()
    assert (tmp_path / "latest").read_text().strip() == "step_0000004"
    checkpointing.verify_checkpoint(tmp_path / "step_0000004")


def test_run_folder_files_and_pruning(tmp_path):
    val = lambda: iter([CountingBatches(seed=9).next_batch() for _ in range(2)])  # noqa: E731
    torch.manual_seed(0)
    t = Trainer(TinyLM(), cfg(max_steps=8, checkpoint_every=2, keep_last=2, eval_every=4), next_token_objective,
                CountingBatches(), out_dir=tmp_path, val_batches=val, sample_fn=lambda m: "sample text")
    summary = t.fit()
    assert summary["step"] == 8 and not summary["interrupted"]
    assert sorted(p.name for p in checkpointing.list_checkpoints(tmp_path)) == ["step_0000006", "step_0000008"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000008"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "loss" in r for r in records)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9)) and all(r["tokens_per_s"] > 0 for r in train)
    assert [r["step"] for r in records if r["split"] == "val"] == [0, 4, 8]
    assert train[-1]["tokens"] == 8 * 4 * 8
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "final validation**: loss" in (tmp_path / "report.md").read_text()


def test_resume_in_process_is_bit_exact(tmp_path):
    full = trainer(tmp_path / "full", max_steps=8)
    full.fit()
    part = trainer(tmp_path / "part", max_steps=8, checkpoint_every=3)
    part.cfg.max_steps = 5  # stop early (as if killed after the step-3 checkpoint, with 2 steps lost)
    part.fit()
    again = trainer(tmp_path / "part", seed=123, max_steps=8)  # different init: resume must overwrite it
    assert again.resume(tmp_path / "part" / "step_0000003") == 3
    again.fit()
    for pa, pb in zip(full.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(pa, pb)
    strip = lambda rs: [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rs if r["split"] == "train"]  # noqa: E731
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(tmp_path / "full")) == strip(read(tmp_path / "part"))


def test_corrupted_checkpoint_names_the_file(tmp_path):
    trainer(tmp_path, max_steps=2).fit()
    f = tmp_path / "step_0000002" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ScratchError, match=r"model\.safetensors does not match its sha256"):
        trainer(tmp_path).resume(tmp_path)
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    checkpointing.verify_checkpoint(tmp_path / "step_0000002")  # restored: fine again
    (tmp_path / "step_0000002" / "train_state.pt").write_bytes(b"short")
    with pytest.raises(ScratchError, match=r"train_state\.pt does not match its size"):
        checkpointing.verify_checkpoint(tmp_path / "step_0000002")


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    t = trainer(tmp_path, max_steps=4, checkpoint_every=2)
    real_save = torch.save

    def full_disk(obj, path, *a, **kw):
        if "step_0000004" in str(path) or ".step_0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(ScratchError, match=r"step_0000004 .* failed .*No space left.*step_0000002\) is intact"):
        t.fit()
    assert (tmp_path / "latest").read_text().strip() == "step_0000002"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folder left
    monkeypatch.undo()
    fresh = trainer(tmp_path, max_steps=4)
    assert fresh.resume(tmp_path) == 2


@pytest.mark.parametrize("kw, msg", [
    (dict(lr=float("inf")), r"train.lr must be a finite number \(got inf\)"),
    (dict(lr=float("nan")), r"train.lr must be a finite number"),
    (dict(grad_clip=float("nan")), r"train.grad_clip must be a finite number"),
    (dict(weight_decay=-1.0), r"train.weight_decay must be >= 0 \(got -1.0\)"),
    (dict(beta2=1.0), r"beta1 and train.beta2 must be in \[0, 1\)"),
])
def test_bad_hyperparameters_are_refused_up_front(kw, msg):
    with pytest.raises(ScratchError, match=msg):
        cfg(**kw)


def test_non_finite_weights_are_never_saved(tmp_path):
    t = trainer(tmp_path, max_steps=4, checkpoint_every=2)
    t.fit()
    with torch.no_grad():
        t.model.fc.weight[0, 0] = float("nan")
    with pytest.raises(ScratchError, match=r"weights are not finite at step 4 \(fc.weight\).*step_0000004\) is intact"):
        t.save()
    with pytest.raises(ScratchError, match=r"weights are not finite.*best not written"):
        t.save_best({"loss": 1.0})
    assert (tmp_path / "latest").read_text().strip() == "step_0000004"
    checkpointing.verify_checkpoint(tmp_path / "step_0000004")


def test_temp_folders_of_a_killed_save_are_cleaned_up(tmp_path):
    trainer(tmp_path, max_steps=2).fit()
    for name in (".step_0000003.tmp-abc123", ".best.tmp-xyz", ".step_0000002.old-999"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_state.pt").write_bytes(b"")  # what SIGKILL mid-save leaves
    (tmp_path / ".keep-me").mkdir()  # not ours: untouched
    t = trainer(tmp_path, max_steps=4, checkpoint_every=2)
    t.resume(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".keep-me"]
    (tmp_path / ".step_0000004.tmp-def").mkdir()
    t.fit()  # the next save cleans up too
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".keep-me"]


def test_run_files_follow_the_umask(tmp_path, monkeypatch):
    import stat

    from scratchllm import common

    monkeypatch.setattr(common, "_UMASK", 0o022)  # the process's umask, read once at import
    trainer(tmp_path, max_steps=2, eval_every=1).fit()
    step = tmp_path / "step_0000002"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [step, *step.iterdir(), *tmp_path.iterdir()]}
    assert modes["step_0000002"] == 0o755
    assert {modes[n] for n in ("metrics.jsonl", "report.md", "loss.png", "latest", "model.safetensors",
                               "train_state.pt", "meta.json")} == {0o644}
