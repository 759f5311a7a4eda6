"""Chat formats: a conversation [{"role", "content"}, ...] -> token ids (and the SFT loss mask), and
the same as a Jinja template.

What it does: five formats (`FORMATS`): "chatml" (SmolLM2, Qwen2, Qwen2.5: `<|im_start|>role\\n...<|im_end|>\\n`),
"llama3" (`<|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`), "alpaca"
(Raschka, "Build a LLM from scratch" ch. 7), "phi3" (`<|user|>\\n...<|end|>\\n<|assistant|>\\n...<|end|>\\n`;
its markers are special tokens when the tokenizer has them, plain text otherwise, as in the book's
exercise 7.1 with GPT-2's tokenizer) and "markers" (the same shape, whose four markers `<|system|>`,
`<|user|>`, `<|assistant|>`, `<|end|>` must be special tokens: `scratchllm sft` adds them to a tokenizer
that lacks them, see `missing_special_tokens`). `render` gives the ids a model is prompted with,
`render_conversation` the ids a model is trained on and the loss mask (1 exactly on each assistant
message's content and its end-of-turn token), `stop_sequences` what ends the model's turn,
`jinja_template` a Jinja chat template writing the same (for a tokenizer_config.json),
`detect_chat_format` maps a model file's Jinja template to one of ours.
What it does not do: run templates (detection compares their tags and string literals with known
shapes: SmolLM2's / Qwen2's ChatML with a default system prompt, plain ChatML, Qwen2.5's with its
tool-calling branches left out, Meta's Llama 3 template, our own `jinja_template`s; anything else gives
None, and the caller should warn: e.g. Llama 3.1+, Qwen3 and SmolLM3 templates, which add dates, tools
or thinking blocks), tools, images, padding or truncation (data/collate.py).

Choices (the same in `render` and `jinja_template`):
- The format's own token texts (<|im_start|>, <|eot_id|>, ...) encode as special ids; message content
  is always ordinary text, so a user typing "<|im_end|>" cannot close a turn (HF's apply_chat_template
  would make it the special token).
- `render` encodes each stretch of text between special tokens in one piece, as transformers does;
  `render_conversation` also starts a new stretch at each assistant message's content and after it, so
  the mask falls on token boundaries and the prompt `render` makes for the next answer is exactly the
  start of the training ids. (Only where an assistant message starts with whitespace can the two
  encodings of the earlier turns differ: "\\n\\nsure" after "assistant\\n".)
- A default system prompt (`ChatFormat.system_prompt`) is rendered when the first message is not a
  system message, as SmolLM2's and Qwen's templates do. Llama 3's template trims contents; so do we.
- alpaca: the book's preamble is the default system prompt (a first system message replaces it, an empty
  one drops it); a user message is the "### Instruction:" (+ "### Input:" from its optional field "input"),
  an assistant message the "### Response:" + the stop token (<|endoftext|>, as the book appends); later
  turns go on with "\\n\\n### Instruction:"; the generation prompt follows a user message only.

    fmt = detect_chat_format(template, "tokenizer_config.json") or FORMATS["chatml"]
    ids = render(fmt, [{"role": "user", "content": "Hi"}], tokenizer)   # ends with the assistant turn opened
    ids, mask = render_conversation(messages, "alpaca", tokenizer)      # mask[i] = 1: ids[i] is trained on
    stops = stop_sequences(fmt, tokenizer)                              # ids, and texts for text markers
    ids, texts = turn_stops(fmt, tokenizer)                             # the same + <|endoftext|>, split
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from scratchllm.common import ScratchError

ROLES = ("system", "user", "assistant")
NAMES = ("chatml", "llama3", "alpaca", "phi3", "markers")
ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")


@dataclass(frozen=True)
class ChatFormat:
    name: str  # one of NAMES: how turns are written
    system_prompt: str | None = None  # rendered when the conversation has no system message first
    bos: str | None = None  # special-token text put before everything (Llama 3: "<|begin_of_text|>")
    stop: tuple[str, ...] = ()  # special-token texts that end the assistant's turn (alpaca writes stop[0])

    def __post_init__(self):
        if self.name not in NAMES:
            raise ScratchError(f"unknown chat format {self.name!r}: expected one of {', '.join(NAMES)}")
        for f, v in (("system_prompt", self.system_prompt), ("bos", self.bos)):
            if v is not None and not isinstance(v, str):
                raise ScratchError(f"chat format {self.name}: {f} must be a string or null, got {v!r:.60}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ScratchError(f"chat format {self.name}: stop must be a tuple of special-token texts, got {self.stop!r:.60}")
        if self.name == "alpaca" and not self.stop:
            raise ScratchError("chat format alpaca: stop needs at least one token text (it ends each response)")

    def to_dict(self) -> dict:
        """The chat.json form: {"name", "system_prompt", "bos", "stop": [...]}."""
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, d: dict, source: str = "chat.json") -> ChatFormat:
        """A chat.json dict -> ChatFormat; missing fields take the named format's defaults.

        >>> ChatFormat.from_dict({"name": "chatml", "system_prompt": "Be brief."}).stop
        ('<|im_end|>',)
        """
        if not isinstance(d, dict):
            raise ScratchError(f"{source}: expected an object like {{\"name\": \"chatml\"}}, got {d!r:.60}")
        unknown = sorted(set(d) - {"name", "system_prompt", "bos", "stop"})
        if unknown:
            raise ScratchError(f"{source}: unknown field(s) {unknown}; allowed: name, system_prompt, bos, stop")
        if d.get("name") not in FORMATS:
            raise ScratchError(f"{source}: field 'name' is {d.get('name')!r}; expected one of {', '.join(FORMATS)}")
        stop = d.get("stop", list(FORMATS[d["name"]].stop))
        if not isinstance(stop, list):
            raise ScratchError(f"{source}: field 'stop' must be a list of token texts, got {stop!r:.60}")
        try:
            return replace(FORMATS[d["name"]], **{k: v for k, v in d.items() if k != "stop"}, stop=tuple(stop))
        except ScratchError as e:
            raise ScratchError(f"{source}: {e}") from None


CHATML = ChatFormat("chatml", stop=("<|im_end|>",))
LLAMA3 = ChatFormat("llama3", bos="<|begin_of_text|>", stop=("<|eot_id|>", "<|end_of_text|>"))
ALPACA = ChatFormat("alpaca", system_prompt=ALPACA_PREAMBLE, stop=("<|endoftext|>",))
PHI3 = ChatFormat("phi3", stop=("<|end|>", "<|endoftext|>"))
MARKERS = ChatFormat("markers", stop=("<|end|>",))
FORMATS: dict[str, ChatFormat] = {"chatml": CHATML, "llama3": LLAMA3, "alpaca": ALPACA, "phi3": PHI3,
                                  "markers": MARKERS}
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # phi3's and markers' token texts


def pick_format(name: str | None, own: ChatFormat | None) -> ChatFormat | None:
    """The format named (the model's own settings, such as its default system prompt, when the model
    speaks that format), else the model's own (None when neither)."""
    if name:
        return own if own is not None and own.name == name else FORMATS[name]
    return own


