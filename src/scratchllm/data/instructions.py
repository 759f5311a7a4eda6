"""Instruction data for SFT: the book's JSON records and JSONL chats -> conversations.

What it does: `read_conversations(spec)` reads a `.json` file holding an array of records, a `.jsonl`
file of one record per line, or `data:NAME` (data/registry.py, e.g. data:instruction-data, the book's
1100 records). A record is either the book's Alpaca-style `{"instruction", "input" (optional),
"output"}` or a chat `{"messages": [{"role", "content"}, ...]}` (system / user / assistant, multi-turn
allowed). Each becomes a `Conversation` (messages + where it came from, "file:line" or "file[i]");
errors name that place and the field. A conversation needs an assistant message (what SFT trains on).
`for_format(conv, name)` gives the messages a chat format renders: the alpaca format keeps a user
message's "input" as its own field (### Input:), the others append it to the instruction after a
blank line. `instruction_fields(conv)` gives (instruction, input, output) of a conversation's last
exchange, for generated-response files and the judge.
What it does not do: tokenize, mask or split (tokenizer/chat.py, data/collate.py, data/labelled.split).

    convs = read_conversations("data:instruction-data")      # 1100 Conversations
    train, val, test = split(convs, (0.85, 0.05, 0.10), seed=123)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scratchllm.common import ScratchError
from scratchllm.io.jsonl import read_jsonl, read_utf8

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]  # {"role", "content"} (+ "input" on a user message from an Alpaca record)
    where: str  # "file:line" (JSONL) or "file[index]" (a JSON array)


def check_messages(messages, where: str) -> list:
    """A record's `messages`: a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(messages, list) or not messages:
        raise ScratchError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ScratchError(f"{where}: messages[{i}] must be {{'role': system|user|assistant, 'content': "
                               f"str}}, got {str(m)[:80]!r}")
    return messages


def _record(obj, where: str) -> Conversation:
    if not isinstance(obj, dict):
        raise ScratchError(f"{where}: expected an object with 'instruction' and 'output', or 'messages'; got "
                           f"{type(obj).__name__} {str(obj)[:60]!r}")
    if "messages" in obj:
        messages = check_messages(obj["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ScratchError(f"{where}: no assistant message: SFT trains on the assistant's turns, give at "
                               "least one")
        if messages[-1]["role"] != "assistant":
            raise ScratchError(f"{where}: the last message is a {messages[-1]['role']} message: end the "
                               "conversation with the assistant's answer")
        return Conversation(tuple({"role": m["role"], "content": m["content"]} for m in messages), where)
    for field in ("instruction", "output"):
        if field not in obj:
            raise ScratchError(f"{where}: no {field!r} field (an instruction record needs 'instruction' and "
                               f"'output', optional 'input'; a chat record needs 'messages'); it has "
                               f"{sorted(obj) or 'no fields'}")
    for field in ("instruction", "input", "output"):
        if field in obj and not isinstance(obj[field], str):
            raise ScratchError(f"{where}: field {field!r} must be a string, got {type(obj[field]).__name__}")
    user = {"role": "user", "content": obj["instruction"], "input": obj.get("input", "")}
    return Conversation((user, {"role": "assistant", "content": obj["output"]}), where)


def read_records(spec: str, what: str = "records") -> list[tuple[str, object]]:
    """[(where, object)] of a .json array, a .jsonl file or data:NAME, in file order ("file:line" for
    JSONL, "file[i]" for an array); errors name the file and say what it should hold (`what`)."""
    if spec.startswith("data:"):
        from scratchllm.data import registry

        path = registry.get(spec.removeprefix("data:"), progress=False)
    else:
        path = Path(spec).expanduser()
    if path.is_dir():
        raise ScratchError(f"{path} is a folder: give a .json or .jsonl file of {what}")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise ScratchError(f"{path}: expected a .json file (an array of {what}) or .jsonl (one per line)")
    if path.suffix.lower() == ".jsonl":
        records = read_jsonl(path)
    else:
        try:
            data = json.loads(read_utf8(path))
        except json.JSONDecodeError as e:
            raise ScratchError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); a .jsonl file holds one record per "
                               "line") from None
        if not isinstance(data, list):
            raise ScratchError(f"{path}: expected a JSON array of {what}, got a {type(data).__name__}")
        records = [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]
    if not records:
        raise ScratchError(f"{path}: no records")
    return records


def read_conversations(spec: str) -> list[Conversation]:
    """A .json array, a .jsonl file or data:NAME -> conversations in file order."""
    return [_record(obj, where) for where, obj in read_records(spec, "instruction records")]


def for_format(conv: Conversation, name: str) -> list[dict]:
    """The messages as chat format `name` renders them (see the module doc for "input")."""
    if name == "alpaca":
        return [dict(m) for m in conv.messages]
    out = []
    for m in conv.messages:
        extra = m.get("input", "")
        out.append({"role": m["role"], "content": m["content"] + (f"\n\n{extra}" if extra else "")})
    return out


def instruction_fields(conv: Conversation) -> tuple[str, str, str]:
    """(instruction, input, output) of the last user message and the answer after it."""
    last = max(i for i, m in enumerate(conv.messages) if m["role"] == "assistant")
    user = next((m for m in reversed(conv.messages[:last]) if m["role"] == "user"), {"content": "", "input": ""})
    return user["content"], user.get("input", ""), conv.messages[last]["content"]


def to_record(conv: Conversation) -> dict:
    """The JSONL form of a conversation (read back by read_conversations)."""
    m = conv.messages
    if len(m) == 2 and m[0]["role"] == "user" and "input" in m[0]:
        return {"instruction": m[0]["content"], "input": m[0]["input"], "output": m[1]["content"]}
    return {"messages": [dict(x) for x in m]}
