"""The generation engine: prefill the prompt into a preallocated KV cache, then one token per step.

What it does: `Engine(model, tokenizer=None, n_valid=None)` runs a GPT (see model/) autoregressively.
- `generate(prompt_ids, max_new_tokens, ...)` yields new token ids one at a time;
- `generate_batch(prompts, max_new_tokens, ...)` runs prompts of different lengths together
  (left-padded, see KVCache.set_left_padding) and returns each one's new ids;
- `stream_text(prompt, max_new_tokens, ...)` yields text deltas that never split a UTF-8 character.
Sampling is sampling.py's (greedy when temperature=0); `seed` makes draws reproducible. `stop` holds
stop token ids and/or stop strings: a stop token is not returned; for a stop string, `generate` ends
before the token that completes it (earlier tokens of a multi-token stop string were already yielded),
and `stream_text` cuts the text exactly before it. A prompt longer than block_size keeps its last
block_size - max_new_tokens tokens with a warning (`truncate=False` makes that an error); with learned
positions, generation stops with a warning once the next token would have to be fed at position
block_size (prompt + new tokens = block_size + 1: the last new token is sampled, never fed). Models
whose vocab_size was padded past the tokenizer's (`scratchllm pretrain` rounds it up to a multiple of
64) never sample the padding ids: ids >= n_valid (default: the tokenizer's vocab_size) get -inf logits.
Each prompt is a 1-D sequence of ids (a list or a 1-D tensor).
`weights` picks how the Linear weights are stored while decoding (model/quant.py): None (default) runs
the model as it is; "auto" = bf16 on CPUs that can run the fused kernels (the model's own dtype
elsewhere); "bf16" / "int8" / "int4" decode from a quantized copy on the CPU (activations fp32); a
model already quantized with quant.quantize_model runs as it is. On the CPU the KV cache is kept in
fp32 even for a bf16 model: PyTorch's bf16 attention at decode measured 4x slower than fp32.
What it does not do: know how prompts are formatted or load models (see weights/checkpoint.py).

    >>> engine = Engine(model, tokenizer)
    >>> ids = list(engine.generate(tokenizer.encode("Once upon"), 20, temperature=0))
    >>> for delta in engine.stream_text("Once upon", 50, temperature=0.8, seed=1, stop=["\\n\\n"]):
    ...     print(delta, end="", flush=True)
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch

from scratchllm.common import ScratchError
from scratchllm.infer.detok import Detokenizer
from scratchllm.infer.packed import can_pack, packed_copy
from scratchllm.infer.sampling import SamplingParams, make_generator, sample
from scratchllm.model.kv_cache import KVCache
from scratchllm.model.quant import (
    block_formats,
    is_quantized,
    quantized_copy,
    resolve_weights,
    weight_formats,
    weights_label,
)


def split_stop(stop) -> tuple[set[int], list[str]]:
    """stop (None, an id, a string, or a list of ids and strings) -> (stop ids, stop strings).

    >>> split_stop([50256, "\\n\\n"])
    ({50256}, ['\\n\\n'])
    """
    if stop is None:
        return set(), []
    if isinstance(stop, (int, str)):
        stop = [stop]
    ids, strings = set(), []
    for s in stop:
        if isinstance(s, str) and s:
            strings.append(s)
        elif isinstance(s, int) and not isinstance(s, bool) and s >= 0:
            ids.add(s)
        else:
            raise ScratchError(f"stop entries must be token ids (int >= 0) or non-empty strings, got {s!r}")
    return ids, strings


def text_deltas(tokens: Iterable[int], detok: Detokenizer) -> Iterator[str]:
    """Non-empty text deltas of a token stream, ending at the detokenizer's first stop string."""
    for t in tokens:
        delta = detok.push(t)
        if delta:
            yield delta
        if detok.stopped:
            return
    tail = detok.finish()
    if tail:
        yield tail


