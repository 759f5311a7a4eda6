"""`scratchllm ppo`: RLHF with PPO (Ouyang et al. 2022; Ziegler et al. 2019) on the shared Trainer.

What it does, per rollout batch (one step of --max-steps) of --batch-size training prompts:
  1. Rollouts: our Engine samples a response to each prompt (in the policy's chat format) at
     --temperature, cut at any end-of-turn token; the format's own end-of-turn token is appended (so
     the policy learns to end its turn with it, even where it sampled another stop token); a response that never ends within --max-new-tokens loses --missing-eos-penalty.
  2. Score: the reward model (`--reward-model`, train/reward.py; the decoded answer rendered in its
     format as its training answers were; it must share the policy's tokenizer unless --retokenize) or a rule (`--reward module:fn`, fn(prompt, response) ->
     float, imported from the Python path; the current folder first). A rule that raises or returns
     a non-finite number skips the batch (the prompt named, counted).
  3. One no-grad pass gives the policy's log-probs of the sampled tokens (from logits / temperature,
     the distribution they were sampled from), its entropy, the values and the reference's log-probs
     (a frozen copy of the starting model, or the policy with its LoRA adapters off). Per-token
     reward = -kl_coef * KL estimate (k1 or k3), plus the score at the last response token; GAE
     (gamma 1, lambda 0.95) gives advantages (whitened over the batch) and returns.
  4. --ppo-epochs passes over shuffled mini-batches of --mini-batch-size responses, one Trainer
     `optimizer_step` each: clipped policy loss + vf_coef * clipped value loss (losses.py).
  5. An adaptive KL coefficient (--target-kl) moves towards the target KL; a KL above --max-kl
     stops the run, naming the last good checkpoint.
The value function is a head on the policy's hidden states (--value-head shared, zero-initialised)
or a network of its own (separate: a copy of the reward model with --value-init reward, else of
the starting model with a zero head); it is saved beside the policy in value.safetensors. Dropout
is off everywhere. Every --eval-every rollout batches the held-out prompts (the validation split,
first --eval-prompts) are answered greedily and scored: "score" on validation picks best/. Metrics
per rollout batch: score, kl, entropy, clip_frac, value_loss, approx_kl, response_length, ended.
At the end: ppo.png (score and KL against rollout batches) and held-out samples in report.md.
What it does not do: generation (infer/engine.py), the losses (losses.py), reward models (reward.py).

    scratchllm ppo --model runs/sft/best --reward myrules:short_answer --prompts data:instruction-data --out runs/ppo
    scratchllm ppo --model runs/sft/best --reward-model runs/rm --prompts prompts.jsonl --lora-rank 16 --out runs/ppo
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchllm.common import ScratchError, atomic_write_text, print0
from scratchllm.configs import PPOConfig
from scratchllm.train import stage

FLAGS = {k: k for k in (
    "model", "prompts", "reward_model", "reward", "retokenize", "split", "template", "max_length", "max_new_tokens",
    "temperature", "missing_eos_penalty", "kl_coef", "kl_kind", "target_kl", "kl_horizon", "max_kl", "gamma", "lam",
    "ppo_epochs", "mini_batch_size", "clip_range", "value_clip", "vf_coef", "value_head", "value_init",
    "whiten_rewards", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "eval_prompts", "samples", "out")}
TEST_FILE, VALUE_FILE, SAMPLES_FILE = "test.jsonl", "value.safetensors", "samples.jsonl"
VALUE_PREFIXES = ("value_head.", "value_model.")  # the value function's tensors in the policy's state dict


# --------------------------------------------------------------------------------------------- rewards
def load_rule(spec: str):
    """The function named by module:function, imported from the Python path (the current folder first)."""
    module_name, fn_name = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ScratchError(f"--reward {spec}: cannot import module {module_name!r} ({e}); put {module_name}.py in the "
                           "current folder or on PYTHONPATH") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ScratchError(f"--reward {spec}: {module_name} has no function {fn_name!r}")
    return fn


def rule_scores(fn, spec: str, prompts: list[str], responses: list[str], wheres: list[str]) -> list[float] | str:
    """fn(prompt, response) for each pair, or an error message naming the prompt that failed."""
    out = []
    for prompt, response, where in zip(prompts, responses, wheres):
        try:
            value = float(fn(prompt, response))
        except Exception as e:  # a user's function: any failure skips the batch
            return f"--reward {spec} raised {type(e).__name__}: {e} on the prompt of {where}"
        if not math.isfinite(value):
            return f"--reward {spec} returned {value} for the prompt of {where}"
        out.append(value)
    return out


# --------------------------------------------------------------------------------------------- the math of a batch
def response_positions(prompt_lens: torch.Tensor, resp_lens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows holding prompt + response: (B, L) positions of the hidden states that predict each
    response token (prompt_len - 1 + j) and the (B, L) mask of real response tokens, L = max length."""
    L = int(resp_lens.max())
    j = torch.arange(L, device=prompt_lens.device)
    mask = (j[None] < resp_lens[:, None]).float()  # (B, L)
    pos = (prompt_lens[:, None] - 1 + j[None]).clamp(max=T - 1)  # (B, L)
    return pos, mask


