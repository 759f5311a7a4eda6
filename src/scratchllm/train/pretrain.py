"""`scratchllm pretrain`: next-token pretraining of a GPT on token shards, run by the shared Trainer.

What it does: resolves the config (defaults < --config TOML < flags), checks the output folder (a
folder holding another run is refused unless --resume or --overwrite), prepares shards first when
given raw --input, builds the model (a preset from scratch, or continued from --model: a checkpoint,
run or Hugging Face folder, a .gguf file or a registry name), checks that tokenizer, shards and model agree, writes the
resolved `config.toml`, and trains with DDP (or FSDP2 with --fsdp) when launched by torchrun.
--resume continues the run in --out (or the checkpoint / run folder given) exactly where it stopped,
after checking that the config did not change in ways that would break it.
--sampler sliding cuts the book's fixed windows (--stride) and --epochs counts passes over them.
The shared steps (config, out dir, resume checks, distributed init, seeding, config.toml, exit code)
come from stage.py; `pretrain(cfg)` is the stage as a Python function, `run(args)` its command.
What it does not do: the loop itself (core.py) or the loss (objectives.py).

    summary = pretrain(PretrainConfig(data="shards/", model_preset="tiny", out="runs/a"))
    scratchllm pretrain --input builtin:pydocs --tokenizer tok/ --model-preset tiny --out runs/a
    torchrun --nproc_per_node=2 -m scratchllm pretrain --data shards/ --model-preset small --out runs/b
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from scratchllm.common import ScratchError, print0, torch_dtype
from scratchllm.configs import PretrainConfig
from scratchllm.train import stage
from scratchllm.train.core import Trainer
from scratchllm.train.objectives import next_token_objective, perplexity
from scratchllm.weights.folder import write_adapter_files, write_state_files

# the stage's own argparse dest -> config field (the Trainer's flags are mapped by stage.train_overrides)
FLAGS = {"data": "data", "input": "input", "tokenizer": "tokenizer", "model_preset": "model_preset",
         "model": "model", "out": "out", "block_size": "block_size", "fsdp": "fsdp", "sampler": "sampler",
         "stride": "stride", "eval_train": "eval_train", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
         "lora_targets": "lora_targets", **{k: f"model_overrides.{k}" for k in ("init", "dropout", "tie_embeddings", "bias")}}


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
    """(model, its tokenizer or None) of anything `--model` accepts (checkpoint, run, HF folder, .gguf, name)."""
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
    config = ModelConfig.from_preset(cfg.model_preset, **overrides)
    if config.init == "torch" and config.tie_embeddings:
        warnings.warn("--init torch with tied embeddings makes the N(0, 1) token embedding the output head too: "
                      "the first logits are huge (loss ~475 for GPT-2 124M); add --no-tie-embeddings, as the book does",
                      stacklevel=2)
    return GPT(config)


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


def pretrain(cfg: PretrainConfig, *, resume=None, overwrite: bool = False) -> dict:
    """Pretrain as configured; returns the Trainer's summary (step, train/val metrics, interrupted).
    `resume`: True continues the run in cfg.out, a path continues that checkpoint or run folder."""
    from scratchllm.data.loaders import RandomWindowSampler, SlidingWindowSampler, eval_batches
    from scratchllm.data.shards import shard_tokenizer
    from scratchllm.tokenizer import load_tokenizer
    from scratchllm.train.flops import gpt_train_flops_per_token, matmul_peak_flops

    run = stage.start(cfg, resume=resume, overwrite=overwrite)
    tc, out, device, rank, world = cfg.train, run.out, run.device, run.rank, run.world

    model, tokenizer = load_start_model(cfg.model, cfg.block_size) if cfg.model else (None, None)
    if cfg.tokenizer:
        given = load_tokenizer(cfg.tokenizer)
        if tokenizer is not None and given.fingerprint() != tokenizer.fingerprint():
            raise ScratchError(f"--tokenizer {cfg.tokenizer} is not the tokenizer of --model {cfg.model} "
                               f"({given.name}, {given.vocab_size} ids vs {tokenizer.name}, {tokenizer.vocab_size} "
                               "ids): drop --tokenizer to use the model's own")
        tokenizer = given
    shards = load_data(cfg, out, tokenizer)
    tokenizer = tokenizer or shard_tokenizer(shards.path)
    if tokenizer is None:
        raise ScratchError("no tokenizer: pass --tokenizer (a folder or `gpt2`), a --model folder holding one, or "
                           "shards prepared by this version (they remember theirs)")
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
    common = dict(seed=tc.seed, rank=rank, world_size=world, device=device)  # pinned, non-blocking on CUDA
    if cfg.sampler == "sliding":
        sampler = SlidingWindowSampler(shards.train, block, tc.batch_size, stride=cfg.stride or block, **common)
    else:
        sampler = RandomWindowSampler(shards.train, block, tc.batch_size, **common)
    stage.steps_for_epochs(tc, sampler.batches_per_epoch)

    lora = None
    if cfg.lora_rank:  # only the adapters train and are saved; --model RUN loads base + adapters merged
        from scratchllm.model.lora import apply_lora, lora_settings

        apply_lora(model, cfg.lora_rank, cfg.lora_alpha, 0.0, tuple(cfg.lora_targets))
        lora = lora_settings(model)
        base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model

    def write_model(folder: Path, state: dict) -> None:
        if lora:
            write_adapter_files(folder, state, base, lora, mcfg, tokenizer)
            return
        write_state_files(folder, state, mcfg, tokenizer)

    info = {"model": cfg.model or f"preset {cfg.model_preset}",
            "parameters": f"{model.num_params():,} ({model.num_params(non_embedding=True):,} non-embedding)"
                          + (f"; training {sum(p.numel() for p in model.parameters() if p.requires_grad):,} in "
                             f"LoRA adapters of rank {cfg.lora_rank}" if lora else ""),
            "data": f"{cfg.data or cfg.input}: {shards.train_tokens:,} train / {shards.val_tokens:,} val tokens",
            "tokenizer": f"{tokenizer.name} ({tokenizer.vocab_size} ids)",
            "sampler": f"{cfg.sampler} windows" + (f", stride {cfg.stride or block}" if cfg.sampler == "sliding" else "")
                       + f", {sampler.batches_per_epoch} batches per epoch",
            "global batch": f"{tc.batch_size * block * tc.grad_accum * world:,} tokens "
                            f"({tc.batch_size} x {block} x {tc.grad_accum} accum x {world} processes)"}
    if tc.epochs:
        info["epochs"] = f"{tc.epochs} ({tc.max_steps} steps)"
    trainer = Trainer(
        model, tc, next_token_objective, sampler, out_dir=out,
        val_batches=lambda: eval_batches(shards.val, block, tc.batch_size,
                                         max_batches=tc.eval_batches * world or None, device=device),
        sample_fn=make_sampler(mcfg, tokenizer, tc.sample_prompt, tc.sample_tokens, tc.seed),
        write_model=write_model, flops_per_token=gpt_train_flops_per_token(mcfg), info=info, fsdp=cfg.fsdp,
        derived_metrics=perplexity, save="trainable" if lora else "all",
        train_eval_batches=(lambda: eval_batches(shards.train, block, tc.batch_size, device=device,
                                                 max_batches=tc.eval_batches * world or None))
        if cfg.eval_train else None)
    if rank == 0:  # MFU's ceiling: this device's matmul speed in the precision the run really uses
        trainer.peak_flops = matmul_peak_flops(trainer.device, torch_dtype(trainer.precision))
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
    stage.write_config(run)
    print0(f"pretraining {info['model']}: {info['parameters']} parameters; {info['global batch']} per step; "
           f"{trainer.precision} on {trainer.device}; run folder {out}")
    summary = trainer.fit()
    summary["exit_code"] = stage.finish(summary)
    return summary


def run(args) -> int:
    """`scratchllm pretrain ...`: build the config from the flags, then pretrain."""
    cfg = stage.config_from_args(PretrainConfig, args, FLAGS)
    summary = pretrain(cfg, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
    if summary["interrupted"]:
        return summary["exit_code"]
    val, train = summary["val"], summary["train"]
    print0(f"done: step {summary['step']}" + (f", train loss {train['loss']:.4f}" if train else " (nothing to do)")
           + (f", val loss {val['loss']:.4f} (ppl {val['ppl']:.2f})" if val else "") + f"; outputs in {cfg.out}")
    return summary["exit_code"]
