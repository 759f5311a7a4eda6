"""The `scratchllm chat` subcommand: a multi-turn terminal chat with a model, in its chat format.

What it does: loads anything `--model` accepts (as `generate` does), keeps the conversation as a list
of messages and re-renders all of it each turn in the model's chat format (its chat.json, or
`--chat-format`), streaming the answer to stdout as it is produced; the answer joins the history. A
turn ends at the format's stop tokens, at <|endoftext|>, or at a stop string (phi3's markers written
as text), which is cut off from the shown and stored answer. When the conversation plus
--max-new-tokens no longer fits the model's block_size, the oldest user/assistant exchanges are dropped
(never the system prompt) with a one-line notice on stderr (a --max-new-tokens that leaves no room at
all becomes half the block, with a notice); a message too long even on its own is
refused with a message, and the chat goes on. Ctrl-C while an answer streams stops that answer (the
partial answer stays in the history, `[stopped]` on stderr); Ctrl-C or Ctrl-D at the prompt leaves
(exit code 0). With a terminal on stdin it prompts `you> `; piped stdin gives one message per non-empty
line (no prompt), and `--message TEXT` (repeatable) answers the given messages in order, then exits.
Commands (lines starting with `/`) work in every mode; their replies go to stderr, so stdout holds
only the answers:
  /system TEXT   set the system prompt; the conversation is kept (/reset clears it)
  /system        show the system prompt
  /reset         clear the conversation (the system prompt stays)
  /temperature X sampling temperature, a number >= 0 (0 = greedy); alone: show it
  /help          list the commands (an unknown command does too)
  /exit, /quit   leave
What it does not do: define chat formats (tokenizer/chat.py), sample (sampling.py, engine.py),
summarise old turns, save conversations, or serve (serve/).

    scratchllm chat --model smollm2-135m-instruct
    scratchllm chat --model runs/sft/run --chat-format chatml --temperature 0 --message "Hi" --message "Why?"
    printf 'Hi\\n/temperature 0\\nWhat is 2+2?\\n' | scratchllm chat --model smollm2-135m-instruct

    >>> session = ChatSession(Engine(model, tok), tok, FORMATS["chatml"], sampling={"temperature": 0})
    >>> "".join(session.send("What is the capital of France?"))
    'Paris.'
    >>> session.command("/reset")
    'conversation cleared (the system prompt stays)'

"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from scratchllm.common import ScratchError
from scratchllm.infer.detok import Detokenizer
from scratchllm.infer.engine import text_deltas
from scratchllm.tokenizer.chat import FORMATS, ChatFormat, pick_format, render, turn_stops

HELP = """commands:
  /system TEXT    set the system prompt (the conversation is kept)
  /system         show the system prompt
  /reset          clear the conversation (the system prompt stays)
  /temperature X  sampling temperature, >= 0 (0 = greedy)
  /help           this list
  /exit, /quit    leave (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during an answer stops it)"""


class ChatSession:
    def __init__(self, engine, tokenizer, fmt: ChatFormat, system: str | None = None,
                 max_new_tokens: int = 256, sampling: dict | None = None, verbose: bool = False):
        """engine: an Engine (generate + config.block_size); system: the system prompt (None = the
        format's own default, if any); sampling: Engine.generate's keyword arguments (temperature,
        top_k, top_p, min_p, repetition_penalty, seed); temperature defaults to 0.7."""
        self.engine, self.tokenizer, self.fmt, self.system = engine, tokenizer, fmt, system
        self.block_size = engine.config.block_size
        if max_new_tokens < 1:
            raise ScratchError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if max_new_tokens >= self.block_size:  # no room left for the conversation: use half the block
            print(f"[--max-new-tokens {max_new_tokens} leaves no room for the conversation in the model's "
                  f"block_size {self.block_size}: answers get at most {self.block_size // 2} tokens]",
                  file=sys.stderr)
            max_new_tokens = self.block_size // 2
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": 0.7, **(sampling or {})}
        self.verbose = verbose
        self.stop_ids, self.stop_strings = turn_stops(fmt, tokenizer)  # ids end the engine; texts, the Detokenizer
        self.messages: list[dict] = []  # user and assistant messages, in turn (no system message)
        self.last_prompt: list[int] = []  # the ids the last answer was generated from
        self.last_stats = (0, 0.0)  # (tokens, seconds) of the last answer
        render(fmt, [{"role": "user", "content": ""}], tokenizer)  # the tokenizer lacks a token: fail now

    # ------------------------------------------------------------------ one turn
    def _conversation(self, turns: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + turns

    def _fit(self, text: str) -> list[int]:
        """Prompt ids of the conversation + a new user message, dropping the oldest exchanges (for
        good) until they and max_new_tokens fit block_size; ScratchError when the message alone does not."""
        turns = [*self.messages, {"role": "user", "content": text}]
        while True:
            ids = render(self.fmt, self._conversation(turns), self.tokenizer, add_generation_prompt=True)
            if len(ids) + self.max_new_tokens <= self.block_size:
                break
            if len(turns) == 1:
                raise ScratchError(f"this message does not fit: with the system prompt and chat template it "
                                   f"is {len(ids)} tokens, + --max-new-tokens {self.max_new_tokens} for the "
                                   f"answer, more than the model's block_size {self.block_size}; send a "
                                   "shorter one (or lower --max-new-tokens)")
            turns = turns[2:]  # the oldest user message and its answer
        dropped = (len(self.messages) + 1 - len(turns)) // 2
        if dropped:
            print(f"[dropped the oldest {dropped} exchange(s) to fit the model's block_size "
                  f"{self.block_size}]", file=sys.stderr)
            self.messages = turns[:-1]
        return ids

    def send(self, text: str) -> Iterator[str]:
        """The answer to a user message, as text deltas. The fitting (and a ScratchError for a message
        that cannot fit) happens now; the exchange joins the history when the stream ends or is closed
        (a partial answer when closed early or interrupted), as the text shown so far."""
        prompt = self._fit(text)
        self.last_prompt = prompt
        return self._stream(text, prompt)

    def _stream(self, text: str, prompt: list[int]) -> Iterator[str]:
        n, t0 = 0, time.perf_counter()
        tokens = self.engine.generate(prompt, self.max_new_tokens, stop=self.stop_ids, **self.sampling)

        def counted(it: Iterable[int]) -> Iterator[int]:
            nonlocal n
            for t in it:
                n += 1
                yield t

        detok = Detokenizer(self.tokenizer, self.stop_strings)
        deltas = text_deltas(counted(tokens), detok)
        try:
            yield from deltas
        finally:  # also on close() and KeyboardInterrupt: keep what was shown
            deltas.close()
            tokens.close()  # text_deltas may leave it suspended (after a stop string)
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": detok.text}]
            self.last_stats = (n, time.perf_counter() - t0)

    # ------------------------------------------------------------------ commands
    def command(self, line: str) -> str | None:
        """Run a /command line; returns the reply to show, or None when it asks to leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return None
        if name == "/reset":
            self.messages = []
            return "conversation cleared (the system prompt stays)"
        if name == "/system":
            if arg:
                self.system = arg
                return "system prompt set (the conversation is kept; /reset clears it)"
            if self.system is not None:
                return f"system prompt: {self.system}"
            if self.fmt.system_prompt is not None:
                return f"system prompt (the {self.fmt.name} format's default): {self.fmt.system_prompt}"
            return "no system prompt (set one with /system TEXT)"
        if name == "/temperature":
            if arg:
                try:
                    value = float(arg)
                except ValueError:
                    value = -1.0
                if not (math.isfinite(value) and value >= 0):
                    return f"/temperature needs a number >= 0 (0 = greedy), got {arg!r}; it stays " \
                           f"{self.sampling['temperature']}"
                self.sampling["temperature"] = value
            t = self.sampling["temperature"]
            return f"temperature {t}" + (" (greedy)" if t == 0 else "")
        if name == "/help":
            return HELP
        return f"unknown command {name}\n{HELP}"

    # ------------------------------------------------------------------ the loops
    def handle(self, line: str, out: TextIO) -> bool:
        """One input line: a command, or a message whose answer streams to `out`. False = leave."""
        line = line.rstrip("\r\n")
        if not line.strip():
            return True
        if line.startswith("/"):
            reply = self.command(line)
            if reply is not None:
                print(reply, file=sys.stderr, flush=True)
            return reply is not None
        try:
            deltas = self.send(line)
        except ScratchError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return True
        try:
            for delta in deltas:
                out.write(delta)
                out.flush()
            out.write("\n")
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            print("[stopped]", file=sys.stderr, flush=True)
        finally:
            deltas.close()
        out.flush()
        if self.verbose:
            n, seconds = self.last_stats
            print(f"[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr, flush=True)
        return True

    def run_lines(self, lines: Iterable[str], out: TextIO) -> int:
        """Answer each line (piped stdin or --message) in order; returns the exit code."""
        for line in lines:
            if not self.handle(line, out):
                break
        return 0

    def interactive(self, out: TextIO) -> int:
        """The terminal loop: prompt `you> `, answer, until /exit, Ctrl-D or Ctrl-C at the prompt."""
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print("chat with the model; /help lists the commands", file=sys.stderr)
        while True:
            try:
                line = input("you> ")
            except (EOFError, KeyboardInterrupt):
                out.write("\n")
                return 0
            if not self.handle(line, out):
                return 0


def chat(args) -> int:
    from scratchllm.infer.commands import open_for_inference
    from scratchllm.infer.engine import Engine
    from scratchllm.infer.sampling import SamplingParams

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                    repetition_penalty=args.repetition_penalty)
    SamplingParams(**sampling)  # check before loading the model
    loaded, _, what = open_for_inference(args.model, args.device, args.precision, "a chat", args.weights)
    if args.verbose:
        print(f"[{what}]", file=sys.stderr)
    fmt = pick_format(args.chat_format, loaded.chat)
    if fmt is None:
        raise ScratchError(f"{args.model} does not say which chat format it speaks (no chat.json, or a chat "
                           f"template we do not know): pass --chat-format ({', '.join(FORMATS)})")
    engine = Engine(loaded.model, loaded.tokenizer)
    session = ChatSession(engine, loaded.tokenizer, fmt, system=args.system,
                          max_new_tokens=args.max_new_tokens, sampling={**sampling, "seed": args.seed},
                          verbose=args.verbose)
    if args.message:
        return session.run_lines(args.message, sys.stdout)
    if sys.stdin.isatty():
        return session.interactive(sys.stdout)
    return session.run_lines(sys.stdin, sys.stdout)