def gather_rows(h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """h (B, T, C), pos (B, L) -> (B, L, C)."""
    return torch.gather(h, 1, pos[..., None].expand(-1, -1, h.size(-1)))


def token_logprobs(model, ids, pos, tokens, temperature: float, n_valid: int, entropy: bool = False):
    """log p(tokens) (B, L) under logits / temperature at the response positions (and the entropy)."""
    hp = gather_rows(model.hidden_states(ids), pos)  # (B, L, C)
    logits = model.lm_head(hp).float() / temperature  # (B, L, V): only the response positions
    if n_valid < logits.size(-1):
        logits[..., n_valid:] = float("-inf")
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    if not entropy:
        return logp, hp
    p = logp_all.exp()
    ent = -(p * logp_all.masked_fill(p == 0, 0)).sum(-1)
    return logp, hp, ent


def values_of(policy, ids, pos, hp) -> torch.Tensor:
    """(B, L) values at the response positions: the shared head on the policy's states, or the separate network."""
    if hasattr(policy, "value_head"):
        return policy.value_head(hp).squeeze(-1).float()
    vm = policy.value_model
    hv = gather_rows(vm.backbone.hidden_states(ids), pos)
    return vm.head(hv).squeeze(-1).float()


class PPOObjective:
    """The Trainer's objective: a PPO mini-batch loss, or (batch kind "eval") held-out prompts answered
    greedily and scored (loss = -score, so the Trainer's evaluation and best/ work unchanged)."""

    def __init__(self, cfg: PPOConfig, n_valid: int, evaluate_fn):
        self.cfg, self.n_valid, self.evaluate_fn = cfg, n_valid, evaluate_fn

    def __call__(self, model, batch, **frozen):
        if batch.get("kind") == "eval":
            return self.evaluate_fn(batch["indices"])
        from scratchllm.train.losses import ppo_policy_loss, ppo_value_loss

        cfg = self.cfg
        logp, hp = token_logprobs(model, batch["ids"], batch["pos"], batch["tokens"], cfg.temperature, self.n_valid)
        values = values_of(model, batch["ids"], batch["pos"], hp)
        mask = batch["mask"]
        policy_loss, stats = ppo_policy_loss(logp, batch["old_logp"], batch["adv"], mask, cfg.clip_range)
        value_loss = ppo_value_loss(values, batch["old_values"], batch["returns"], mask, cfg.value_clip)
        n = mask.sum()
        loss = policy_loss + cfg.vf_coef * value_loss
        return loss * n, {"count": n, "tokens": n, "policy_loss": policy_loss.detach() * n,
                          "value_loss": value_loss.detach() * n, "clip_frac": stats["clip_frac"] * n,
                          "approx_kl": stats["approx_kl"] * n}


class PromptBatches:
    """The batch source: shuffled training prompt indices, batch_size at a time, and the adaptive KL
    coefficient (both resume with the run)."""

    def __init__(self, n: int, batch_size: int, seed: int, kl_coef: float):
        from scratchllm.data.collate import ExampleBatches

        self.order = ExampleBatches(n, batch_size, lambda ix: list(ix), seed=seed)
        self.kl_coef = kl_coef

    @property
    def epoch(self) -> float:
        return self.order.epoch

    def next_batch(self) -> list[int]:
        return self.order.next_batch()

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict(), "kl_coef": self.kl_coef}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])
        self.kl_coef = float(state["kl_coef"])


