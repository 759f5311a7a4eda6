"""`scratchllm pretrain`: next-token pretraining of a GPT on token shards, run by the shared Trainer.

What it does: resolves the config (defaults < --config TOML < flags), checks the output folder (a
folder holding another run is refused unless --resume or --overwrite), prepares shards first when
given raw --input, builds the model (a preset from scratch, or continued from --model: a checkpoint,
run or Hugging Face GPT-2 folder), checks that tokenizer, shards and model agree, writes the
resolved `config.toml`, and trains with DDP (or FSDP2 with --fsdp) when launched by torchrun.
--resume continues the run in --out (or the checkpoint / run folder given) exactly where it stopped,
after checking that the config did not change in ways that would break it.
What it does not do: the loop itself (core.py) or the loss (objectives.py).

    scratchllm pretrain --input builtin:pydocs --tokenizer tok/ --model-preset tiny --out runs/a
    torchrun --nproc_per_node=2 -m scratchllm pretrain --data shards/ --model-preset small --out runs/b
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from scratchllm.common import ScratchError, atomic_write_text, print0, seed_everything, torch_dtype
from scratchllm.configs import PretrainConfig, diff, resolve, to_dict, to_toml
from scratchllm.train import checkpointing as ckpt
from scratchllm.train.core import Trainer, init_distributed, write_safetensors
from scratchllm.train.objectives import next_token_objective

# argparse dest -> config field (None from argparse = flag not given, so TOML / defaults apply)
FLAGS = {
    "data": "data", "input": "input", "tokenizer": "tokenizer", "model_preset": "model_preset",
    "model": "model", "out": "out", "block_size": "block_size", "fsdp": "fsdp",
    **{k: f"train.{k}" for k in (
        "max_steps", "batch_size", "grad_accum", "batch_tokens", "lr", "min_lr", "warmup_steps", "schedule",
        "weight_decay", "grad_clip", "eval_every", "eval_batches", "sample_every", "sample_prompt",
        "sample_tokens", "checkpoint_every", "keep_last", "log_every", "seed", "precision", "compile",
        "device", "deterministic")},
}
# fields that may change between a run and its resumption (they do not change the math of a step)
RESUME_FREE = {"out", "train.max_steps", "train.eval_every", "train.eval_batches", "train.sample_every",
               "train.sample_prompt", "train.sample_tokens", "train.checkpoint_every", "train.keep_last",
               "train.log_every", "train.max_bad_steps", "train.compile", "train.device"}


def config_from_args(args, base: dict | None = None) -> PretrainConfig:
    """defaults < `base` (the saved config of a run being resumed) < --config TOML < flags."""
    overrides = {field: getattr(args, dest, None) for dest, field in FLAGS.items()}
    if isinstance(overrides["train.compile"], bool):
        overrides["train.compile"] = "on" if overrides["train.compile"] else "off"
    return resolve(PretrainConfig, getattr(args, "config", None), overrides, base=base)


def saved_config(args) -> tuple[dict | None, Path | None]:
    """With --resume: (the run's saved config.toml as a dict, the checkpoint folder), else (None, None).
    `--resume` alone continues --out; `--resume PATH` a checkpoint or run folder."""
    import tomllib

    resume = getattr(args, "resume", None)
    if not resume:
        return None, None
    src = Path(resume) if resume is not True else Path(args.out) if args.out else None
    if src is None:
        raise ScratchError("--resume needs --out RUN_DIR (or --resume PATH)")
    if resume is True and not ckpt.list_checkpoints(src):
        print0(f"--resume: no checkpoint in {src} yet, starting a new run")
        return None, None
    folder = ckpt.resolve_checkpoint(src)
    saved = folder.parent / "config.toml"
    return (tomllib.loads(saved.read_text()) if saved.is_file() else None), folder


def check_out_dir(out: Path, resume, overwrite: bool) -> None:
    """Refuse a non-empty --out that is not ours to continue, unless asked to replace it."""
    if not out.exists() or not any(out.iterdir()):
        return
    is_run = (out / "config.toml").is_file() or (out / "metrics.jsonl").is_file()
    if resume and is_run:
        return
    if overwrite:
        shutil.rmtree(out)
        return
    what = "holds another run (config.toml)" if is_run else "is not empty"
    raise ScratchError(f"--out {out} {what}: pass --resume to continue that run or --overwrite to replace it")


def check_resume_config(cfg: PretrainConfig, saved: dict, saved_toml: Path) -> None:
    """Refuse to resume when a field that changes the math of a step differs from the saved run."""
    changed = [f for f in diff(saved, to_dict(cfg)) if f not in RESUME_FREE]
    if changed:
        now = to_dict(cfg)

        def get(d, dotted):
            for part in dotted.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        details = "; ".join(f"{f}: {get(saved, f)!r} -> {get(now, f)!r}" for f in changed)
        raise ScratchError(f"cannot resume: the config differs from {saved_toml} in {len(changed)} field(s): "
                           f"{details}. Use the same settings, or start a new run (--overwrite / another --out)")


def load_data(cfg: PretrainConfig, out: Path, tokenizer):
    from scratchllm.data.shards import open_shards, prepare

    data = Path(cfg.data) if cfg.data else out / "shards"
    if cfg.input and not (data / "index.json").is_file():
        if dist.is_initialized() and dist.get_rank() != 0:
            dist.barrier()  # rank 0 prepares; the others wait, then open
        else:
            print0(f"preparing shards from {', '.join(cfg.input)} into {data}")
            prepare(cfg.input, tokenizer, data)
            if dist.is_initialized():
                dist.barrier()
    return open_shards(data, tokenizer=tokenizer)


def load_start_model(path: str, block_size: int):
    """(model, its tokenizer or None) from a checkpoint, run or Hugging Face GPT-2 folder."""
    from scratchllm.weights.checkpoint import load_model

    model, tok = load_model(path)
    model.train()
    if block_size > model.config.block_size:
        raise ScratchError(f"--block-size {block_size} is larger than the model's block_size "
                           f"{model.config.block_size} ({path})")
    return model, tok


def preset_model(cfg: PretrainConfig, vocab_size: int):
    """A fresh GPT from a preset; its vocab is the data's, rounded up to a multiple of 64 (faster matmuls)."""
    from scratchllm.model import GPT, ModelConfig

    overrides = dict(cfg.model_overrides)
    overrides.setdefault("vocab_size", -(-vocab_size // 64) * 64)
    if cfg.block_size:
        overrides.setdefault("block_size", cfg.block_size)
    return GPT(ModelConfig.from_preset(cfg.model_preset, **overrides))


def make_sampler(model_cfg, tokenizer, prompt: str, n_tokens: int, seed: int):
    """A function model -> text continuing `prompt` (top-k 40, temperature 0.8, its own seeded RNG, so
    sampling never shifts the training RNG)."""
    ids = tokenizer.encode(prompt) or [tokenizer.eot_token or 0]

    @torch.no_grad()
    def sample(model) -> str:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(seed)
        x = torch.tensor([ids], device=device)
        for _ in range(n_tokens):
            logits = model(x[:, -model_cfg.block_size:])[:, -1, :].float() / 0.8  # (1, V)
            logits[:, tokenizer.vocab_size:] = -float("inf")  # padding rows of a rounded-up vocab
            v, _ = torch.topk(logits, min(40, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)  # (1, 1)
            x = torch.cat([x, nxt], dim=1)
        model.train(was_training)
        return tokenizer.decode(x[0].tolist())
    return sample


def run(args) -> int:
    from scratchllm.data.loaders import RandomWindowSampler, eval_batches
    from scratchllm.tokenizer import load_tokenizer
    from scratchllm.train.flops import gpt_train_flops_per_token, matmul_peak_flops

    base, resume_from = saved_config(args)
    cfg = config_from_args(args, base)
    tc, out = cfg.train, Path(cfg.out)
    if base is not None:
        check_resume_config(cfg, base, resume_from.parent / "config.toml")
    device = init_distributed(tc.device)  # before the rank is read; the Trainer picks the same device
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if rank == 0:
        check_out_dir(out, getattr(args, "resume", None), getattr(args, "overwrite", False))
    if dist.is_initialized():
        dist.barrier()
    seed_everything(tc.seed)  # the same initial weights on every rank (FSDP shards them as they are)

    model, tokenizer = load_start_model(cfg.model, cfg.block_size) if cfg.model else (None, None)
    if cfg.tokenizer:
        given = load_tokenizer(cfg.tokenizer)
        if tokenizer is not None and given.fingerprint() != tokenizer.fingerprint():
            raise ScratchError(f"--tokenizer {cfg.tokenizer} is not the tokenizer of --model {cfg.model} "
                               f"({given.name}, {given.vocab_size} ids vs {tokenizer.name}, {tokenizer.vocab_size} "
                               "ids): drop --tokenizer to use the model's own")
        tokenizer = given
    if tokenizer is None:
        raise ScratchError("no tokenizer: pass --tokenizer (a folder or `gpt2`), or a --model folder holding one")
    shards = load_data(cfg, out, tokenizer)
    model = model or preset_model(cfg, shards.vocab_size)
    if world > 1:
        torch.manual_seed(tc.seed + rank)  # but different dropout masks per rank
    mcfg = model.config
    if shards.vocab_size > mcfg.vocab_size:
        raise ScratchError(f"the shards' vocab_size {shards.vocab_size} is larger than the model's "
                           f"{mcfg.vocab_size}: tokenizer, shards and model do not belong together")
    block = cfg.block_size or mcfg.block_size
    if block > mcfg.block_size:
        raise ScratchError(f"block_size {block} is larger than the model's block_size {mcfg.block_size}")
    if tc.batch_tokens:
        per_micro = tc.batch_size * block * world
        if tc.batch_tokens % per_micro:
            raise ScratchError(f"train.batch_tokens {tc.batch_tokens} is not divisible by batch_size x block_size "
                               f"x processes = {tc.batch_size} x {block} x {world} = {per_micro}")
        tc.grad_accum = tc.batch_tokens // per_micro
    for split, arrays in (("train", shards.train), ("val", shards.val)):
        if sum(len(a) for a in arrays) <= block:
            raise ScratchError(f"the {split} shards of {shards.index.get('path', cfg.data)} hold fewer than "
                               f"block_size + 1 = {block + 1} tokens: use more data or a smaller --block-size")
    sampler = RandomWindowSampler(shards.train, block, tc.batch_size, seed=tc.seed, rank=rank, world_size=world,
                                  device=device)  # pinned, non-blocking copies on CUDA

    def write_model(folder: Path, state: dict) -> None:
        write_safetensors(folder, state)
        (folder / "config.json").write_text(json.dumps(mcfg.to_dict(), indent=2) + "\n")
        tokenizer.save(folder / "tokenizer")

    info = {"model": cfg.model or f"preset {cfg.model_preset}",
            "parameters": f"{model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding)",
            "data": f"{cfg.data or cfg.input}: {shards.train_tokens:,} train / {shards.val_tokens:,} val tokens",
            "tokenizer": f"{tokenizer.name} ({tokenizer.vocab_size} ids)",
            "global batch": f"{tc.batch_size * block * tc.grad_accum * world:,} tokens "
                            f"({tc.batch_size} x {block} x {tc.grad_accum} accum x {world} processes)"}
    trainer = Trainer(
        model, tc, next_token_objective, sampler, out_dir=out,
        val_batches=lambda: eval_batches(shards.val, block, tc.batch_size, max_batches=tc.eval_batches * world,
                                         device=device),
        sample_fn=make_sampler(mcfg, tokenizer, tc.sample_prompt, tc.sample_tokens, tc.seed),
        write_model=write_model, flops_per_token=gpt_train_flops_per_token(mcfg), info=info, fsdp=cfg.fsdp)
    if rank == 0:  # MFU's ceiling: this device's matmul speed in the precision the run really uses
        trainer.peak_flops = matmul_peak_flops(trainer.device, torch_dtype(trainer.precision))
    if resume_from is not None:
        trainer.resume(resume_from)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", to_toml(cfg))
        print0(f"pretraining {info['model']}: {info['parameters']} parameters; {info['global batch']} per step; "
               f"{trainer.precision} on {trainer.device}; run folder {out}")
    summary = trainer.fit()
    if dist.is_initialized():
        # every rank tears gloo down together: a rank that exits while another is still writing
        # outputs can abort in gloo's worker threads ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    if summary["interrupted"]:
        return 130
    val, train = summary["val"], summary["train"]
    print0(f"done: step {summary['step']}" + (f", train loss {train['loss']:.4f}" if train else " (nothing to do)")
           + (f", val loss {val['loss']:.4f} (ppl {val['ppl']:.2f})" if val else "") + f"; outputs in {out}")
    return 0