class Engine:
    def __init__(self, model, tokenizer=None, pack: bool | None = None, n_valid: int | None = None,
                 weights: str | None = None):
        """pack: run a copy of the model with oneDNN-packed Linear weights (see packed.py); None = do so
        for bf16 models on the CPU, where it is faster (in fp32 it measured slower: docs/benchmarks.md).
        weights: None, auto, fp32, bf16, int8 or int4 (see the module doc).
        The copies snapshot the weights: make a new Engine after changing the model.
        n_valid: only ids < n_valid are ever sampled (the rest are padding rows of the output layer);
        None = the tokenizer's vocab_size, or every id of the model when there is no tokenizer."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        V = self.config.vocab_size
        if tokenizer is not None and tokenizer.vocab_size > V:
            raise ScratchError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                               f"{V} (vocab_size): they do not belong together")
        if n_valid is None:
            n_valid = tokenizer.vocab_size if tokenizer is not None else V
        if not isinstance(n_valid, int) or isinstance(n_valid, bool) or not 0 < n_valid <= V:
            raise ScratchError(f"n_valid must be an integer in [1, {V}] (the model's vocab_size), got {n_valid!r}")
        self.n_valid = n_valid
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.runner = self._runner(model, weights, pack)
        self.dtype = next(self.runner.parameters()).dtype  # fp32 for quantized weights
        self.weights = weights_label(self.runner)  # e.g. "int4+int8" for a GGUF Q4_1 model
        # bf16 attention at decode is ~4x slower than fp32 in PyTorch on CPUs: keep K/V in fp32 there
        self.cache_dtype = torch.float32 if self.device.type == "cpu" else self.dtype

    def _runner(self, model, weights: str | None, pack: bool | None):
        """The module that decodes: the model, a quantized copy, or a oneDNN-packed copy."""
        if is_quantized(model):
            have = weight_formats(model)
            if weights not in (None, "auto") and weights not in block_formats(model):
                raise ScratchError(f"the model is already quantized ({have}): weights={weights!r} cannot apply")
            if pack:
                raise ScratchError("pack=True cannot apply to a quantized model (its kernels are its own)")
            return model
        if weights is not None:
            fmt = resolve_weights(weights, self.device, self.dtype)
            own = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype)
            if fmt in ("int8", "int4") or (fmt == "bf16" and own == "fp32" and self.device.type == "cpu"):
                if pack:
                    raise ScratchError(f"pack=True cannot apply to {fmt} weights (their kernels are their own)")
                return quantized_copy(model, fmt)
            if fmt != own:
                raise ScratchError(f"weights={weights!r} means {fmt} here, but the model is {self.dtype}: cast "
                                   f"it (model.to(torch.{'bfloat16' if fmt == 'bf16' else 'float32'})) first")
        if pack and not can_pack(model):
            raise ScratchError(f"pack=True needs a CPU model in fp32 or bf16 with oneDNN support; this one is "
                               f"{self.dtype} on {self.device}")
        if pack is None:
            pack = self.dtype == torch.bfloat16 and can_pack(model)
        return packed_copy(model) if pack else model

    # ------------------------------------------------------------------ public API
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, stop=None, seed: int | None = None,
                 truncate: bool = True) -> Iterator[int]:
        """Yield up to max_new_tokens new token ids for one prompt (a list or 1-D tensor of ids).
        Arguments are checked at once (ScratchError), before the first token is asked for."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        run = self._run(*self._prepare([prompt_ids], max_new_tokens, stop, truncate), params, seed)
        return (step[0] for step in run)

    def generate_batch(self, prompts: Sequence, max_new_tokens: int, temperature: float = 1.0,
                       top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                       repetition_penalty: float | None = None, stop=None, seed: int | None = None,
                       truncate: bool = True) -> list[list[int]]:
        """New token ids for each prompt, all run in one batch. Greedy results equal one-by-one runs;
        sampled ones use one generator for the whole batch, so they differ from one-by-one draws."""
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
        out: list[list[int]] = [[] for _ in prompts]
        for step in self._run(*self._prepare(list(prompts), max_new_tokens, stop, truncate), params, seed):
            for row, token in enumerate(step):
                if token is not None:
                    out[row].append(token)
        return out

    def stream_text(self, prompt, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, stop=None, seed: int | None = None,
                    truncate: bool = True) -> Iterator[str]:
        """Yield text deltas of the continuation of `prompt` (text or ids); stop strings are cut off."""
        tok = self._need_tokenizer("stream_text")
        ids = tok.encode(prompt) if isinstance(prompt, str) else prompt
        stop_ids, stop_strings = split_stop(stop)
        detok = Detokenizer(tok, stop_strings)
        tokens = self.generate(ids, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                               sorted(stop_ids), seed, truncate)
        return text_deltas(tokens, detok)

    # ------------------------------------------------------------------ the loop
    def _prepare(self, prompts: list, max_new_tokens: int, stop, truncate: bool):
        """Check the arguments (eagerly, so errors show before any work); fit prompts to block_size."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ScratchError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not prompts:
            raise ScratchError("no prompts given")
        stop_ids, stop_strings = split_stop(stop)
        detoks = None
        if stop_strings:
            tok = self._need_tokenizer("stop strings")
            detoks = [Detokenizer(tok, stop_strings) for _ in prompts]
        prompts = [self._fit_prompt(p, max_new_tokens, truncate) for p in prompts]
        return prompts, max_new_tokens, stop_ids, detoks

    @torch.inference_mode()
    def _run(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
             detoks: list[Detokenizer] | None, params: SamplingParams, seed: int | None) \
            -> Iterator[list[int | None]]:
        """Per decode step, the new token of each row (None once a row has stopped). Ends when every
        row has stopped, after max_new_tokens steps, or at block_size (learned positions)."""
        cfg, B = self.config, len(prompts)
        lens = [len(p) for p in prompts]
        T = max(lens)
        steps = max_new_tokens
        if cfg.positions == "learned":
            # positions 0 .. block_size-1 can be fed; the logits at the last one still predict a token,
            # and the last new token is never fed: at most block_size - T + 1 new tokens
            steps = min(steps, cfg.block_size - T + 1)
        if steps <= 0:
            if steps < max_new_tokens:
                self._warn_block_size(steps)
            return

        # prefill: left-pad to the longest prompt; the cache holds the prompt and every new token
        idx = torch.zeros(B, T, dtype=torch.long)
        for b, p in enumerate(prompts):
            idx[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        idx = idx.to(self.device)  # (B, T)
        cache = KVCache(cfg, B, T + steps - 1, device=self.device, dtype=self.cache_dtype)  # last token not fed
        if min(lens) < T:
            cache.set_left_padding(torch.tensor([T - n for n in lens]))
        seen = None
        if params.repetition_penalty not in (None, 1):
            seen = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=self.device)  # (B, V)
            for b, n in enumerate(lens):
                seen[b, idx[b, T - n:]] = True
        gen = make_generator(seed, self.device)
        hidden = self.runner.hidden_states(idx, kv_cache=cache)  # (B, T, n_embd)
        logits = self.runner.lm_head(hidden[:, -1])  # (B, V): only the last position is needed

        done = [False] * B
        for step in range(steps):
            if self.n_valid < cfg.vocab_size:
                logits[:, self.n_valid:] = float("-inf")  # padding rows of the head: ids no tokenizer has
            next_ids = sample(logits, params, gen, seen)  # (B,)
            tokens = next_ids.tolist()
            out: list[int | None] = []
            for b, t in enumerate(tokens):
                if not done[b] and t in stop_ids:
                    done[b] = True
                if not done[b] and detoks is not None:
                    detoks[b].push(t)
                    done[b] = detoks[b].stopped
                out.append(None if done[b] else t)
            if all(done):
                return
            yield out
            if step + 1 == steps:
                break
            if seen is not None:
                seen.scatter_(1, next_ids[:, None], True)
            logits = self.runner(next_ids[:, None], kv_cache=cache)[:, -1]  # (B, 1, V) -> (B, V)
        if steps < max_new_tokens:
            self._warn_block_size(steps)

    # ------------------------------------------------------------------ helpers
    def _fit_prompt(self, prompt, max_new_tokens: int, truncate: bool) -> list[int]:
        """Prompt ids as a list; a prompt longer than block_size keeps its last block_size -
        max_new_tokens tokens (with a warning), or raises when truncate is False."""
        if isinstance(prompt, torch.Tensor) and prompt.dim() != 1:
            raise ScratchError(f"a prompt must be a 1-D sequence of token ids, got a tensor of shape "
                               f"{tuple(prompt.shape)}: pass prompt[0] for a (1, T) tensor, or give "
                               f"generate_batch a list of 1-D prompts")
        if isinstance(prompt, (str, bytes)):
            raise ScratchError(f"a prompt must be token ids, got {type(prompt).__name__} {prompt[:20]!r}: "
                               f"encode it first (or use stream_text, which takes text)")
        ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
        if any(isinstance(t, (list, tuple, torch.Tensor)) for t in ids):
            raise ScratchError("a prompt must be a 1-D sequence of token ids, got a nested sequence: pass "
                               "one list of ids to generate, or a list of such lists to generate_batch")
        if not ids:
            raise ScratchError("empty prompt: give at least one token (e.g. the tokenizer's <|endoftext|> id)")
        V, block = self.config.vocab_size, self.config.block_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise ScratchError(f"prompt token ids {bad[:5]} are outside this model's vocabulary [0, {V})")
        if len(ids) <= block:
            return ids
        keep = block - max_new_tokens
        what = f"the prompt has {len(ids)} tokens, more than the model's block_size {block}"
        if not truncate:
            raise ScratchError(f"{what} (shorten it, or allow truncation to keep its last tokens)")
        if keep <= 0:
            raise ScratchError(f"{what}, and max_new_tokens ({max_new_tokens}) leaves no room for it: "
                               f"use max_new_tokens < {block}")
        warnings.warn(f"{what}: keeping its last {keep} tokens (block_size - max_new_tokens)", stacklevel=2)
        return ids[-keep:]

    def _warn_block_size(self, steps: int) -> None:
        block = self.config.block_size
        warnings.warn(f"stopped after {steps} new token(s): the sequence reached block_size {block} + 1 "
                      f"tokens; feeding the next one would need position {block}, past the last one "
                      f"({block - 1}) this model's learned position embeddings know (use a shorter prompt "
                      f"for longer continuations)", stacklevel=3)

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ScratchError(f"{what} need a tokenizer: create the engine as Engine(model, tokenizer)")
        return self.tokenizer