def adapt_kl_coef(coef: float, kl: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)."""
    return coef * (1 + max(-0.2, min(0.2, kl / target - 1)) * n / horizon)


def dropout_off(model: nn.Module) -> None:
    """Every Dropout of `model` at p = 0: the log-probs of the rollouts and of the updates must match."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# --------------------------------------------------------------------------------------------- files
def split_state(state: dict) -> tuple[dict, dict]:
    """(the policy's tensors, the value function's tensors) of the Trainer's state dict."""
    value = {k: v for k, v in state.items() if k.startswith(VALUE_PREFIXES)}
    return {k: v for k, v in state.items() if k not in value}, value


def prompt_record(conv) -> dict:
    m = conv.messages
    if len(m) == 1 and "input" in m[0]:
        return {"instruction": m[0]["content"], "input": m[0]["input"]}
    return {"messages": [dict(x) for x in m]}


def plot_ppo(records: list[dict], png: Path) -> None:
    """Score and KL to the reference against rollout batches (training), with the held-out score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchllm.train.runlog import save_png

    train = [r for r in records if r.get("split") == "train" and isinstance(r.get("score"), int | float)]
    val = [r for r in records if r.get("split") == "val" and isinstance(r.get("score"), int | float)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    a.plot([r["step"] for r in train], [r["score"] for r in train], ".-", alpha=0.6, label="rollouts (sampled)")
    a.plot([r["step"] for r in val], [r["score"] for r in val], "o--", label="held-out prompts (greedy)")
    a.set(xlabel="rollout batch", ylabel="score", title="reward")
    a.legend()
    b.plot([r["step"] for r in train], [r["kl"] for r in train], ".-", color="C3")
    b.set(xlabel="rollout batch", ylabel="KL(policy || reference) per response, nats", title="KL to the reference")
    save_png(fig, png)


# --------------------------------------------------------------------------------------------- the stage
def ppo(cfg: PPOConfig, *, resume=None, overwrite: bool = False) -> dict:
    """RLHF as configured; returns the Trainer's summary."""
    from scratchllm.data.instructions import for_format
    from scratchllm.data.labelled import split
    from scratchllm.data.preferences import read_prompts
    from scratchllm.infer.engine import Engine
    from scratchllm.model.heads import SequenceClassifier
    from scratchllm.model.lora import apply_lora, count_lora_parameters, disable_lora, lora_settings
    from scratchllm.tokenizer.chat import render, turn_stops
    from scratchllm.train.core import Trainer
    from scratchllm.train.losses import gae, kl_penalty, whiten
    from scratchllm.train.reward import RewardModel
    from scratchllm.train.sft import choose_format
    from scratchllm.weights.checkpoint import open_model
    from scratchllm.weights.folder import save_weights, write_adapter_files, write_state_files
    from scratchllm.weights.state import read_safetensors

    run = stage.start(cfg, resume=resume, overwrite=overwrite, resume_free=stage.RESUME_FREE | {"samples", "max_kl"})
    tc, out = cfg.train, run.out
    if run.world > 1:
        raise ScratchError("ppo runs in one process (its rollouts are not sharded): start it without torchrun")
    train, val, test = split(read_prompts(cfg.prompts), tuple(cfg.split), seed=tc.seed)
    loaded = open_model(cfg.model)
    policy, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise ScratchError(f"--model {cfg.model} has no tokenizer: give a model folder that holds one")
    fmt = choose_format(cfg.template, loaded.chat, cfg.model)
    stop_ids, _ = turn_stops(fmt, tokenizer)
    if not stop_ids:
        raise ScratchError(f"the {fmt.name} format's end-of-turn has no token id in this tokenizer: responses "
                           "could not be cut at the end of the turn")
    eot = stop_ids[0]
    block = policy.config.block_size
    keep = min(cfg.max_length or block, block - cfg.max_new_tokens - 1)
    if keep < 1:
        raise ScratchError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in block_size {block}")
    cut = 0

    def prompt_ids(conv) -> list[int]:
        nonlocal cut
        ids = render(fmt, for_format(conv, fmt.name), tokenizer)
        cut += len(ids) > keep
        return ids[-keep:]

    train_ids, val_ids = [prompt_ids(c) for c in train], [prompt_ids(c) for c in val]
    texts = {"train": [user_text(c, fmt) for c in train], "val": [user_text(c, fmt) for c in val]}

    rule = load_rule(cfg.reward) if cfg.reward else None
    rm = None
    if cfg.reward_model:
        rm = RewardModel.load(cfg.reward_model)
        same = rm.tokenizer.fingerprint() == tokenizer.fingerprint()
        if not same and not cfg.retokenize:
            raise ScratchError(f"the reward model {rm.folder} has another tokenizer than the policy {cfg.model}: PPO "
                               "needs both to read the same text. Train the reward model on the policy's model, or "
                               "pass --retokenize to score the decoded responses re-tokenized by the reward model")

    dropout_off(policy)
    lora = None
    if cfg.lora_rank:
        apply_lora(policy, cfg.lora_rank, cfg.lora_alpha, 0.0, tuple(cfg.lora_targets))
        lora = lora_settings(policy)
    if cfg.value_head == "shared":
        head = nn.Linear(policy.config.n_embd, 1)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        policy.add_module("value_head", head)
    else:
        if cfg.value_init == "reward":
            if rm.tokenizer.fingerprint() != tokenizer.fingerprint():
                raise ScratchError("--value-init reward: the reward model reads another tokenizer than the policy, "
                                   "so as a value network it could not read the policy's tokens; use --value-init zero")
            value_model = RewardModel.load(cfg.reward_model).model
        else:
            value_model = SequenceClassifier(open_model(cfg.model).model, 1)
            nn.init.zeros_(value_model.head.weight)
            nn.init.zeros_(value_model.head.bias)
        dropout_off(value_model)
        policy.add_module("value_model", value_model.requires_grad_(True).train())
    frozen = {} if lora else {"ref": open_model(cfg.model).model}
    base = str(Path(cfg.model).resolve()) if Path(cfg.model).exists() else cfg.model
    mcfg = policy.config

    def write_model(folder: Path, state: dict) -> None:
        lm, value = split_state(state)
        if lora:
            write_adapter_files(folder, lm, base, lora, mcfg, tokenizer, chat=fmt)
        else:
            write_state_files(folder, lm, mcfg, tokenizer, chat=fmt)
        save_weights(folder, value, VALUE_FILE)

    def read_model(folder: Path) -> dict:
        state = read_safetensors(folder / "model.safetensors")
        if (folder / VALUE_FILE).is_file():
            state.update(read_safetensors(folder / VALUE_FILE))
        return state

    n_valid = tokenizer.vocab_size
    samples: list[dict] = []
    batches = PromptBatches(len(train), tc.batch_size, tc.seed, cfg.kl_coef)
    trainer_ref: dict = {}

    def generate(ids_list, greedy: bool) -> tuple[list[list[int]], list[bool]]:
        engine = Engine(policy, tokenizer, pack=False)
        # in the model's own dtype (the evaluation runs inside the Trainer's autocast; the cache is fp32)
        with torch.autocast(torch.device(trainer_ref["t"].device).type, enabled=False):
            raw = engine.generate_batch(ids_list, cfg.max_new_tokens, temperature=0.0 if greedy else cfg.temperature,
                                        stop=stop_ids, seed=int(torch.randint(0, 2**31 - 1, (1,))))
        ended = [len(r) < cfg.max_new_tokens for r in raw]
        return [r + [eot] if e else r for r, e in zip(raw, ended)], ended

    def score(split_name: str, indices: list[int], responses: list[list[int]], ended: list[bool],
              convs) -> list[float] | str:
        texts_out = [tokenizer.decode([t for t in r if t != eot]) for r in responses]
        if rule is not None:
            values = rule_scores(rule, cfg.reward, [texts[split_name][i] for i in indices], texts_out,
                                 [convs[i].where for i in indices])
            if isinstance(values, str):
                return values
        else:
            from scratchllm.data.instructions import Conversation

            # rendered as the reward model saw its training answers (its format, the turn's full ending)
            values = rm.score([Conversation(convs[i].messages + ({"role": "assistant", "content": t},),
                                            convs[i].where) for i, t in zip(indices, texts_out)]).tolist()
        return [v - (0.0 if e else cfg.missing_eos_penalty) for v, e in zip(values, ended)]

    def evaluate_prompts(indices: list[int]):
        responses, ended = generate([val_ids[i] for i in indices], greedy=True)
        scores = score("val", indices, responses, ended, val)
        if isinstance(scores, str):
            raise ScratchError(f"held-out evaluation: {scores}")
        step = trainer_ref["t"].step
        for i, r, s in zip(indices, responses, scores):
            if len(samples) < 10_000:
                samples.append({"step": step, "where": val[i].where, "prompt": texts["val"][i],
                                "response": tokenizer.decode([t for t in r if t != eot]), "score": s})
        n = len(indices)
        return (-torch.tensor(scores).sum(), {"count": n, "tokens": sum(len(r) for r in responses),
                                               "score": sum(scores), "response_length": sum(map(len, responses)),
                                               "ended": sum(ended)})

    objective = PPOObjective(cfg, n_valid, evaluate_prompts)
    n_eval = min(cfg.eval_prompts, len(val))

    def val_batches():
        for start in range(0, n_eval, tc.batch_size):
            yield {"kind": "eval", "indices": list(range(start, min(start + tc.batch_size, n_eval)))}

    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    info = {"model": cfg.model, "template": fmt.name,
            "reward": f"rule {cfg.reward}" if rule else f"reward model {rm.folder} (reading each answer rendered in its "
                                                          f"{rm.fmt.name} format)",
            "trainable": f"{trainable:,} parameters (policy"
                         + (f": {count_lora_parameters(policy):,} in LoRA adapters, rank {cfg.lora_rank}" if lora else "")
                         + f"; value function: {cfg.value_head}, init {cfg.value_init})",
            "reference": "the policy with its LoRA adapters off" if lora else "a frozen copy of the starting model",
            "prompts": f"{cfg.prompts}: {len(train)} train / {len(val)} val ({n_eval} scored per evaluation) / "
                       f"{len(test)} test" + (f"; {cut} prompts cut to their last {keep} tokens" if cut else ""),
            "rollouts": f"{tc.max_steps} batches of {tc.batch_size} prompts, up to {cfg.max_new_tokens} new tokens at "
                        f"temperature {cfg.temperature}; {cfg.ppo_epochs} PPO epochs of mini-batches of "
                        f"{cfg.mini_batch_size}",
            "KL": f"{cfg.kl_kind}, coefficient {cfg.kl_coef}" + (f" adapted towards {cfg.target_kl} nats"
                                                                   if cfg.target_kl else " (fixed)")}
    trainer = Trainer(policy, tc, objective, batches, out_dir=out, val_batches=val_batches if n_eval else None,
                      write_model=write_model, read_model=read_model, info=info,
                      save="trainable" if lora else "all", frozen=frozen)
    trainer_ref["t"] = trainer
    if rm is not None:
        rm.to(trainer.device)
    ref = trainer.frozen.get("ref")
    if run.resume_from is not None:
        trainer.resume(run.resume_from)
        if (out / SAMPLES_FILE).is_file():  # the held-out answers of the evaluations before the resumed step
            from scratchllm.io.jsonl import read_jsonl

            samples += [s for _, s in read_jsonl(out / SAMPLES_FILE) if s.get("step", 0) <= trainer.step]
    stage.write_config(run)
    atomic_write_text(out / TEST_FILE, "".join(json.dumps(prompt_record(c), ensure_ascii=False) + "\n" for c in test))
    device = trainer.device
    skipped_in_a_row = 0

    @torch.no_grad()
    def rollout(indices: list[int]):
        responses, ended = generate([train_ids[i] for i in indices], greedy=False)
        scores = score("train", indices, responses, ended, train)
        if isinstance(scores, str):
            return scores
        prompts = [train_ids[i] for i in indices]
        rows = [p + r for p, r in zip(prompts, responses)]
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        tokens = torch.zeros(len(rows), max(map(len, responses)), dtype=torch.long)
        for b, (row, r) in enumerate(zip(rows, responses)):
            ids[b, :len(row)] = torch.tensor(row)
            tokens[b, :len(r)] = torch.tensor(r)
        p_len = torch.tensor([len(p) for p in prompts])
        r_len = torch.tensor([len(r) for r in responses])
        pos, mask = response_positions(p_len, r_len, T)
        ids, tokens, pos, mask = ids.to(device), tokens.to(device), pos.to(device), mask.to(device)
        policy.eval()
        with trainer.autocast():
            old_logp, hp, entropy = token_logprobs(policy, ids, pos, tokens, cfg.temperature, n_valid, entropy=True)
            old_values = values_of(policy, ids, pos, hp)
            if ref is not None:
                ref_logp, _ = token_logprobs(ref, ids, pos, tokens, cfg.temperature, n_valid)
            else:
                with disable_lora(policy):
                    ref_logp, _ = token_logprobs(policy, ids, pos, tokens, cfg.temperature, n_valid)
        kl = kl_penalty(old_logp, ref_logp, cfg.kl_kind) * mask  # (B, L)
        rewards = -batches.kl_coef * kl
        last = (r_len - 1).to(device)
        rewards[torch.arange(len(rows), device=device), last] += torch.tensor(scores, device=device)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False) * mask
        adv, returns = gae(rewards, old_values * mask, mask, cfg.gamma, cfg.lam)
        adv = whiten(adv, mask) * mask
        data = {"ids": ids, "pos": pos, "tokens": tokens, "mask": mask, "old_logp": old_logp, "old_values": old_values,
                "adv": adv, "returns": returns}
        stats = {"score": sum(scores) / len(scores), "kl": float(kl.sum(1).mean()),
                 "entropy": float((entropy * mask).sum() / mask.sum()), "response_length": float(r_len.float().mean()),
                 "ended": sum(ended) / len(ended), "tokens": int(sum(map(len, rows)))}
        return data, stats

    def step() -> dict:
        nonlocal skipped_in_a_row
        indices = batches.next_batch()
        result = rollout(indices)
        number = trainer.step + 1  # this rollout batch's (the step advances after its optimizer steps)
        if isinstance(result, str):
            trainer.step += 1
            trainer.skipped_steps += 1
            skipped_in_a_row += 1
            print0(f"rollout batch {number} skipped: {result}")
            if skipped_in_a_row >= tc.max_bad_steps:
                raise ScratchError(f"{skipped_in_a_row} rollout batches in a row were skipped (last: {result}); "
                                   "fix the reward function")
            return {"loss": float("nan"), "count": 0, "tokens": 0, "skipped": True}
        skipped_in_a_row = 0
        data, stats = result
        policy.train()
        B = data["ids"].shape[0]
        sums: dict = {}
        n_opt = 0
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(B)
            for start in range(0, B, cfg.mini_batch_size):
                sel = perm[start:start + cfg.mini_batch_size].to(device)
                mb = {k: v[sel] for k, v in data.items()}
                m = trainer.optimizer_step([mb], advance=False)
                n_opt += 1
                for k in ("loss", "policy_loss", "value_loss", "clip_frac", "approx_kl", "grad_norm"):
                    sums[k] = sums.get(k, 0.0) + m[k]
        trainer.step += 1
        if stats["kl"] > cfg.max_kl:
            from scratchllm.weights.state import read_latest

            raise ScratchError(f"the KL to the reference reached {stats['kl']:.1f} nats per response at rollout batch "
                               f"{number} (over --max-kl {cfg.max_kl}): the policy ran away from the reference; "
                               f"stopped. Last good checkpoint: {read_latest(out) or 'none yet'} in {out}. Lower "
                               "--lr, raise --kl-coef or set --target-kl, then --resume")
        kl_coef = batches.kl_coef
        if cfg.target_kl:
            batches.kl_coef = adapt_kl_coef(batches.kl_coef, stats["kl"], cfg.target_kl, B, cfg.kl_horizon)
        return {**{k: v / n_opt for k, v in sums.items()}, **stats, "kl_coef": kl_coef, "count": B,
                "lr": m["lr"], "skipped": False}

    print0(f"PPO on {cfg.model} ({fmt.name} format) with {info['reward']}: {info['trainable']}; reference: "
           f"{info['reference']}; {len(train)} training prompts; {trainer.precision} on {device}; run folder {out}")
    summary = trainer.fit(step)
    if trainer.rank == 0:
        finish_outputs(out, samples, cfg.samples)
    summary["exit_code"] = stage.finish(summary)
    return summary


