"""The one training loop every stage runs on: `Trainer(model, cfg, objective, batches, out_dir=...).fit()`.

What it does: a stage supplies a model, a batch source (anything with `next_batch()`, plus
`state_dict()/load_state_dict()` to resume exactly) and an objective `(model, batch) -> (loss_sum,
metrics)` whose `metrics["count"]` says how many items the sum covers (see objectives.py). Each
optimizer step accumulates micro-batches (DDP gradient sync only on the last), divides the gradients
once by the step's total count over all ranks, logs the pre-clip gradient norm, clips, and steps AdamW
with the scheduled learning rate. Non-finite steps are skipped and counted; K in a row abort.

Every other numeric value in `metrics` is summed over micro-batches and ranks and reported divided by
`count` (a value given as a pair `(sum, denominator)` is divided by its own summed denominator;
`count` and `tokens` are reported as totals), in training and in evaluation alike. The Trainer
evaluates (the objective's own metrics), keeps the best model by one validation metric in
`RUN_DIR/best/` and can stop early when it stops improving, samples, checkpoints (every N steps, at
the end, on SIGINT/SIGTERM), writes metrics.jsonl / loss.png / report.md, and prints progress on
rank 0 only.

What a stage may add: frozen models (a DPO/PPO reference, a reward model: on the device, eval mode,
no gradients, never saved; passed to the objective as keyword arguments), `save="trainable"` to
checkpoint only the parameters that train (a new head, LoRA adapters) on top of base weights it
fingerprints, and its own iteration (`fit(step_fn)`) built on the public `optimizer_step`.
The objective sees the model through the DDP/compiled wrapper: `model(...)` and every method the
model class defines (`model.hidden_states(...)`) run through it, so gradients stay synchronised.
What it does not do: build models or data (stages do), or know any stage's loss.

    trainer = Trainer(model, TrainConfig(max_steps=100), next_token_objective, sampler,
                      out_dir="runs/x", val_batches=lambda: eval_batches(val, 128, 8))
    trainer.resume("runs/x")   # optional: model, optimizer, RNGs, sampler position
    summary = trainer.fit()
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scratchllm.common import (
    Progress,
    ScratchError,
    atomic_dir,
    print0,
    select_device,
    select_precision,
    torch_dtype,
)
from scratchllm.configs import TrainConfig
from scratchllm.train import checkpointing as ckpt
from scratchllm.train.optim import build_optimizer, lr_at, set_lr
from scratchllm.train.runlog import MetricsLog, plot_loss, read_metrics, write_report
from scratchllm.weights.state import load_state_dict_checked, read_latest, read_safetensors, state_to_save

TOTALS = ("count", "tokens")  # metrics reported as sums; every other one is divided by its denominator


def init_distributed(device: str = "auto") -> str:
    """Start the process group when launched by torchrun (gloo on CPU, nccl on CUDA); return the device
    this rank uses ('cuda:LOCAL_RANK' on GPUs). A plain single process needs nothing."""
    device = select_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device.startswith("cuda")
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        if cuda:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
    return device


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def write_safetensors(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """The default model writer: `folder/model.safetensors` from an unwrapped, de-duplicated state dict."""
    from scratchllm.weights.folder import save_weights

    save_weights(folder, state)


class _Methods(nn.Module):
    """Routes `model.METHOD(...)` through one forward, so DDP, FSDP and torch.compile see every call an
    objective makes (calling `ddp.module.hidden_states` directly would skip the gradient sync)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, *args, **kwargs):
        return getattr(self.model, method)(*args, **kwargs)