def alpaca_prompt(instruction: str, input: str = "", preamble: str | None = ALPACA_PREAMBLE) -> str:
    """The book's prompt (ch. 7 `format_input` + the response header): append the response to train.

    >>> alpaca_prompt("Add 2 and 3.").split("\\n\\n")[1:]
    ['### Instruction:\\nAdd 2 and 3.', '### Response:\\n']
    """
    return _instruction(instruction, input, preamble, first=True) + "\n\n### Response:\n"


def _instruction(instruction: str, input: str, preamble: str | None, first: bool) -> str:
    head = (preamble + "\n\n" if preamble else "") if first else "\n\n"
    return head + "### Instruction:\n" + instruction + (f"\n\n### Input:\n{input}" if input else "")


# --------------------------------------------------------------------------------------------- render
def check_messages(fmt: ChatFormat, messages) -> list[dict]:
    """Validate a conversation; errors name the message index and field."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ScratchError(f"messages must be a non-empty list of {{'role', 'content'}} objects, got {messages!r:.60}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ScratchError(f"message {i}: expected an object {{'role': ..., 'content': ...}}, got {m!r:.60}")
        allowed = {"role", "content"} | ({"input"} if fmt.name == "alpaca" and m.get("role") == "user" else set())
        if set(m) - allowed:
            raise ScratchError(f"message {i}: unknown field(s) {sorted(set(m) - allowed)}; allowed: {sorted(allowed)}")
        if m.get("role") not in ROLES:
            raise ScratchError(f"message {i}: field 'role' is {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        for f in ("content", "input"):
            if (f == "content" or f in m) and not isinstance(m.get(f), str):
                raise ScratchError(f"message {i} ({m['role']}): field {f!r} must be a string, got {m.get(f)!r:.60}")
    if fmt.name == "alpaca":
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        for j, m in enumerate(turns):
            want = "user" if j % 2 == 0 else "assistant"
            if m["role"] != want:
                i = j + len(messages) - len(turns)
                raise ScratchError(f"message {i}: field 'role' is {m['role']!r} but the alpaca format needs {want!r} "
                                   "here (an optional system message, then user and assistant in turn)")
        if not turns:
            raise ScratchError("messages: the alpaca format needs a user message (the instruction)")
    return list(messages)


Piece = tuple[str, bool, bool]  # (text, is a special-token text, is trained on: assistant content + its end)


def _pieces(fmt: ChatFormat, messages: list[dict], add_generation_prompt: bool) -> list[Piece]:
    """The rendered conversation as (text, is_special_token, trained) pieces."""
    out: list[Piece] = [(fmt.bos, True, False)] if fmt.bos else []
    if fmt.name == "alpaca":
        preamble, turns = fmt.system_prompt, messages
        if messages[0]["role"] == "system":
            preamble, turns = messages[0]["content"], messages[1:]
        for j, m in enumerate(turns):
            if m["role"] == "user":
                out.append((_instruction(m["content"], m.get("input", ""), preamble, first=j == 0), False, False))
            else:
                out += [("\n\n### Response:\n", False, False), (m["content"], False, True), (fmt.stop[0], True, True)]
        if add_generation_prompt and turns[-1]["role"] == "user":
            out.append(("\n\n### Response:\n", False, False))
        return out
    if fmt.system_prompt is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
    for m in messages:
        mine = m["role"] == "assistant"
        if fmt.name == "chatml":
            out += [("<|im_start|>", True, False), (m["role"] + "\n", False, False), (m["content"], False, mine),
                    ("<|im_end|>", True, mine), ("\n", False, False)]
        elif fmt.name == "llama3":
            out += [("<|start_header_id|>", True, False), (m["role"], False, False), ("<|end_header_id|>", True, False),
                    ("\n\n", False, False), (m["content"].strip(), False, mine), ("<|eot_id|>", True, mine)]
        else:  # phi3, markers
            out += [(f"<|{m['role']}|>", True, False), ("\n", False, False), (m["content"], False, mine),
                    ("<|end|>", True, mine), ("\n", False, False)]
    if add_generation_prompt:
        out += {"chatml": [("<|im_start|>", True, False), ("assistant\n", False, False)],
                "llama3": [("<|start_header_id|>", True, False), ("assistant", False, False),
                           ("<|end_header_id|>", True, False), ("\n\n", False, False)]
                }.get(fmt.name, [("<|assistant|>", True, False), ("\n", False, False)])
    return out


def render_text(fmt: ChatFormat, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The conversation as the text `render` encodes (what `jinja_template(fmt)` renders).

    >>> render_text(CHATML, [{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    return "".join(t for t, _, _ in _pieces(fmt, check_messages(fmt, messages), add_generation_prompt))


def special_texts(fmt: ChatFormat) -> list[str]:
    """The token texts the format writes as special tokens, in order of first use."""
    texts = [fmt.bos] if fmt.bos else []
    texts += {"chatml": ["<|im_start|>", "<|im_end|>"], "llama3": ["<|start_header_id|>", "<|end_header_id|>",
                                                                   "<|eot_id|>"],
              "alpaca": [fmt.stop[0]]}.get(fmt.name, list(ROLE_MARKERS))
    return texts


def missing_special_tokens(fmt: ChatFormat, tokenizer) -> list[str]:
    """The format's special-token texts the tokenizer lacks (what `scratchllm sft --add-tokens` adds;
    phi3's markers may stay text, so they are only listed for --add-tokens, never required)."""
    return [t for t in special_texts(fmt) if t not in tokenizer.special_tokens]


