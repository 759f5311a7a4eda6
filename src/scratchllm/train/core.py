"""The one training loop every stage runs on: `Trainer(model, cfg, objective, batches, out_dir=...).fit()`.

What it does: a stage supplies a model, a batch source (anything with `next_batch()`, plus
`state_dict()/load_state_dict()` to resume exactly) and an objective `(model, batch) -> (loss_sum,
metrics)` whose `metrics["count"]` says how many items the sum covers (see objectives.py). Each
optimizer step accumulates `grad_accum` micro-batches (DDP gradient sync only on the last), divides
the gradients once by the step's total count over all ranks, logs the pre-clip gradient norm, clips,
and steps AdamW with the scheduled learning rate. Non-finite steps are skipped and counted; K in a
row abort. It evaluates, samples, checkpoints (every N steps, at the end, on SIGINT/SIGTERM),
writes metrics.jsonl / loss.png / report.md, and prints progress on rank 0 only.
What it does not do: build models or data (stages do), or know any stage's loss.

    trainer = Trainer(model, TrainConfig(max_steps=100), next_token_objective, sampler,
                      out_dir="runs/x", val_batches=lambda: eval_batches(val, 128, 8))
    trainer.resume("runs/x")   # optional: model, optimizer, RNGs, sampler position
    summary = trainer.fit()
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from scratchllm.common import Progress, ScratchError, print0, select_device, select_precision, torch_dtype
from scratchllm.configs import TrainConfig
from scratchllm.train import checkpointing as ckpt
from scratchllm.train.optim import build_optimizer, lr_at, set_lr
from scratchllm.train.runlog import MetricsLog, plot_loss, read_metrics, write_report


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


def shared_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that alias another one (a tied lm_head.weight): saved once, under the first name."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def write_safetensors(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """The default model writer: `folder/model.safetensors` from an unwrapped, de-duplicated state dict."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