class ModelView:
    """What an objective receives as `model`: calls go through the wrapper, attributes (config) do not."""

    def __init__(self, wrapped: nn.Module, model: nn.Module):
        self._wrapped, self._model = wrapped, model

    def __call__(self, *args, **kwargs):
        return self._wrapped("forward", *args, **kwargs)

    def __getattr__(self, name):
        attr = getattr(self._model, name)
        if callable(attr) and not hasattr(nn.Module, name) and not isinstance(attr, nn.Module):
            return functools.partial(self._wrapped, name)  # a method of the model's own class
        return attr


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, objective: Callable, train_batches, *,
                 out_dir: str | Path, val_batches: Callable[[], Iterable] | None = None,
                 sample_fn: Callable[[torch.nn.Module], str] | None = None,
                 write_model: Callable[[Path, dict], None] = write_safetensors, flops_per_token: float | None = None,
                 peak_flops: float | None = None, info: dict | None = None, fsdp: bool = False,
                 frozen: dict[str, torch.nn.Module] | None = None, save: str = "all",
                 derived_metrics: Callable[[dict], dict] | None = None,
                 train_eval_batches: Callable[[], Iterable] | None = None, count_label: str | None = None,
                 read_model: Callable[[Path], dict] | None = None):
        """`frozen`: auxiliary models passed to the objective as keyword arguments. `save`: "all" or
        "trainable" (only parameters with requires_grad, plus buffers; the rest is fingerprinted as the
        base). `derived_metrics`: extra metrics computed from the reduced ones (perplexity from loss).
        `train_eval_batches`: training data to evaluate at every evaluation too (split "train_eval").
        `count_label`: also show metrics["count"] per second under this label (SFT: "trained tok/s",
        beside tok/s of all tokens) and log it as count_per_s. `read_model`: the inverse of `write_model`,
        a checkpoint folder -> the state dict to resume from (default: its model.safetensors; PPO keeps
        its value network in a file of its own)."""
        if save not in ("all", "trainable"):
            raise ScratchError(f"Trainer save={save!r}: expected 'all' or 'trainable'")
        self.cfg, self.objective, self.batches = cfg, objective, train_batches
        self.out_dir, self.val_batches, self.sample_fn = Path(out_dir), val_batches, sample_fn
        self.info, self.flops_per_token, self.peak_flops = dict(info or {}), flops_per_token, peak_flops
        self.derived_metrics, self.train_eval_batches = derived_metrics, train_eval_batches
        self.count_label = count_label
        self.device = init_distributed(cfg.device)  # first: the rank and world size come from it
        self.rank, self.world = _world()
        self.precision = select_precision(cfg.precision, self.device)
        # loss and metric sums across micro-batches and ranks: float64, but MPS has no float64
        self._sum_dtype = torch.float32 if self.device.startswith("mps") else torch.float64
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
        self.model = model.to(self.device)  # the unwrapped module: what checkpoints save
        self.frozen = self._place_frozen(frozen or {})
        self.write_model = write_model  # (folder, full state dict) -> writes the model files
        self.read_model = read_model or (lambda folder: read_safetensors(folder / "model.safetensors"))
        self.save_mode = save
        self.base_fingerprint = ckpt.base_fingerprint(self.model) if save == "trainable" else None
        self.fsdp = fsdp and self.world > 1
        self.ddp = None
        self._root = wrapped = _Methods(self.model)
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in getattr(getattr(model, "transformer", None), "h", []):
                fully_shard(block)
            fully_shard(self._root)  # the root's hooks run on every routed call
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            wrapped = self.ddp = DistributedDataParallel(self._root, device_ids=ids)
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.startswith("cuda"))
        self.fwd = ModelView(torch.compile(wrapped) if use_compile else wrapped, self.model)  # never saved
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = self.tokens_seen = self.bad_steps = self.skipped_steps = 0
        self.elapsed = 0.0  # training seconds over all sessions of this run
        # the best validation value of cfg.best_metric so far, its step, and evaluations since
        self.best: dict = {"value": None, "step": None, "evals_since": 0}
        self.resumed_from: int | None = None
        self._saved_step: int | None = None  # the step whose checkpoint holds the current state
        self._stop: int | None = None

    def _place_frozen(self, frozen: dict) -> dict:
        placed = {}
        here = torch.device(self.device)
        for name, m in frozen.items():
            devices = {p.device for p in m.parameters()} | {b.device for b in m.buffers()}
            elsewhere = sorted(str(d) for d in devices if d.type != "cpu" and d != here)
            if elsewhere:
                raise ScratchError(f"frozen model {name!r} lives on {', '.join(elsewhere)} but training runs on "
                                   f"{self.device}: build it on the CPU or on {self.device}")
            if any(p is q for p in m.parameters() for q in self.model.parameters()):
                raise ScratchError(f"frozen model {name!r} shares parameters with the model being trained")
            placed[name] = m.to(self.device).eval().requires_grad_(False)
        return placed

    # ------------------------------------------------------------------ precision
    def autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=torch_dtype(self.precision))

    def _all_sum(self, values: list[float | torch.Tensor]) -> list[float]:
        t = torch.stack([torch.as_tensor(v, dtype=self._sum_dtype, device=self.device) for v in values])
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    # ------------------------------------------------------------------ metrics
    def _run_objective(self, batch) -> tuple[torch.Tensor, dict]:
        with self.autocast():
            loss, metrics = self.objective(self.fwd, _to(batch, self.device), **self.frozen)
        if "count" not in metrics:
            raise ScratchError(f"objective {getattr(self.objective, '__name__', self.objective)!r} returned no "
                               "metrics['count'] (the number of items its loss sum covers)")
        return loss, metrics

    def _accumulate(self, sums: dict, loss: torch.Tensor, metrics: dict) -> None:
        """Add one micro-batch's loss sum and metrics (values or (sum, denominator) pairs) into `sums`."""
        sums["loss"] = sums.get("loss", 0.0) + loss.detach().to(self._sum_dtype)
        for k, v in metrics.items():
            if isinstance(v, str) or v is None:
                continue  # only numbers are reduced
            num, den = v if isinstance(v, tuple) else (v, None)
            sums[k] = sums.get(k, 0.0) + torch.as_tensor(num, dtype=self._sum_dtype, device=self.device).detach()
            if den is not None:
                sums[k + "/"] = sums.get(k + "/", 0.0) + torch.as_tensor(den, dtype=self._sum_dtype,
                                                                          device=self.device)

    def _reduce(self, sums: dict, all_ranks: bool = True) -> dict:
        """Sum over ranks (one all-reduce) and divide: loss and metrics per count, pairs by their own sum."""
        keys = sorted(sums)
        values = self._all_sum([sums[k] for k in keys]) if all_ranks else [float(sums[k]) for k in keys]
        total = dict(zip(keys, values))
        count = total.get("count", 0.0)
        out = {"loss": total["loss"] / count if count > 0 else float("nan")}
        for k, v in total.items():
            if k == "loss" or k.endswith("/"):
                continue
            if k in TOTALS:
                out[k] = int(v)
            elif k + "/" in total:
                out[k] = v / total[k + "/"] if total[k + "/"] > 0 else float("nan")
            else:
                out[k] = v / count if count > 0 else float("nan")
        if self.derived_metrics:
            out.update(self.derived_metrics(out))
        return out

    # ------------------------------------------------------------------ one optimizer step
    def optimizer_step(self, micro_batches: Iterable, advance: bool = True) -> dict:
        """One optimizer step over the given micro-batches (gradients accumulated, synchronised across
        ranks on the last one, divided by the step's global count). Public so a stage can drive its own
        loop (PPO: rollouts, then several epochs of mini-batch steps); `fit()` calls it through
        `train_step()`. `advance=False` leaves the step count (and the learning rate's place in its
        schedule) alone: a stage whose step is several optimizer steps (PPO's rollout batch) then adds
        1 to `self.step` itself. Returns the step's reduced metrics plus lr, grad_norm and skipped."""
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                   schedule=cfg.schedule, min_lr=cfg.min_lr)
        set_lr(self.optimizer, lr)
        sums: dict = {}
        it = iter(micro_batches)
        batch = next(it, None)
        if batch is None:
            raise ScratchError("optimizer_step got no micro-batches")
        while batch is not None:
            following = next(it, None)  # look ahead: DDP syncs gradients on the last micro-batch only
            with self.ddp.no_sync() if (self.ddp is not None and following is not None) else nullcontext():
                loss, metrics = self._run_objective(batch)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            self._accumulate(sums, loss, metrics)
            batch = following
        sums.setdefault("tokens", sums["count"])
        out = self._reduce(sums)
        count = out["count"]
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if count > 0:  # DDP/FSDP averaged over ranks: undo that, then divide by the global count
            torch._foreach_mul_(grads, self.world / count)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        finite = math.isfinite(out["loss"]) and (math.isfinite(norm) or self.scaler is not None)
        if finite:
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += advance
        self.tokens_seen += out["tokens"]
        if self.bad_steps >= cfg.max_bad_steps:
            last = read_latest(self.out_dir) or "none yet"
            raise ScratchError(
                f"loss or gradients were non-finite for {self.bad_steps} steps in a row (up to step "
                f"{self.step}); stopped. Last good checkpoint: {last} in {self.out_dir}. Lower --lr, raise "
                f"--warmup-steps, or use --precision fp32, then resume with --resume.")
        return {**out, "lr": lr, "grad_norm": norm, "skipped": not finite}

    def train_step(self) -> dict:
        """One optimizer step over the next `cfg.grad_accum` micro-batches of the batch source."""
        return self.optimizer_step(self.batches.next_batch() for _ in range(self.cfg.grad_accum))

    # ------------------------------------------------------------------ evaluation and samples
    @torch.no_grad()
    def evaluate(self, batches: Callable[[], Iterable] | None = None) -> dict:
        """The objective's metrics over the first `cfg.eval_batches x processes` validation batches (all of
        them when eval_batches is 0; `batches` evaluates another set): under DDP, rank r takes batches r, r + W, ... and the sums are
        all-reduced (under FSDP every rank runs every batch: its forward is collective). With the
        per-process batch size divided by W, a W-process run evaluates the same items as one process."""
        self.model.eval()
        sums: dict = {}
        split = self.world > 1 and not self.fsdp
        limit = self.cfg.eval_batches * self.world if self.cfg.eval_batches else None
        for i, batch in enumerate((batches or self.val_batches)()):
            if limit is not None and i >= limit:
                break
            if split and i % self.world != self.rank:
                continue
            self._accumulate(sums, *self._run_objective(batch))
        self.model.train()
        if self.fsdp:  # the root stays unsharded after a no-grad forward; the optimizer holds the shards
            self._root.reshard()
        empty = float(not sums)
        if (self._all_sum([empty])[0] if split else empty) > 0:  # every rank raises, none waits in a collective
            raise ScratchError("the validation set gave no batch for some process: use more validation data, a "
                               "smaller batch size or fewer processes")
        return self._reduce(sums, all_ranks=split)

    # ------------------------------------------------------------------ checkpoints
    def _train_state(self) -> dict:
        local = {"rng": ckpt.rng_state(),
                 "sampler": self.batches.state_dict() if hasattr(self.batches, "state_dict") else None}
        per_rank = [local]
        if self.world > 1:
            per_rank = [None] * self.world
            dist.all_gather_object(per_rank, local)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            opt = get_optimizer_state_dict(self._root, self.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt = self.optimizer.state_dict()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps, "world_size": self.world,
                "best": {k: v for k, v in self.best.items() if v is not None},
                "optimizer": opt, "scaler": self.scaler.state_dict() if self.scaler else {}, "ranks": per_rank}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The unwrapped state dict to save (gathered from all ranks under FSDP), aliases removed; with
        save="trainable" only the trainable parameters and the buffers."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self._root, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
            state = {k.removeprefix("model."): v for k, v in state.items()}
        else:
            state = self.model.state_dict()
        state = state_to_save(self.model, state)  # a tied head is saved once, under wte
        if self.save_mode == "trainable":
            keep = ckpt.trainable_state_names(self.model)
            state = {k: v for k, v in state.items() if k in keep}
        return state

    def _meta(self, metrics: dict | None) -> dict:
        meta = {"tokens_seen": self.tokens_seen, "metrics": metrics or {}, "precision": self.precision}
        if self.base_fingerprint:
            meta["base_fingerprint"] = self.base_fingerprint  # this folder holds only what trains
        return meta

    def _refuse_non_finite(self, weights: dict[str, torch.Tensor], what: str) -> None:
        """Never save weights holding inf/NaN (collective: every rank raises together)."""
        bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if self._all_sum([float(len(bad))])[0] if self.world > 1 else bad:
            last = read_latest(self.out_dir) or "none"
            where = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "") if bad else "on another process"
            raise ScratchError(f"the weights are not finite at step {self.step} ({where}): {what} not written; the "
                               f"last good checkpoint ({last}) is intact. Lower --lr or use --precision fp32, "
                               "then --resume")

    def save(self, metrics: dict | None = None) -> Path | None:
        """Checkpoint now (collective under torchrun; rank 0 writes). A failed write raises ScratchError
        and leaves the previous checkpoint and `latest` untouched; so do weights that are not finite."""
        state, weights = self._train_state(), self.model_state()
        self._refuse_non_finite(weights, f"checkpoint {ckpt.step_name(self.step)}")
        path = None
        if self.rank == 0:
            try:
                path = ckpt.save_checkpoint(self.out_dir, self.step, lambda d: self.write_model(d, weights),
                                            state, self._meta(metrics), self.cfg.keep_last)
            except OSError as e:
                prev = read_latest(self.out_dir) or "none"
                raise ScratchError(f"writing checkpoint {ckpt.step_name(self.step)} in {self.out_dir} failed "
                                   f"({e}); the previous checkpoint ({prev}) is intact") from None
        if self.world > 1:
            dist.barrier()
        self._saved_step = self.step
        return path

    def save_best(self, val: dict, step: int | None = None) -> None:
        """RUN_DIR/best/: the model files of the best evaluation so far (no optimizer state: it is for
        using, not resuming), replaced atomically; never pruned. `step`: the step the weights are from
        (default now; a stage that rewrites best/ after the run passes best["step"])."""
        weights = self.model_state()
        self._refuse_non_finite(weights, ckpt.BEST)
        if self.rank == 0:
            try:
                with atomic_dir(self.out_dir / ckpt.BEST, overwrite=True) as tmp:
                    self.write_model(tmp, weights)
                    ckpt.write_meta(tmp, {**self._meta(val), "step": self.step if step is None else step,
                                          "best_metric": self.cfg.best_metric})
            except OSError as e:
                raise ScratchError(f"writing {self.out_dir / ckpt.BEST} failed ({e}); the previous best model "
                                   "is intact") from None
        if self.world > 1:
            dist.barrier()

    def load_best(self) -> bool:
        """Load RUN_DIR/best/'s weights into the model (False when there is none): a stage's final test
        evaluation uses the model it keeps."""
        best = self.out_dir / ckpt.BEST
        if not (best / "model.safetensors").is_file():
            return False
        load_state_dict_checked(self.model, self.read_model(best), str(best / "model.safetensors"),
                                expected=set(self.model_state()))
        return True

    def resume(self, path: str | Path) -> int:
        """Restore model, optimizer, scaler, counters, every RNG and the sampler from a checkpoint or run
        folder (after verifying every file's checksum). Returns the step resumed at."""
        folder = ckpt.resolve_checkpoint(path)
        if self.rank == 0:
            ckpt.remove_temp_folders(self.out_dir)  # left by a process killed while it saved
        meta = ckpt.verify_checkpoint(folder)
        weights = self.read_model(folder)
        if self.save_mode == "trainable" or meta.get("base_fingerprint"):
            ckpt.check_base(meta.get("base_fingerprint"), self.base_fingerprint, folder)
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self._root, {f"model.{k}": v for k, v in weights.items()},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            load_state_dict_checked(self.model, weights, str(folder / "model.safetensors"),
                                    expected=set(self.model_state()))
        state = ckpt.load_train_state(folder)
        if state["world_size"] != self.world:
            raise ScratchError(f"{folder} was written by {state['world_size']} process(es), now {self.world}: "
                               f"resume with the same number of processes (the data order depends on it)")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self._root, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "tokens_seen", "elapsed", "bad_steps", "skipped_steps"):
            setattr(self, key, state[key])
        self.best.update(state.get("best", {}))
        mine = state["ranks"][self.rank]
        ckpt.set_rng_state(mine["rng"])
        if mine["sampler"] is not None:
            self.batches.load_state_dict(mine["sampler"])
        self.resumed_from = self._saved_step = self.step
        print0(f"resumed from {folder} (step {self.step}, {self.tokens_seen:,} tokens seen)")
        return self.step

    # ------------------------------------------------------------------ the loop
    def _on_signal(self, signum, frame):
        self._stop = signum
        print0(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint after this step ...")

    def _should_stop(self) -> bool:
        flag = float(self._stop is not None)
        return (self._all_sum([flag])[0] if self.world > 1 else flag) > 0

    def early_stop_reason(self) -> str | None:
        cfg, best = self.cfg, self.best
        if cfg.patience and best["evals_since"] >= cfg.patience:
            return (f"{cfg.best_metric} did not improve for {best['evals_since']} evaluations (patience "
                    f"{cfg.patience}); best {best['value']:.4g} at step {best['step']}")
        return None

    def fit(self, step_fn: Callable[[], dict] | None = None) -> dict:
        """Train until cfg.max_steps, an early stop or a signal. `step_fn` (default `train_step`) is one
        iteration: it may run several `optimizer_step`s; evaluation, samples and checkpoints happen
        whenever the step count crosses a multiple of their interval. Returns the last train/val
        metrics and the state."""
        cfg, rank0 = self.cfg, self.rank == 0
        step_fn = step_fn or self.train_step
        if rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out_dir / "metrics.jsonl", self.resumed_from, enabled=rank0)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        peak = self.peak_flops
        progress = Progress(total=cfg.max_steps - self.step, unit="steps", desc="train")
        last, val = {}, None

        def crossed(before: int, every: int) -> bool:
            return bool(every) and self.step // every > before // every

        try:
            if self.val_batches and cfg.eval_every and self.step == 0:
                val = self._log_eval(log)
            while self.step < cfg.max_steps and not self.early_stop_reason() and not self._should_stop():
                before, t0 = self.step, time.perf_counter()
                last = step_fn()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                tps = last["tokens"] / dt
                rec = {"step": self.step, "split": "train", "tokens": self.tokens_seen,
                       **{k: v for k, v in last.items() if k not in ("tokens", "skipped")},
                       "tokens_per_s": tps, **({"count_per_s": last["count"] / dt} if self.count_label else {}),
                       "mfu": tps * self.flops_per_token / (peak * self.world) if self.flops_per_token and peak
                       else None, "elapsed": self.elapsed, "skipped": last["skipped"]}
                if hasattr(self.batches, "epoch"):
                    rec["epoch"] = self.batches.epoch
                if crossed(before, cfg.log_every) or self.step == cfg.max_steps:
                    log.write(rec)
                shown = {k: v for k, v in last.items() if k not in ("count", "tokens", "skipped", "lr", "grad_norm")}
                rates = {"tok/s": f"{tps:,.0f}"} | ({self.count_label: f"{last['count'] / dt:,.0f}"}
                                                    if self.count_label else {})
                progress.update(self.step - before, step=self.step, **shown, **rates)
                if self.val_batches and crossed(before, cfg.eval_every):
                    val = self._log_eval(log)
                if self.sample_fn and crossed(before, cfg.sample_every):
                    self._sample()
                if (crossed(before, cfg.checkpoint_every) and self.step < cfg.max_steps and not self.bad_steps
                        and not self.early_stop_reason()):  # never checkpoint in the middle of a non-finite streak
                    self.save({"loss": last["loss"]})
            progress.close()
            reason = self.early_stop_reason()
            done = self.step >= cfg.max_steps or reason is not None
            if done and self.val_batches and not reason and (not cfg.eval_every or self.step % cfg.eval_every):
                val = self._log_eval(log)
            if self._saved_step != self.step:  # (a rewound run may find an older step_N of this name)
                self.save({"loss": last.get("loss"), "val_loss": val["loss"] if val else None})
            if reason:
                self.info["stopped early"] = f"at step {self.step}: {reason}"
                print0(f"early stop at step {self.step}: {reason}")
            if rank0:
                self.write_outputs()
            if not done:
                print0(f"stopped at step {self.step}; checkpoint saved in {self.out_dir} (continue with --resume)")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train": last, "val": val,
                "interrupted": not done, "signal": self._stop, "early_stopped": reason, "best": dict(self.best),
                "skipped_steps": self.skipped_steps}

    def _log_eval(self, log: MetricsLog) -> dict:
        val = self.evaluate()
        log.write({"step": self.step, "split": "val", **val, "tokens": self.tokens_seen})  # x-axis: tokens seen
        shown = " | ".join(f"{k} {v:.4f}" for k, v in val.items() if k not in TOTALS)
        if self.train_eval_batches:  # the same metrics on training data, in eval mode (the book's curves)
            on_train = self.evaluate(self.train_eval_batches)
            log.write({"step": self.step, "split": "train_eval", **on_train, "tokens": self.tokens_seen})
            shown += " | train (eval) " + " | ".join(f"{k} {v:.4f}" for k, v in on_train.items() if k not in TOTALS)
        print0(f"step {self.step} | val {shown}")
        self._track_best(val)
        return val

    def _track_best(self, val: dict) -> None:
        """Update the best value of cfg.best_metric; save RUN_DIR/best/ when it improves."""
        name, best = self.cfg.best_metric, self.best
        if not name:
            return
        if name not in val:
            raise ScratchError(f"train.best_metric {name!r} is not a validation metric of this stage; it reports "
                               f"{', '.join(k for k in val if k not in TOTALS)}")
        value = val[name]
        if not math.isfinite(value):
            best["evals_since"] += 1
            return
        better = best["value"] is None or (value < best["value"] if self.cfg.best_mode == "min"
                                           else value > best["value"])
        if better:
            best.update(value=value, step=self.step, evals_since=0)
            self.save_best(val)
        else:
            best["evals_since"] += 1

    def _sample(self) -> None:
        # every rank runs it through the root (not DDP, not compiled): under FSDP the forward is collective
        text = self.sample_fn(ModelView(self._root, self.model))
        if self.fsdp:
            self._root.reshard()
        print0(f"step {self.step} | sample: {text!r}")

    def write_outputs(self) -> None:
        """loss.png and report.md from metrics.jsonl (rank 0)."""
        records = read_metrics(self.out_dir / "metrics.jsonl")
        plot_loss(records, self.out_dir / "loss.png")
        cfg_file = self.out_dir / "config.toml"
        info = {**self.info, "precision": self.precision, "device": self.device, "processes": self.world,
                "skipped steps": self.skipped_steps}
        rates = sorted(r["count_per_s"] for r in records if r.get("split") == "train" and r.get("count_per_s"))
        if self.count_label and rates:  # (SFT: trained tokens per second, beside the throughput of all tokens)
            info[self.count_label] = f"median {rates[len(rates) // 2]:,.0f}"
        if self.best["step"] is not None:
            info["best model"] = (f"{ckpt.BEST}/ ({self.cfg.best_metric} {self.best['value']:.4f} at step "
                                  f"{self.best['step']})")
        write_report(self.out_dir / "report.md", records, info, cfg_file.read_text() if cfg_file.is_file() else "")
