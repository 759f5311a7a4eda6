"""Preference data (a prompt, a chosen and a rejected answer) and prompt lists, for reward models, DPO and PPO.

What it does: `read_pairs(spec)` reads a `.json` array, a `.jsonl` file or `data:NAME` (e.g.
data:instruction-data-with-preference, the book's 1100 records) of records with `chosen` and
`rejected` strings and a prompt given as the book's `instruction` (+ optional `input`), as `prompt`
(a string: one user message) or as `messages` (the conversation before the answer, ending with a
user message). Each becomes a `Pair`; a pair whose chosen answer equals its rejected one teaches
nothing and is skipped, counted and named (`PairSet.identical`). Errors name the file:line (or
file[i]) and the field. `Pair.conversation(answer)` is the prompt + that answer as a
data.instructions.Conversation, so SFT's rendering and masks (train/sft.encode) apply unchanged.
`read_prompts(spec)` reads prompts for PPO: JSONL/JSON records with a `prompt` string, chats
(`messages`; a trailing assistant message is dropped: the policy answers in its place) or the book's
instruction records (their `output`, `chosen`, `rejected` are ignored).
What it does not do: tokenize, split or batch (train/reward.py, train/dpo.py, train/ppo.py).

    pairs = read_pairs("data:instruction-data-with-preference")   # PairSet: 1094 pairs, 6 identical skipped
    ids, mask = encode(pairs.pairs[0].conversation(pairs.pairs[0].chosen), fmt, tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scratchllm.common import ScratchError
from scratchllm.data.instructions import Conversation, check_messages, read_records


@dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]  # the messages before the answer ({"role", "content"} (+ "input" from a book record))
    chosen: str
    rejected: str
    where: str  # "file:line" or "file[i]"

    def conversation(self, answer: str) -> Conversation:
        return Conversation(self.prompt + ({"role": "assistant", "content": answer},), self.where)


@dataclass
class PairSet:
    pairs: list[Pair]
    identical: list[str] = field(default_factory=list)  # where the skipped pairs (chosen == rejected) were

    def summary(self) -> str:
        s = f"{len(self.pairs)} pairs"
        if self.identical:
            s += (f"; {len(self.identical)} skipped because chosen == rejected ({', '.join(self.identical[:3])}"
                  + (" ..." if len(self.identical) > 3 else "") + ")")
        return s


def _string_field(obj: dict, name: str, where: str) -> str:
    value = obj[name]
    if not isinstance(value, str):
        raise ScratchError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def prompt_messages(obj, where: str, drop_answer: bool = False) -> tuple[dict, ...]:
    """The messages before the answer of a record: `messages`, `prompt` or `instruction` (+ `input`)."""
    if not isinstance(obj, dict):
        raise ScratchError(f"{where}: expected an object with a prompt ('instruction', 'prompt' or 'messages'); got "
                           f"{type(obj).__name__} {str(obj)[:60]!r}")
    if "messages" in obj:
        messages = check_messages(obj["messages"], where)
        if drop_answer and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise ScratchError(f"{where}: the prompt's messages must end with a user message (the one answered)")
        return tuple({"role": m["role"], "content": m["content"]} for m in messages)
    if "prompt" in obj:
        return ({"role": "user", "content": _string_field(obj, "prompt", where)},)
    if "instruction" in obj:
        user = {"role": "user", "content": _string_field(obj, "instruction", where)}
        user["input"] = _string_field(obj, "input", where) if "input" in obj else ""
        return (user,)
    raise ScratchError(f"{where}: no prompt: give 'instruction' (+ 'input'), 'prompt' or 'messages'; the record has "
                       f"{sorted(obj) or 'no fields'}")


def read_pairs(spec: str, skip_identical: bool = True) -> PairSet:
    """Preference records -> PairSet (see the module doc). skip_identical=False keeps every pair (a
    caller that splits first, so the splits match those of the same file's records elsewhere, then
    drops them per split with `drop_identical`)."""
    out = PairSet([])
    for where, obj in read_records(spec, "preference records"):
        prompt = prompt_messages(obj, where)
        missing = [f for f in ("chosen", "rejected") if f not in obj]
        if missing:
            raise ScratchError(f"{where}: no {' and no '.join(repr(f) for f in missing)} field: a preference record "
                               f"needs the chosen and the rejected answer as strings; it has {sorted(obj)}")
        chosen, rejected = _string_field(obj, "chosen", where), _string_field(obj, "rejected", where)
        if chosen == rejected and skip_identical:
            out.identical.append(where)
            continue
        out.pairs.append(Pair(prompt, chosen, rejected, where))
    if not out.pairs or (not skip_identical and all(p.chosen == p.rejected for p in out.pairs)):
        raise ScratchError(f"{spec}: every pair has chosen == rejected: nothing to learn")
    return out


def drop_identical(pairs: list[Pair]) -> PairSet:
    """The pairs whose chosen and rejected answers differ, and where the others were."""
    return PairSet([p for p in pairs if p.chosen != p.rejected], [p.where for p in pairs if p.chosen == p.rejected])


def read_prompts(spec: str) -> list[Conversation]:
    """Prompts for PPO as Conversations that end with the user message to answer."""
    return [Conversation(prompt_messages(obj, where, drop_answer=True), where)
            for where, obj in read_records(spec, "prompts")]