class Trainer:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, objective: Callable, train_batches, *,
                 out_dir: str | Path, val_batches: Callable[[], Iterable] | None = None,
                 sample_fn: Callable[[torch.nn.Module], str] | None = None,
                 write_model: Callable[[Path, dict], None] = write_safetensors, flops_per_token: float | None = None,
                 peak_flops: float | None = None, info: dict | None = None, fsdp: bool = False):
        self.cfg, self.objective, self.batches = cfg, objective, train_batches
        self.out_dir, self.val_batches, self.sample_fn = Path(out_dir), val_batches, sample_fn
        self.info, self.flops_per_token, self.peak_flops = dict(info or {}), flops_per_token, peak_flops
        self.device = init_distributed(cfg.device)  # first: the rank and world size come from it
        self.rank, self.world = _world()
        self.precision = select_precision(cfg.precision, self.device)
        # loss and count sums across micro-batches and ranks: float64, but MPS has no float64
        self._sum_dtype = torch.float32 if self.device.startswith("mps") else torch.float64
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
        self.model = model.to(self.device)  # the unwrapped module: what checkpoints save
        self.write_model = write_model  # (folder, full state dict) -> writes the model files
        self.fsdp = fsdp and self.world > 1
        self.ddp = None
        wrapped = self.model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in getattr(getattr(model, "transformer", None), "h", []):
                fully_shard(block)
            fully_shard(model)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            wrapped = self.ddp = DistributedDataParallel(model, device_ids=ids)
        use_compile = cfg.compile == "on" or (cfg.compile == "auto" and self.device.startswith("cuda"))
        self.fwd = torch.compile(wrapped) if use_compile else wrapped  # never saved: self.model is
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.step = self.tokens_seen = self.bad_steps = self.skipped_steps = 0
        self.elapsed = 0.0  # training seconds over all sessions of this run
        self.resumed_from: int | None = None
        self._saved_step: int | None = None  # the step whose checkpoint holds the current state
        self._stop: int | None = None

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

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        lr = lr_at(self.step, max_lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps,
                   schedule=cfg.schedule, min_lr=cfg.min_lr)
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), dtype=self._sum_dtype, device=self.device)
        count = tokens = 0
        for micro in range(cfg.grad_accum):
            batch = _to(self.batches.next_batch(), self.device)
            last = micro == cfg.grad_accum - 1
            with self.ddp.no_sync() if (self.ddp is not None and not last) else nullcontext():
                with self.autocast():
                    loss, metrics = self.objective(self.fwd, batch)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += loss.detach().to(self._sum_dtype)
            n = int(metrics["count"])
            count += n
            tokens += int(metrics.get("tokens", n))
        loss_sum, count, tokens = self._all_sum([loss_sum, count, tokens])
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if count > 0:  # DDP/FSDP averaged over ranks: undo that, then divide by the global count
            torch._foreach_mul_(grads, self.world / count)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        loss = loss_sum / count if count > 0 else float("nan")
        finite = math.isfinite(loss) and (math.isfinite(norm) or self.scaler is not None)
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
        self.step += 1
        self.tokens_seen += int(tokens)
        if self.bad_steps >= cfg.max_bad_steps:
            latest = self.out_dir / ckpt.LATEST
            last = latest.read_text().strip() if latest.is_file() else "none yet"
            raise ScratchError(
                f"loss or gradients were non-finite for {self.bad_steps} steps in a row (up to step "
                f"{self.step}); stopped. Last good checkpoint: {last} in {self.out_dir}. Lower --lr, raise "
                f"--warmup-steps, or use --precision fp32, then resume with --resume.")
        return {"loss": loss, "lr": lr, "grad_norm": norm, "tokens": int(tokens), "skipped": not finite}

    # ------------------------------------------------------------------ evaluation and samples
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the first `cfg.eval_batches x processes` validation batches: under DDP, rank r
        takes batches r, r + W, ... and the sums are all-reduced (under FSDP every rank runs every batch:
        its forward is collective). With the per-process batch size divided by W, a W-process run
        evaluates the same tokens as one process."""
        self.fwd.eval()
        loss_sum = count = 0.0
        split = self.world > 1 and not self.fsdp
        for i, batch in enumerate(self.val_batches()):
            if i >= self.cfg.eval_batches * self.world:
                break
            if split and i % self.world != self.rank:
                continue
            with self.autocast():
                loss, metrics = self.objective(self.fwd, _to(batch, self.device))
            loss_sum += float(loss)
            count += int(metrics["count"])
        self.fwd.train()
        if self.fsdp:  # the root stays unsharded after a no-grad forward; the optimizer holds the shards
            self.model.reshard()
        if split:
            loss_sum, count = self._all_sum([loss_sum, count])
        val = loss_sum / max(count, 1)
        return {"loss": val, "ppl": math.exp(min(val, 50.0))}

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

            opt = get_optimizer_state_dict(self.model, self.optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            opt = self.optimizer.state_dict()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed": self.elapsed,
                "bad_steps": self.bad_steps, "skipped_steps": self.skipped_steps, "world_size": self.world,
                "optimizer": opt, "scaler": self.scaler.state_dict() if self.scaler else {}, "ranks": per_rank}

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full, unwrapped state dict (gathered from all ranks under FSDP), aliases removed."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                              cpu_offload=True))
        else:
            state = self.model.state_dict()
        drop = shared_names(self.model)
        return {k: v for k, v in state.items() if k not in drop}

    def save(self, metrics: dict | None = None) -> Path | None:
        """Checkpoint now (collective under torchrun; rank 0 writes). A failed write raises ScratchError
        and leaves the previous checkpoint and `latest` untouched."""
        state, weights = self._train_state(), self.model_state()
        path = None
        if self.rank == 0:
            meta = {"tokens_seen": self.tokens_seen, "metrics": metrics or {}, "precision": self.precision}
            try:
                path = ckpt.save_checkpoint(self.out_dir, self.step, lambda d: self.write_model(d, weights),
                                            state, meta, self.cfg.keep_last)
            except OSError as e:
                latest = self.out_dir / ckpt.LATEST
                prev = latest.read_text().strip() if latest.is_file() else "none"
                raise ScratchError(f"writing checkpoint {ckpt.step_name(self.step)} in {self.out_dir} failed "
                                   f"({e}); the previous checkpoint ({prev}) is intact") from None
        if self.world > 1:
            dist.barrier()
        self._saved_step = self.step
        return path

    def resume(self, path: str | Path) -> int:
        """Restore model, optimizer, scaler, counters, every RNG and the sampler from a checkpoint or run
        folder (after verifying every file's checksum). Returns the step resumed at."""
        from safetensors.torch import load_file

        folder = ckpt.resolve_checkpoint(path)
        ckpt.verify_checkpoint(folder)
        weights = load_file(str(folder / "model.safetensors"))
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            missing, unexpected = self.model.load_state_dict(weights, strict=False)
            if set(missing) - shared_names(self.model) or unexpected:
                raise ScratchError(f"{folder / 'model.safetensors'} does not fit the model: missing "
                                   f"{sorted(set(missing) - shared_names(self.model))}, unexpected {sorted(unexpected)}")
        state = ckpt.load_train_state(folder)
        if state["world_size"] != self.world:
            raise ScratchError(f"{folder} was written by {state['world_size']} process(es), now {self.world}: "
                               f"resume with the same number of processes (the data order depends on it)")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        for key in ("step", "tokens_seen", "elapsed", "bad_steps", "skipped_steps"):
            setattr(self, key, state[key])
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

    def fit(self) -> dict:
        """Train until cfg.max_steps (or a signal). Returns the last train/val metrics and the state."""
        cfg, rank0 = self.cfg, self.rank == 0
        if rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(self.out_dir / "metrics.jsonl", self.resumed_from, enabled=rank0)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        peak = self.peak_flops
        steps_left = cfg.max_steps - self.step
        progress = Progress(total=steps_left, unit="steps", desc="train")
        last, val = {}, None
        try:
            if self.val_batches and cfg.eval_every and self.step == 0:
                val = self._log_eval(log)
            while self.step < cfg.max_steps and not self._should_stop():
                t0 = time.perf_counter()
                last = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                tps = last["tokens"] / dt
                rec = {"step": self.step, "split": "train", "tokens": self.tokens_seen, "loss": last["loss"],
                       "lr": last["lr"], "grad_norm": last["grad_norm"], "tokens_per_s": tps,
                       "mfu": tps * self.flops_per_token / (peak * self.world) if self.flops_per_token and peak
                       else None, "elapsed": self.elapsed, "skipped": last["skipped"]}
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    log.write(rec)
                progress.update(1, step=self.step, loss=last["loss"], **{"tok/s": f"{tps:,.0f}"})
                if self.val_batches and cfg.eval_every and self.step % cfg.eval_every == 0:
                    val = self._log_eval(log)
                if self.sample_fn and cfg.sample_every and self.step % cfg.sample_every == 0:
                    self._sample()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps
                        and not self.bad_steps):  # never checkpoint in the middle of a non-finite streak
                    self.save({"loss": last["loss"]})
            progress.close()
            done = self.step >= cfg.max_steps
            if done and self.val_batches and (not cfg.eval_every or self.step % cfg.eval_every):
                val = self._log_eval(log)
            if self._saved_step != self.step:  # (a rewound run may find an older step_N of this name)
                self.save({"loss": last.get("loss"), "val_loss": val["loss"] if val else None})
            if rank0:
                self.write_outputs()
            if not done:
                print0(f"stopped at step {self.step}; checkpoint saved in {self.out_dir} (continue with --resume)")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return {"step": self.step, "tokens_seen": self.tokens_seen, "train": last, "val": val,
                "interrupted": self.step < cfg.max_steps, "skipped_steps": self.skipped_steps}

    def _log_eval(self, log: MetricsLog) -> dict:
        val = self.evaluate()
        log.write({"step": self.step, "split": "val", "tokens": self.tokens_seen, **val})
        print0(f"step {self.step} | val loss {val['loss']:.4f} | ppl {val['ppl']:.2f}")
        return val

    def _sample(self) -> None:
        text = self.sample_fn(self.model)  # every rank runs it: under FSDP the forward is collective
        if self.fsdp:
            self.model.reshard()
        print0(f"step {self.step} | sample: {text!r}")

    def write_outputs(self) -> None:
        """loss.png and report.md from metrics.jsonl (rank 0)."""
        records = read_metrics(self.out_dir / "metrics.jsonl")
        plot_loss(records, self.out_dir / "loss.png")
        cfg_file = self.out_dir / "config.toml"
        info = {**self.info, "precision": self.precision, "device": self.device, "processes": self.world,
                "skipped steps": self.skipped_steps}
        write_report(self.out_dir / "report.md", records, info, cfg_file.read_text() if cfg_file.is_file() else "")