def _encode(fmt: ChatFormat, pieces: list[Piece], tokenizer, split: bool) -> tuple[list[int], list[int]]:
    """Pieces -> (ids, mask). Adjacent text pieces are encoded together (with `split`, only those with
    the same `trained`); phi3's markers the tokenizer lacks become text; other missing special tokens
    are an error."""
    merged: list[Piece] = []
    for text, special, trained in pieces:
        if special and fmt.name == "phi3" and text not in tokenizer.special_tokens:
            special = False  # the book's exercise: <|user|> etc. as plain text (GPT-2's tokenizer)
        if merged and not special and not merged[-1][1] and (merged[-1][2] == trained or not split):
            merged[-1] = (merged[-1][0] + text, False, trained and merged[-1][2])
        elif text:
            merged.append((text, special, trained))
    ids: list[int] = []
    mask: list[int] = []
    for text, special, trained in merged:
        if not special:
            new = tokenizer.encode_ordinary(text)
        elif text in tokenizer.special_tokens:
            new = [tokenizer.special_tokens[text]]
        else:
            missing = missing_special_tokens(fmt, tokenizer)
            raise ScratchError(f"the {fmt.name} chat format needs the special token {text!r}, which tokenizer "
                               f"{tokenizer.name!r} does not have (its special tokens: "
                               f"{', '.join(list(tokenizer.special_tokens)[:8]) or 'none'}). To train a model on "
                               f"this format, `scratchllm sft --add-tokens` adds {', '.join(missing)} (the embedding "
                               "grows); or pick a format this tokenizer has the tokens of")
        ids += new
        mask += [int(trained)] * len(new)
    return ids, mask


