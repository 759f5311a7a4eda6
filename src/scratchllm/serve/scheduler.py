"""The scheduler: continuous batching of many requests over one model, in one loop.

What it does: `Scheduler(engine, max_batch, max_queue)` owns the model. `submit(request)` puts a
Request in a bounded waiting queue (QueueFull when it is full). The loop (`run()` in the calling
thread, or `start()` for a background one) admits waiting requests while slots are free and prefills
their prompts together into fresh rows of a SlotKVCache (right-padded; a prompt once for all n choices
of its request), then runs one decode step for every live sequence together, samples each sequence's
next token with its own parameters and generator, and retires the sequences that ended (stop token,
stop string, max_tokens) or whose client went away (`request.cancel()`), moving the last live row
into the freed one so the live rows stay packed at the front. A sequence's text goes through its own
Detokenizer, so deltas never split a UTF-8 character and never show any part of a stop string.
Events reach the request's `sink` (called from the loop's thread, once per step with the list of
that step's events): ("delta", index, text) and ("done", index, finish_reason, completion_tokens),
or ("error", None, message).
What it does not do: speak HTTP or JSON (see app.py), or load models.

    sched = Scheduler(Engine(model, tokenizer), max_batch=16, max_queue=64)
    sched.start()
    sched.submit(Request(prompt_ids, max_tokens=50, params=SamplingParams(0.0), sink=print))
    # prints [('delta', 0, 'Once')], [('delta', 0, ' upon')], ..., [('done', 0, 'length', 50)]

Greedy output does not depend on the company a sequence keeps: each row is masked to its own columns,
so batching changes only the matrix shapes of a step (tests/test_serve.py checks 32 streams).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from scratchllm.common import ScratchError
from scratchllm.infer.detok import Detokenizer
from scratchllm.infer.sampling import SamplingParams, make_generator, sample
from scratchllm.model.kv_cache import SlotKVCache


class QueueFull(ScratchError):
    """The waiting queue holds max_queue requests: the client should retry later (HTTP 429)."""


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int  # most new tokens per choice (the stop token, when one ends it, counts as one)
    params: SamplingParams
    sink: Callable[[list[tuple]], None]  # receives each step's events, from the scheduler thread
    n: int = 1  # choices: n sequences from the same prompt, choice i seeded with seed + i
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    cancelled: bool = False

    def cancel(self) -> None:
        """The client went away: free its slots at the next step (safe from any thread)."""
        self.cancelled = True


@dataclass
class Sequence:
    request: Request
    index: int  # which choice of its request
    detok: Detokenizer
    gen: torch.Generator | None
    generated: int = 0
    next_id: int = -1  # the token to feed at the next decode step
    finish: str | None = None  # "stop" or "length" once it ended
    seen: torch.Tensor | None = None  # (V,) bool: prompt and sampled ids, for a repetition penalty


class Scheduler:
    def __init__(self, engine, max_batch: int = 16, max_queue: int = 64, prefill_tokens: int = 2048):
        if max_batch < 1 or max_queue < 1:
            raise ScratchError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.prefill_tokens = prefill_tokens  # most (prompts x longest prompt) prefilled in one forward
        self.context = engine.config.block_size
        # a bf16 model on a CPU attends in fp32: PyTorch's bf16 attention there is 4-5x slower (kv_cache.py)
        self.cache = SlotKVCache(engine.config, max_batch, self.context, device=engine.device,
                                 dtype=engine.cache_dtype)
        self.waiting: collections.deque[Request] = collections.deque()
        self.live: list[Sequence] = []  # live[i] sits in cache row i
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._running = False
        self._started = threading.Event()
        self._events: dict[int, tuple[Request, list]] = {}  # this step's events, by request
        self._admitting: list[Request] = []  # taken from the queue, being prefilled
        self.steps = 0  # decode steps run (each serves every live sequence)
        self.peak_batch = 0  # the most sequences decoded in one step

    # ------------------------------------------------------------------ public API
    def start(self) -> None:
        """Run the loop in a background thread (tests, notebooks; `scratchllm serve` calls run() in the
        main thread instead: bf16 matmuls measured 1.5x slower from another thread, docs/serve.md)."""
        self._thread = threading.Thread(target=self.run, name="scratchllm-scheduler", daemon=True)
        self._thread.start()
        self._started.wait()

    def run(self, keep_going: Callable[[], bool] = lambda: True) -> None:
        """The scheduler loop, in the calling thread, until stop() or until keep_going() is False
        (checked at least twice a second)."""
        self._running = True
        self._started.set()
        try:
            self._loop(keep_going)
        finally:  # normal end, Ctrl-C or a crash: no request may wait forever
            self._running = False
            with self._cond:
                left = [*self.waiting, *self._in_flight()]
                self.waiting.clear()
                self.live.clear()
                self._admitting = []
            for request in left:
                request.sink([("error", None, "the server is shutting down")])

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._running and not self._stopping

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when max_queue requests already wait."""
        if not 1 <= request.n <= self.max_batch:
            raise ScratchError(f"n={request.n}: this server runs at most {self.max_batch} sequences at once")
        with self._cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting): retry later")
            self.waiting.append(request)
            self._cond.notify()

    def load(self) -> dict:
        return {"running": len(self.live), "waiting": len(self.waiting), "max_batch": self.max_batch,
                "max_queue": self.max_queue, "steps": self.steps, "peak_batch": self.peak_batch}

    # ------------------------------------------------------------------ the loop
    def _loop(self, keep_going: Callable[[], bool]) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.live and keep_going():
                        self._cond.wait(timeout=0.5)
                    if self._stopping or not keep_going():
                        break
                    self._admitting = self._take_admissible()
                try:
                    for batch in self._prefill_batches(self._admitting):
                        self._prefill(batch)
                    self._admitting = []
                    self._retire()
                    if self.live:
                        self._decode_step()
                        self._retire()
                except Exception as e:  # a bug or out of memory: fail the requests, keep serving
                    message = f"generation failed: {type(e).__name__}: {e}"
                    for request in self._in_flight():
                        request.sink([("error", None, message)])
                    self.live.clear()
                    self._admitting = []
                    self._events.clear()

    def _in_flight(self) -> list[Request]:
        """The requests taken from the queue and not yet ended (each once)."""
        return list({id(r): r for r in [*self._admitting, *(s.request for s in self.live)]}.values())

    def _take_admissible(self) -> list[Request]:
        """Pop waiting requests (oldest first) while their choices fit in the free slots."""
        out, free = [], self.max_batch - len(self.live)
        while self.waiting:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft()
                continue
            if request.n > free:
                break
            out.append(self.waiting.popleft())
            free -= request.n
        return out

    def _prefill(self, requests: list[Request]) -> None:
        """Run the prompts of newly admitted requests into the next free rows, together (right-padded
        to the longest: on a CPU one batch of 8 prompts of 45 tokens measured 1.6x faster than 8 runs),
        copy each prompt's row for its other choices, and sample every choice's first token."""
        eng, cache = self.engine, self.cache
        row0, m = len(self.live), len(requests)
        lens = [len(r.prompt_ids) for r in requests]
        idx = torch.zeros(m, max(lens), dtype=torch.long)  # (m, T), padding after each prompt
        for b, r in enumerate(requests):
            idx[b, :lens[b]] = torch.tensor(r.prompt_ids, dtype=torch.long)
            cache.set_length(row0 + b, 0)
        cache.select(row0, m)
        hidden = eng.runner.hidden_states(idx.to(eng.device), kv_cache=cache)  # (m, T, n_embd)
        logits = eng.runner.lm_head(hidden[torch.arange(m), torch.tensor(lens) - 1])  # (m, V): each last token
        for b, n in enumerate(lens):
            cache.set_length(row0 + b, n)  # the padding columns are hidden, then overwritten by decoding
        firsts = [self._new_sequence(r, 0) for r in requests]  # choice 0 sits in the row of its prompt
        extras, extra_rows = [], []
        for b, r in enumerate(requests):  # the other choices copy it into the rows after the prompts
            for i in range(1, r.n):
                cache.move(row0 + b, row0 + m + len(extras))
                extras.append(self._new_sequence(r, i))
                extra_rows.append(b)
        self.live += firsts + extras
        self._sample(firsts + extras, logits[torch.tensor(list(range(m)) + extra_rows)])

    def _prefill_batches(self, requests: list[Request]):
        """Admitted requests in prefill batches of at most prefill_tokens (batch x longest prompt)."""
        batch, longest = [], 0
        for r in requests:
            n = len(r.prompt_ids)
            if batch and max(longest, n) * (len(batch) + 1) > self.prefill_tokens:
                yield batch
                batch, longest = [], 0
            batch.append(r)
            longest = max(longest, n)
        if batch:
            yield batch

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        eng = self.engine
        gen = None if request.params.greedy else make_generator(
            None if request.seed is None else request.seed + index, eng.device)
        seen = None
        if request.params.repetition_penalty not in (None, 1):  # as Engine does: the prompt counts as seen
            seen = torch.zeros(eng.config.vocab_size, dtype=torch.bool, device=eng.device)
            seen[torch.tensor(request.prompt_ids, device=eng.device)] = True
        return Sequence(request, index, Detokenizer(eng.tokenizer, request.stop_strings), gen, seen=seen)

    def _decode_step(self) -> None:
        n = len(self.live)
        self.cache.select(0, n)
        ids = torch.tensor([[s.next_id] for s in self.live], dtype=torch.long, device=self.engine.device)
        logits = self.engine.runner(ids, kv_cache=self.cache)[:, -1]  # (n, V)
        self.steps += 1
        self.peak_batch = max(self.peak_batch, n)
        self._sample(self.live, logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each sequence's next token from its row of logits (n, V) and emit what it adds."""
        eng = self.engine
        if eng.n_valid < logits.shape[-1]:
            logits = logits.clone()
            logits[:, eng.n_valid:] = float("-inf")  # padding rows of the head: ids no tokenizer has
        greedy = logits.argmax(dim=-1).tolist()  # one pass for every greedy row
        for b, seq in enumerate(seqs):
            params = seq.request.params
            if params.greedy and seq.seen is None:
                t = greedy[b]
            else:
                t = int(sample(logits[b:b + 1], params, seq.gen, None if seq.seen is None else seq.seen[None])[0])
            if seq.seen is not None:
                seq.seen[t] = True
            self._emit(seq, t)
        self._flush()

    def _emit(self, seq: Sequence, token: int) -> None:
        request = seq.request
        seq.generated += 1
        if token in request.stop_ids:
            seq.finish = "stop"
        else:
            delta = seq.detok.push(token)
            if delta:
                self._event(request, ("delta", seq.index, delta))
            if seq.detok.stopped:
                seq.finish = "stop"
            elif seq.generated >= request.max_tokens:
                seq.finish = "length"
        if seq.finish is None:
            seq.next_id = token
            return
        tail = seq.detok.finish()
        if tail:
            self._event(request, ("delta", seq.index, tail))
        self._event(request, ("done", seq.index, seq.finish, seq.generated))

    def _event(self, request: Request, event: tuple) -> None:
        self._events.setdefault(id(request), (request, []))[1].append(event)

    def _flush(self) -> None:
        """Hand each request the events of this step in one call (one wake-up of the HTTP side)."""
        events, self._events = self._events, {}
        for request, batch in events.values():
            request.sink(batch)

    def _retire(self) -> None:
        """Drop ended and cancelled sequences; the last live row moves into each freed row."""
        for i in range(len(self.live) - 1, -1, -1):
            seq = self.live[i]
            if seq.finish is None and not seq.request.cancelled:
                continue
            last = len(self.live) - 1
            if i != last:
                self.cache.move(last, i)
                self.live[i] = self.live[last]
            self.live.pop()