def user_text(conv, fmt) -> str:
    """The text a rule sees as the prompt: the last user message (with its input)."""
    from scratchllm.data.instructions import for_format

    messages = for_format(conv, fmt.name)
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def finish_outputs(out: Path, samples: list[dict], n: int) -> None:
    """ppo.png, samples.jsonl and the held-out samples (first and last evaluation) in report.md."""
    from scratchllm.train.runlog import add_report_section, read_metrics

    records = read_metrics(out / "metrics.jsonl")
    plot_ppo(records, out / "ppo.png")
    atomic_write_text(out / SAMPLES_FILE, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    if not samples:
        return
    steps = sorted({s["step"] for s in samples})
    lines = ["", "## Held-out samples (greedy)", "", "![score and KL](ppo.png)", ""]
    for step in dict.fromkeys((steps[0], steps[-1])):
        lines += [f"### rollout batch {step}", ""]
        for s in [s for s in samples if s["step"] == step][:n]:
            prompt, answer = ("".join(c if c.isprintable() else " " for c in " ".join(s[k].split()))
                              for k in ("prompt", "response"))  # one printable line each
            lines += [f"- **{prompt[:120]}** (score {s['score']:.3f})", f"  > {answer[:300]}"]
        lines.append("")
    report = out / "report.md"
    section = "\n".join(lines) + "\n"
    add_report_section(report, section)


def run(args) -> int:
    """`scratchllm ppo ...`."""
    cfg = stage.config_from_args(PPOConfig, args, FLAGS)
    summary = ppo(cfg, resume=getattr(args, "resume", None), overwrite=getattr(args, "overwrite", False))
    if summary["interrupted"]:
        return summary["exit_code"]
    val = summary["val"] or {}
    print0(f"done: {summary['step']} rollout batches" + (f", held-out score {val['score']:.4f}" if "score" in val
                                                         else "") + f"; outputs in {cfg.out}")
    return summary["exit_code"]