def render(fmt: ChatFormat, messages: list[dict], tokenizer, add_generation_prompt: bool = True) -> list[int]:
    """Conversation -> token ids. The format's own token texts become special ids (the tokenizer must
    have them); each stretch of text between them is encoded as ordinary text, in one piece (as
    transformers' apply_chat_template does)."""
    return _encode(fmt, _pieces(fmt, check_messages(fmt, messages), add_generation_prompt), tokenizer, False)[0]


def render_conversation(messages: list[dict], template: ChatFormat | str, tokenizer) -> tuple[list[int], list[int]]:
    """A whole conversation for training -> (ids, loss_mask): mask 1 exactly on every assistant message's
    content and its end-of-turn token (alpaca: <|endoftext|>), 0 on system and user text and on the
    role headers. The conversation needs at least one assistant message.

    >>> ids, mask = render_conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ...                                 "chatml", tokenizer)   # mask: 1 on "Hello" and <|im_end|> only
    """
    fmt = FORMATS[template] if isinstance(template, str) and template in FORMATS else template
    if not isinstance(fmt, ChatFormat):
        raise ScratchError(f"unknown chat template {template!r}: expected one of {', '.join(FORMATS)}")
    messages = check_messages(fmt, messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ScratchError("the conversation has no assistant message: nothing to train on (give each example "
                           "an assistant turn, or an 'output')")
    return _encode(fmt, _pieces(fmt, messages, add_generation_prompt=False), tokenizer, True)


def stop_ids(fmt: ChatFormat, tokenizer) -> list[int]:
    """Ids of the format's stop tokens that the tokenizer has (in the format's order)."""
    return [tokenizer.special_tokens[s] for s in fmt.stop if s in tokenizer.special_tokens]


def stop_sequences(fmt: ChatFormat, tokenizer) -> list[int | str]:
    """What ends the assistant's turn, for Engine.generate(stop=...): the ids of the stop tokens the
    tokenizer has, and for phi3 markers written as text, the text itself (a stop string)."""
    out: list[int | str] = stop_ids(fmt, tokenizer)
    if fmt.name == "phi3":
        out += [s for s in fmt.stop if s not in tokenizer.special_tokens and s in ROLE_MARKERS]
    return out


def turn_stops(fmt: ChatFormat, tokenizer) -> tuple[list[int], list[str]]:
    """(ids, texts) that end the assistant's turn: the stop tokens the tokenizer has, plus its
    <|endoftext|>, and phi3's markers written as text. Give the ids to Engine.generate and the texts to
    a Detokenizer: it sees every token, so a text stop is cut exactly (an engine ending on a stop string
    leaves its held-back start indistinguishable from the end of an answer)."""
    stops = stop_sequences(fmt, tokenizer)
    ids = [s for s in stops if isinstance(s, int)]
    if tokenizer.eot_token is not None and tokenizer.eot_token not in ids:
        ids.append(tokenizer.eot_token)
    return ids, [s for s in stops if isinstance(s, str)]


# --------------------------------------------------------------------------------------------- Jinja
def _lit(s: str) -> str:
    """A Jinja string literal: "it's\\n" -> 'it\\'s\\n' (backslash escapes, as Python's)."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r") + "'"


def jinja_template(fmt: ChatFormat) -> str:
    """A Jinja chat template (one line, safe under transformers' trim_blocks/lstrip_blocks) that renders
    exactly `render_text(fmt, ...)` for valid conversations."""
    bos = "{{ " + _lit(fmt.bos) + " }}" if fmt.bos else ""
    if fmt.name == "alpaca":
        pre = _lit(fmt.system_prompt) if fmt.system_prompt is not None else "none"
        return ("{% if messages[0]['role'] == 'system' %}{% set preamble = messages[0]['content'] %}"
                "{% set turns = messages[1:] %}{% else %}{% set preamble = " + pre + " %}{% set turns = messages %}"
                "{% endif %}" + bos + "{% for message in turns %}{% if message['role'] == 'user' %}"
                "{% if loop.first %}{% if preamble %}{{ preamble + '\\n\\n' }}{% endif %}{% else %}{{ '\\n\\n' }}"
                "{% endif %}{{ '### Instruction:\\n' + message['content'] }}{% if message['input'] is defined and "
                "message['input'] %}{{ '\\n\\n### Input:\\n' + message['input'] }}{% endif %}{% else %}"
                "{{ '\\n\\n### Response:\\n' + message['content'] + " + _lit(fmt.stop[0]) + " }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt and turns[-1]['role'] == 'user' %}"
                "{{ '\\n\\n### Response:\\n' }}{% endif %}")
    if fmt.name == "chatml":
        head, turn = "'<|im_start|>system\\n' + ", "'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'"
        tail, gen = " + '<|im_end|>\\n'", "'<|im_start|>assistant\\n'"
    elif fmt.name in ("phi3", "markers"):
        head, turn = "'<|system|>\\n' + ", "'<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n'"
        tail, gen = " + '<|end|>\\n'", "'<|assistant|>\\n'"
    else:
        head = "'<|start_header_id|>system<|end_header_id|>\\n\\n' + "
        turn = "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>'"
        tail, gen = " | trim + '<|eot_id|>'", "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'"
    system = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ " + head + _lit(fmt.system_prompt) + tail +
              " }}{% endif %}") if fmt.system_prompt is not None else ""
    return (bos + "{% for message in messages %}" + system + "{{ " + turn + " }}{% endfor %}"
            "{% if add_generation_prompt %}{{ " + gen + " }}{% endif %}")


# ---------------------------------------------------------------------------------------------- detection
_TAG = re.compile(r"\{\{-?|\{%[-+]?|\{#-?")
_STR = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""", re.S)
_SUB = re.compile(r"""\[\s*(['"])([A-Za-z_]\w*)\1\s*\]""")  # x['role'] -> x.role
_MARK = "\x01SYSTEM\x01"  # stands for the default system prompt in the reference shapes


def _lex(template: str) -> list[tuple[str, str, str, str]]:
    """Jinja source -> [(kind "text"/"out"/"stmt"/"note", code, opening mark, closing mark)]."""
    parts, pos = [], 0
    while pos < len(template):
        m = _TAG.search(template, pos)
        if m is None:
            parts.append(("text", template[pos:], "", ""))
            break
        parts.append(("text", template[pos:m.start()], "", ""))
        close = {"{{": "}}", "{%": "%}", "{#": "#}"}[m.group()[:2]]
        j = m.end()
        while j < len(template) and not template.startswith(close, j):  # skip string literals: they may hold }}
            lit = _STR.match(template, j) if template[j] in "'\"" else None
            j = lit.end() if lit else j + 1
        body = template[m.end():j]
        mark = body[-1:] if body[-1:] in ("-", "+") else ""
        parts.append(({"}}": "out", "%}": "stmt", "#}": "note"}[close], body[:len(body) - len(mark)], m.group(), mark))
        pos = j + len(close)
    return parts


def _text(text: str, prev: tuple, nxt: tuple, at_start: bool) -> str:
    """Output text between two tags after `-` whitespace control and trim_blocks / lstrip_blocks."""
    out = text
    if prev[3] == "-":
        out = out.lstrip()
    elif prev[0] in ("stmt", "note") and prev[3] != "+" and out.startswith("\n"):  # trim_blocks
        out = out[1:]
    if nxt[2].endswith("-"):
        out = out.rstrip()
    elif nxt[0] in ("stmt", "note") and not nxt[2].endswith("+"):  # lstrip_blocks: spaces from line start
        if re.search(r"\n[ \t]*\Z", text) or (at_start and not text.strip(" \t")):
            out = re.sub(r"[ \t]*\Z", "", out)
    return out


def _code(kind: str, code: str) -> tuple[str, list[str]]:
    """A tag's canonical form ("{%if x.role==S%}") and its string literals (adjacent ones joined)."""
    code = _SUB.sub(r".\2", code)
    lits = [s[1:-1].encode("ascii", "backslashreplace").decode("unicode-escape") for s in _STR.findall(code)]
    code = _STR.sub("\x00", code).strip()
    kw, _, rest = code.partition(" ") if kind == "stmt" else ("", "", code)
    code = re.sub(r"\s+", "", rest)
    while (i := code.find("\x00+\x00")) >= 0 and code[i + 3:i + 4] not in ("|", ".", "[", "("):
        n = code[:i].count("\x00")
        lits[n:n + 2] = [lits[n] + lits[n + 1]]
        code = code[:i] + code[i + 2:]
    code = code.replace("\x00", "S")
    return ("{%" + kw + " " + code + "%}" if kind == "stmt" else "{{" + code + "}}"), lits


def template_shape(template: str) -> list[tuple[str, list[str]]]:
    """A Jinja template as [(canonical tag, its string literals)]: whitespace outside literals removed,
    `x['y']` written `x.y`, output text as {{S}}, adjacent literals joined; whitespace control as
    transformers renders it (`-`, trim_blocks, lstrip_blocks).

    >>> template_shape("{{- 'a' + 'b' }}\\n{% if x['k'] %}  {{ y }}{% endif %}")
    [('{{S}}', ['ab']), ('{{S}}', ['\\n']), ('{%if x.k%}', []), ('{{S}}', ['  ']), ('{{y}}', []), ('{%endif %}', [])]
    """
    parts, out, edge = _lex(template), [], ("", "", "", "")
    for k, (kind, code, _, _) in enumerate(parts):
        if kind == "text":
            text = _text(code, parts[k - 1] if k else edge, parts[k + 1] if k + 1 < len(parts) else edge, k == 0)
            out += [("{{S}}", [text])] if text else []
        elif kind != "note":
            out.append(_code(kind, code))
    return out


def _head(tok: tuple[str, list[str]]) -> str:
    return tok[0][2:tok[0].index(" ")] if tok[0].startswith("{%") else ""


def _without_tools(toks: list, i: int = 0, stop: tuple = ()) -> tuple[list, int]:
    """Drop tool-calling branches: `{% if tools %}A{% else %}B{% endif %}` -> B, and elif/else branches
    that mention tools (Qwen2.5's assistant tool_calls and "tool" role)."""
    out = []
    while i < len(toks) and _head(toks[i]) not in stop:
        tok, head = toks[i], _head(toks[i])
        if head == "for":
            body, i = _without_tools(toks, i + 1, ("endfor",))
            out += [tok, *body, *toks[i:i + 1]]
        elif head == "if":
            branches, i = [], i + 1
            while True:
                body, i = _without_tools(toks, i, ("elif", "else", "endif"))
                branches.append((tok, body))
                if i >= len(toks) or _head(toks[i]) == "endif":
                    break
                tok, i = toks[i], i + 1
            end = toks[i:i + 1]
            if branches[0][0][0] == "{%if tools%}":
                out += branches[-1][1] if len(branches) == 2 and _head(branches[1][0]) == "else" else []
            else:
                keep = [branches[0]] + [b for b in branches[1:] if "tool" not in repr([b[0], *b[1]])]
                out += [t for cond, body in keep for t in (cond, *body)] + end
        else:
            out.append(tok)
        i += 1
    return out, i


def _reference_shapes() -> list[tuple[ChatFormat, list]]:
    """(format, shape) of every template we recognise; _MARK in a literal stands for the system prompt."""
    qwen25 = ("{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + "
              "'<|im_end|>\\n' }}{% else %}{{ '<|im_start|>system\\n" + _MARK + "<|im_end|>\\n' }}{% endif %}"
              "{% for message in messages %}{% if (message.role == 'user') or (message.role == 'system' and not "
              "loop.first) or (message.role == 'assistant' and not message.tool_calls) %}{{ '<|im_start|>' + "
              "message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    meta_llama3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim "
                   "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    shapes = [(CHATML, template_shape(qwen25)), (LLAMA3, template_shape(meta_llama3))]
    for fmt in (CHATML, LLAMA3, ALPACA, PHI3):  # (markers renders as phi3 does: read back as phi3)
        for sp in (_MARK, None):
            shapes.append((fmt, template_shape(jinja_template(replace(fmt, system_prompt=sp)))))
    return shapes


def _match(shape: list, ref: list) -> tuple[bool, str | None]:
    """Does `shape` fit `ref`? Then also the text that stands where _MARK is (None when ref has none)."""
    if [t for t, _ in shape] != [t for t, _ in ref]:
        return False, None
    got, want = [x for _, ls in shape for x in ls], [x for _, ls in ref for x in ls]
    if len(got) != len(want):
        return False, None
    system = None
    for g, w in zip(got, want):
        if _MARK in w:
            pre, post = w.split(_MARK)
            if not (g.startswith(pre) and g.endswith(post) and len(g) >= len(pre) + len(post)):
                return False, None
            system = g[len(pre):len(g) - len(post)]
        elif g != w:
            return False, None
    return True, system


def detect_chat_format(template: str | None, source: str) -> ChatFormat | None:
    """The ChatFormat a model's Jinja chat template writes, found without running it; None when the
    template is None or not one we know (see the module docstring), so the caller can warn.

    >>> detect_chat_format(jinja_template(replace(CHATML, system_prompt="Be brief.")), "t").system_prompt
    'Be brief.'
    """
    if template is None:
        return None
    if not isinstance(template, str):
        raise ScratchError(f"{source}: the chat template must be a string, got a {type(template).__name__}")
    shape, _ = _without_tools(template_shape(template))
    for fmt, ref in _reference_shapes():
        ok, system = _match(shape, ref)
        if ok:
            return replace(fmt, system_prompt=system)
    return None
