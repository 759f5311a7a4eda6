"""Instruction fine-tuning (the book's chapter 7): the loss masks of every chat format, instruction
files, LM collation and packing, the masked loss, vocabulary growth, and `scratchllm sft`, `eval
generate`, `eval loss` and `merge` end to end on a tiny random GPT.

References nobody in src/ wrote: masks derived by hand on a byte-level tokenizer; tiktoken's GPT-2
encoding of the book's own `format_input` text; jinja2 running our templates; F.cross_entropy on full
logits; each packed example run alone; a naive (no cache, no batch) greedy loop; the val loss the
Trainer logged against the loss of the saved model computed here from its logits.

Hermetic: tiny_chat_tokenizer (300 ids with the ChatML specials) or a byte-level tokenizer, a 2-block x
32-wide GPT, 24 toy records (tests/sft_helpers.py), fp32 on one CPU thread. The stage runs share a few
module fixtures. Failure cases of the CLI (exit 2, `error: ` naming the file or flag) are rows of
tests/test_cli_errors.py.
"""

import copy
import io
import json
import math
import os
import re
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from scripted import ScriptedModel
from sft_helpers import TINY, base_model, cli, records, sft_args, toy_records, write_json, write_jsonl

import scratchllm.train.objectives as objectives
from scratchllm.common import IGNORE_INDEX, ScratchError
from scratchllm.data.collate import collate_lm, lm_pair, pack
from scratchllm.data.instructions import for_format, instruction_fields, read_conversations, to_record
from scratchllm.model import GPT, ModelConfig
from scratchllm.model.loss import linear_cross_entropy
from scratchllm.model.vocab import grow_vocab
from scratchllm.tokenizer import Tokenizer, from_gpt2_files
from scratchllm.tokenizer.chat import (
    FORMATS,
    PHI3,
    ROLE_MARKERS,
    ChatFormat,
    detect_chat_format,
    jinja_template,
    missing_special_tokens,
    render,
    render_conversation,
    render_text,
    stop_sequences,
)
from scratchllm.train.objectives import masked_lm_objective
from scratchllm.train.sft import Encoded, add_format_tokens, choose_format, greedy, show_mask
from scratchllm.weights.checkpoint import open_model

IM_START, IM_END = 257, 258  # of byte_chat_tokenizer
U, A = "user", "assistant"


def msg(role, content, **kw):
    return {"role": role, "content": content, **kw}


def byte_chat_tokenizer() -> Tokenizer:
    """The 256 bytes (no merges: one token per byte) + <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258."""
    return Tokenizer({bytes([i]): i for i in range(256)}, "gpt2",
                     {"<|endoftext|>": 256, "<|im_start|>": IM_START, "<|im_end|>": IM_END}, name="bytes-chat")


def spans(mask) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of 1s in a 0/1 list."""
    out, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return from_gpt2_files(shared_data / "gpt2" / "encoder.json", shared_data / "gpt2" / "vocab.bpe")


@pytest.fixture()
def chat_tok(tiny_chat_tokenizer):
    """A private copy of tiny_chat_tokenizer (the session one must not grow)."""
    return copy.deepcopy(tiny_chat_tokenizer)


# --------------------------------------------------------------------------------------------- masks
def test_chatml_mask_by_hand_on_bytes():
    """One token per byte, so ids and mask can be written out: 1 on "Yo" and its <|im_end|> only."""
    ids, mask = render_conversation([msg(U, "Hi"), msg(A, "Yo")], "chatml", byte_chat_tokenizer())
    assert ids == [IM_START, *b"user\nHi", IM_END, *b"\n", IM_START, *b"assistant\n", *b"Yo", IM_END, *b"\n"]
    assert mask == [0] * (1 + 7 + 1 + 1 + 1 + 10) + [1, 1, 1] + [0]


def test_chatml_mask_with_a_bpe_tokenizer(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    im_start, im_end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    messages = [msg(U, "What is the capital of France?"), msg(A, "Paris is the capital.")]
    ids, mask = render_conversation(messages, "chatml", tok)
    assert len(ids) == len(mask) and tok.decode(ids) == render_text(FORMATS["chatml"], messages, False)
    [(s, e)] = spans(mask)
    assert ids[s:e] == tok.encode_ordinary("Paris is the capital.") + [im_end]  # content + end of turn
    assert tok.decode(ids[:s]).endswith("<|im_start|>assistant\n") and ids.count(im_start) == 2
    assert ids[e:] == tok.encode_ordinary("\n") and mask[e:] == [0]  # the trailing newline is not trained
    assert ids[0] == im_start and mask[:s] == [0] * s  # <|im_start|>, "user\n...", "assistant\n": all 0


def test_multi_turn_trains_every_assistant_turn(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer
    im_end = tok.special_tokens["<|im_end|>"]
    messages = [msg("system", "Be brief."), msg(U, "Hello!"), msg(A, "Hi."), msg(U, "Capital of France?"),
                msg(A, "Paris.")]
    ids, mask = render_conversation(messages, "chatml", tok)
    got = [ids[s:e] for s, e in spans(mask)]
    assert got == [tok.encode_ordinary("Hi.") + [im_end], tok.encode_ordinary("Paris.") + [im_end]]
    untrained = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Be brief." in untrained and "Hello!" in untrained and "Hi." not in untrained


def book_format_input(entry) -> str:
    """The book's ch. 7 `format_input`, as printed there."""
    instruction_text = (f"Below is an instruction that describes a task. "
                        f"Write a response that appropriately completes the request."
                        f"\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def test_alpaca_training_ids_are_the_books(shared_data, gpt2, gpt2_tiktoken):
    path = shared_data / "instruction-data.json"
    data = json.loads(path.read_text(encoding="utf-8"))[:50]
    convs = read_conversations(str(path))[:50]
    assert any(e["input"] for e in data) and any(not e["input"] for e in data)
    for e, conv in zip(data, convs):
        ids, mask = render_conversation(for_format(conv, "alpaca"), "alpaca", gpt2)
        assert ids == gpt2_tiktoken.encode(book_format_input(e) + "\n\n### Response:\n" + e["output"]) + [50256]
        assert gpt2_tiktoken.decode([i for i, m in zip(ids, mask) if m]) == e["output"] + "<|endoftext|>"
        assert spans(mask) == [(len(ids) - sum(mask), len(ids))]  # one run, at the end


def test_phi3_with_gpt2_writes_its_markers_as_text(gpt2, gpt2_tiktoken):
    """The book's exercise 7.1: GPT-2 has no <|user|> token, so the markers are ordinary text."""
    messages = [msg(U, "Name a colour."), msg(A, "Blue.")]
    ids, mask = render_conversation(messages, "phi3", gpt2)
    text = "<|user|>\nName a colour.<|end|>\n<|assistant|>\nBlue.<|end|>\n"
    assert render_text(PHI3, messages, False) == text
    assert ids == gpt2_tiktoken.encode(text)
    assert gpt2_tiktoken.decode([i for i, m in zip(ids, mask) if m]) == "Blue.<|end|>"
    assert missing_special_tokens(PHI3, gpt2) == list(ROLE_MARKERS)  # listed for --add-tokens ...
    assert stop_sequences(PHI3, gpt2) == [50256, "<|end|>"]  # ... and <|end|> is a stop *string*


def test_markers_format_needs_its_special_tokens(gpt2, chat_tok):
    messages = [msg(U, "Hi"), msg(A, "Yo")]
    for tok in (gpt2, chat_tok):
        with pytest.raises(ScratchError, match=r"needs the special token '<\|user\|>'.*--add-tokens") as e:
            render_conversation(messages, "markers", tok)
        assert all(m in str(e.value) for m in ROLE_MARKERS)
    new = chat_tok.add_special_tokens(missing_special_tokens(FORMATS["markers"], chat_tok))
    assert new == [300, 301, 302, 303] and missing_special_tokens(FORMATS["markers"], chat_tok) == []
    ids, mask = render_conversation(messages, "markers", chat_tok)
    system, user, assistant, end = new
    assert ids[0] == user and ids.count(end) == 2 and assistant in ids  # no system message: none rendered
    assert [ids[s:e] for s, e in spans(mask)] == [chat_tok.encode_ordinary("Yo") + [end]]
    assert stop_sequences(FORMATS["markers"], chat_tok) == [end]


def test_chatml_needs_its_tokens_too(gpt2):
    with pytest.raises(ScratchError, match=r"needs the special token '<\|im_start\|>'.*--add-tokens` adds "
                                           r"<\|im_start\|>, <\|im_end\|>"):
        render_conversation([msg(U, "Hi"), msg(A, "Yo")], "chatml", gpt2)


CONVS = [[msg(U, "What is 2+2?"), msg(A, "4")],
         [msg("system", "Be brief."), msg(U, "Hi there"), msg(A, "Hello!"), msg(U, "Capital of France?"),
          msg(A, "Paris, of course.")]]


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "phi3", "markers"])
@pytest.mark.parametrize("conv", CONVS, ids=["one turn", "two turns"])
def test_the_generation_prompt_is_the_start_of_the_training_ids(name, conv, chat_tok, gpt2):
    """What a model is prompted with for its last answer is exactly what it was trained to continue."""
    fmt = FORMATS[name]
    tok = gpt2 if name in ("alpaca", "phi3") else chat_tok
    if tok is chat_tok:
        tok.add_special_tokens(missing_special_tokens(fmt, tok))
    ids, mask = render_conversation(conv, fmt, tok)
    prompt = render(fmt, conv[:-1], tok)
    assert ids[:len(prompt)] == prompt
    *earlier, (s, e) = spans(mask)
    assert s == len(prompt) and tok.decode(ids[s:e]) == conv[-1]["content"] + fmt.stop[0]
    assert len(earlier) == sum(m["role"] == A for m in conv[:-1])


@pytest.mark.parametrize("name", ["phi3", "markers"])
def test_jinja_template_of_phi3_and_markers(name):
    """jinja2 (transformers' settings) runs our template and writes what render_text writes."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    fmt = FORMATS[name]
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(jinja_template(fmt))
    for messages in [*CONVS, [msg(U, "only a question")]]:
        for gen in (True, False):
            assert template.render(messages=messages, add_generation_prompt=gen) == render_text(fmt, messages, gen)
    assert render_text(fmt, CONVS[0], True) == "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|assistant|>\n"
    assert detect_chat_format(jinja_template(fmt), "t") == PHI3  # markers renders as phi3 does: read back as phi3


# --------------------------------------------------------------------------------------------- instruction files
def test_the_books_json_records(shared_data):
    path = shared_data / "instruction-data.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    convs = read_conversations(str(path))
    assert len(convs) == len(data) == 1100
    i = next(i for i, e in enumerate(data) if e["input"])
    e, conv = data[i], convs[i]
    assert conv.where == f"{path}[{i}]"
    assert conv.messages == (msg(U, e["instruction"], input=e["input"]), msg(A, e["output"]))
    assert for_format(conv, "alpaca") == [msg(U, e["instruction"], input=e["input"]), msg(A, e["output"])]
    assert for_format(conv, "chatml") == [msg(U, e["instruction"] + "\n\n" + e["input"]), msg(A, e["output"])]
    assert instruction_fields(conv) == (e["instruction"], e["input"], e["output"])
    assert to_record(conv) == e


def test_jsonl_chats_and_records_round_trip(tmp_path):
    chat = {"messages": [msg("system", "Be brief."), msg(U, "Hi"), msg(A, "Hello."), msg(U, "Why?"),
                         msg(A, "Because.")]}
    rec = {"instruction": "Add.", "output": "5"}  # "input" is optional
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(chat) + "\n\n" + json.dumps(rec) + "\n")  # a blank line is skipped
    one, two = read_conversations(str(path))
    assert (one.where, two.where) == (f"{path}:1", f"{path}:3")
    assert list(one.messages) == chat["messages"] and two.messages == (msg(U, "Add.", input=""), msg(A, "5"))
    assert instruction_fields(one) == ("Why?", "", "Because.")  # the last exchange
    assert for_format(one, "alpaca") == chat["messages"] == for_format(one, "chatml")
    again = write_jsonl(tmp_path / "again.jsonl", [to_record(c) for c in (one, two)])
    assert [c.messages for c in read_conversations(str(again))] == [one.messages, two.messages]


BAD_FILES = [  # (id, file suffix, content, what the error says)
    ("no output", "json", '[{"instruction": "a", "output": "b"}, {"instruction": "a", "input": "x"}]',
     r"f\.json\[1\]: no 'output' field .*a chat record needs 'messages'.* it has \['input', 'instruction'\]"),
    ("no instruction", "jsonl", '{"instruction": "a", "output": "b"}\n{"input": "x", "output": "y"}\n',
     r"f\.jsonl:2: no 'instruction' field"),
    ("no assistant turn", "jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', r"f\.jsonl:1: no assistant message"),
    ("ends with the user", "jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": '
     '"b"}, {"role": "user", "content": "c"}]}\n', r"f\.jsonl:1: the last message is a user message"),
    ("bad role", "jsonl", '{"messages": [{"role": "tool", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
     r"f\.jsonl:1: messages\[0\] must be \{'role': system\|user\|assistant"),
    ("empty messages", "jsonl", '{"messages": []}\n', r"f\.jsonl:1: 'messages' must be a non-empty list"),
    ("output a number", "jsonl", '{"instruction": "a", "output": 5}\n', r"f\.jsonl:1: field 'output' must be a string, got int"),
    ("JSONL line not JSON", "jsonl", '{"instruction": "a", "output": "b"}\n{oops\n', r"f\.jsonl:2: not valid JSON"),
    ("JSON not JSON", "json", '[{"instruction": "a",\n "output": "b"},\n oops]', r"f\.json:3: not valid JSON"),
    ("JSON not an array", "json", '{"instruction": "a", "output": "b"}', r"f\.json: expected a JSON array of instruction records, got a dict"),
    ("record not an object", "json", "[1]", r"f\.json\[0\]: expected an object"),
    ("no records", "jsonl", "\n\n", r"f\.jsonl: no records"),
    ("not .json or .jsonl", "tsv", "a\tb\n", r"f\.tsv: expected a \.json file"),
]


@pytest.mark.parametrize("suffix, content, message", [pytest.param(*c[1:], id=c[0]) for c in BAD_FILES])
def test_bad_instruction_files_name_the_place(tmp_path, suffix, content, message):
    path = tmp_path / f"f.{suffix}"
    path.write_text(content)
    with pytest.raises(ScratchError, match=message):
        read_conversations(str(path))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ScratchError, match=r"nope\.json: file not found"):
        read_conversations(str(tmp_path / "nope.json"))
    with pytest.raises(ScratchError, match="is a folder"):
        read_conversations(str(tmp_path))


def test_the_registered_book_data_splits_935_55_110(shared_data, tmp_path, monkeypatch):
    """data:instruction-data through a ../shared/data-style mirror (offline), split as the book does."""
    from scratchllm.data.labelled import split

    monkeypatch.setenv("SCRATCHLLM_MIRROR", str(shared_data))
    monkeypatch.setenv("SCRATCHLLM_CACHE", str(tmp_path / "cache"))
    convs = read_conversations("data:instruction-data")
    assert len(convs) == 1100 and convs[0].where.endswith("instruction-data.json[0]")
    train, val, test = split(convs, (0.85, 0.05, 0.10), seed=123)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert len({c.where for c in train + val + test}) == 1100


# --------------------------------------------------------------------------------------------- collate
X = IGNORE_INDEX


def test_lm_pair_shifts_masks_and_cuts():
    assert lm_pair([5, 6, 7, 8], [0, 0, 1, 1], max_length=8) == ([5, 6, 7], [X, 7, 8], False)
    assert lm_pair([5, 6, 7, 8], [0, 0, 1, 1], max_length=3) == ([5, 6, 7], [X, 7, 8], False)  # fits exactly
    assert lm_pair([5, 6, 7, 8, 9], [0, 0, 1, 1, 1], max_length=3) == ([5, 6, 7], [X, 7, 8], True)  # 9 cut
    assert lm_pair([5, 6, 7, 8, 9], [0, 1, 0, 1, 0], max_length=8) == ([5, 6, 7, 8], [6, X, 8, X], False)
    assert lm_pair([5, 6, 7, 8, 9], [1, 0, 0, 1, 1], max_length=2) is None  # the answer starts past the cut
    assert lm_pair([5, 6, 7], [1, 0, 0], max_length=8) is None  # only the first token (never a target)
    assert lm_pair([5, 6, 7, 8, 9], [0, 0, 0, 1, 0], max_length=2) is None  # a cut prompt: nothing to learn


def test_pack_is_first_fit_by_decreasing_length():
    # by length: 0 (5) opens row A, 2 (4) opens row B, 1 (3) fills A's 3, 3 (2) goes to B
    assert pack([5, 3, 4, 2], max_length=8) == [[0, 1], [2, 3]]
    assert pack([8, 1, 8], max_length=8) == [[0], [2], [1]]
    assert pack([2, 2, 2, 2], max_length=8) == [[0, 1, 2, 3]]
    lengths = [7, 3, 9, 1, 4, 4, 6, 2, 5, 8]
    rows = pack(lengths, max_length=10)
    assert sorted(i for r in rows for i in r) == list(range(10)) and all(sum(lengths[i] for i in r) <= 10 for r in rows)
    with pytest.raises(ScratchError, match="example 1 has 9 tokens, more than the row length 8"):
        pack([3, 9], max_length=8)


def test_collate_lm_pads_and_numbers_the_examples():
    a, b, c = ([1, 2, 3], [X, 3, 4]), ([5, 6], [6, 7]), ([8], [9])
    batch = collate_lm([[a, b], [c]], pad_id=0)
    assert batch["idx"].tolist() == [[1, 2, 3, 5, 6], [8, 0, 0, 0, 0]]
    assert batch["targets"].tolist() == [[X, 3, 4, 6, 7], [9, X, X, X, X]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 2, 2], [1, 0, 0, 0, 0]]
    assert int(batch["tokens"]) == 6
    plain = collate_lm([[a], [c]], pad_id=7)  # one example per row: plain causal attention is exact
    assert plain["idx"].tolist() == [[1, 2, 3], [8, 7, 7]] and plain["targets"].tolist() == [[X, 3, 4], [9, X, X]]
    assert "attention_mask" not in plain and int(plain["tokens"]) == 4


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("attention", ["sdpa", "naive"])
def test_a_packed_row_equals_its_examples_run_alone(positions, attention):
    torch.manual_seed(0)
    extra = dict(norm="rmsnorm", mlp="swiglu", bias=False) if positions == "rope" else {}
    model = GPT(ModelConfig.from_preset("tiny", vocab_size=97, block_size=32, positions=positions,
                                        attention=attention, **extra)).eval()
    g = torch.Generator().manual_seed(1)
    rows = [[torch.randint(0, 97, (n,), generator=g).tolist() for n in lens] for lens in ([5, 9, 3], [11], [4, 4])]
    pairs = [[(ids, ids[1:] + [X]) for ids in row] for row in rows]
    batch = collate_lm(pairs, pad_id=0)
    assert batch["attention_mask"].shape == (3, 17)
    with torch.no_grad():
        packed = model(batch["idx"], attention_mask=batch["attention_mask"])  # (3, 17, V)
        for b, row in enumerate(rows):
            at = 0
            for ids in row:
                alone = model(torch.tensor([ids]))[0]  # (n, V)
                torch.testing.assert_close(packed[b, at:at + len(ids)], alone, rtol=0, atol=1e-5)
                at += len(ids)
        # the loss the objective takes from the packed batch is the sum of the examples' own losses
        loss, metrics = masked_lm_objective(model, batch)
        want = sum(F.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]), reduction="sum")
                   for row in rows for ids in row)
    assert int(metrics["count"]) == sum(len(ids) - 1 for row in rows for ids in row)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_linear_cross_entropy_skips_ignored_rows_exactly(reduction):
    g = torch.Generator().manual_seed(0)
    N, C, V = 37, 16, 50
    x = torch.randn(N, C, generator=g, requires_grad=True)
    w = torch.randn(V, C, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.8] = X  # most rows ignored, as prompt tokens are in SFT
    assert 0 < int((targets != X).sum()) < N // 2
    up = torch.randn(N, generator=g) if reduction == "none" else torch.tensor(1.7)
    got = linear_cross_entropy(x, w, targets, reduction=reduction, chunk_rows=3)
    (got * up).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    want = F.cross_entropy(x @ w.T, targets, ignore_index=X, reduction=reduction)
    (want * up).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-6)
    if reduction == "none":
        assert (got[targets == X] == 0).all()


def test_linear_cross_entropy_with_every_row_ignored():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    t = torch.full((4,), X)
    total = linear_cross_entropy(x, w, t, reduction="sum")
    assert total.detach().item() == 0.0
    assert linear_cross_entropy(x, w, t).detach().isnan() and F.cross_entropy(x @ w.T, t).detach().isnan()
    assert linear_cross_entropy(x, w, t, reduction="none").tolist() == [0.0] * 4
    total.backward()
    assert (x.grad == 0).all() and (w.grad == 0).all()


def test_masked_lm_objective_of_zero_logits_is_count_log_v():
    """A head of zeros gives uniform predictions: each trained target costs log V, prompt tokens nothing."""
    model = GPT(ModelConfig(**{**TINY, "vocab_size": 40, "tie_embeddings": False}))
    torch.nn.init.zeros_(model.lm_head.weight)
    pairs = [lm_pair([1, 2, 3, 4, 5], [0, 0, 0, 1, 1], 16)[:2], lm_pair([6, 7, 8], [0, 1, 1], 16)[:2],
             lm_pair([9, 10, 11, 12], [0, 0, 1, 1], 16)[:2]]
    for rows in ([[p] for p in pairs], [pairs[:2], pairs[2:]]):  # padded, then packed
        loss, metrics = masked_lm_objective(model, collate_lm(rows, pad_id=0))
        assert int(metrics["count"]) == 6 and int(metrics["tokens"]) == 4 + 2 + 3
        torch.testing.assert_close(loss, torch.tensor(6 * math.log(40)))


# --------------------------------------------------------------------------------------------- vocab
@pytest.mark.parametrize("tied", [True, False])
def test_grow_vocab_keeps_old_logits_and_starts_new_rows_at_the_mean(tied):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**TINY, "tie_embeddings": tied})).eval()
    idx = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        before = model(idx)
    wte0, head0 = model.transformer.wte.weight.detach().clone(), model.lm_head.weight.detach().clone()
    assert grow_vocab(model, 304, first_new=300) is model
    assert model.config.vocab_size == 304 and model.transformer.wte.weight.shape == (304, 32)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    assert model.lm_head.weight.shape == (304, 32) and model.lm_head.weight.requires_grad
    with torch.no_grad():
        after = model(idx)
    torch.testing.assert_close(after[..., :300], before, rtol=0, atol=0)
    new = model.transformer.wte.weight[300:].detach()
    torch.testing.assert_close(new, wte0.mean(0).expand(4, -1), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.lm_head.weight[300:].detach(), head0.mean(0).expand(4, -1), rtol=0, atol=1e-7)
    torch.testing.assert_close(model.transformer.wte.weight[:300].detach(), wte0, rtol=0, atol=0)


def test_grow_vocab_into_padding_rows_and_its_errors():
    model = GPT(ModelConfig(**{**TINY, "vocab_size": 320}))
    w0 = model.transformer.wte.weight.detach().clone()
    grow_vocab(model, 320, first_new=300)  # a padded vocabulary: new ids take padding rows, nothing grows
    assert model.config.vocab_size == 320
    torch.testing.assert_close(model.transformer.wte.weight[300:].detach(), w0[:300].mean(0).expand(20, -1))
    torch.testing.assert_close(model.transformer.wte.weight[:300].detach(), w0[:300], rtol=0, atol=0)
    for vocab, first in ((310, 300), (330, 0), (330, 321)):
        with pytest.raises(ScratchError, match="grow_vocab: cannot give ids"):
            grow_vocab(model, vocab, first_new=first)


# --------------------------------------------------------------------------------------------- the stage's parts
def test_encoded_counts_cut_and_skipped_examples():
    """Byte tokens, so every length is known: chatml with no system prompt puts the answer after
    len("<|im_start|>user\\n" + q + "<|im_end|>\\n<|im_start|>assistant\\n") = 1 + 5 + len(q) + 1 + 1 + 1 + 10 ids."""
    from scratchllm.data.instructions import Conversation

    tok = byte_chat_tokenizer()
    convs = [Conversation((msg(U, q), msg(A, a)), f"f[{i}]") for i, (q, a) in
             enumerate([("ab", "xyz"), ("abcdefgh", "x"), ("ab", "long answer")])]
    head = [19 + len(q) for q in ("ab", "abcdefgh", "ab")]  # 21, 27, 21: ids before each answer
    assert [len(render_conversation([dict(m) for m in c.messages], "chatml", tok)[0]) for c in convs] == \
        [h + len(a) + 2 for h, a in zip(head, ("xyz", "x", "long answer"))]  # + <|im_end|> "\n"
    enc = Encoded(convs, FORMATS["chatml"], tok, max_length=23, pad_id=0)
    # target j is id j + 1, so the answer of example 0 (ids 21..24: "xyz", <|im_end|>) is targets 20..23:
    # cut to 23 targets, "xyz" stays and <|im_end|> is cut; example 1's answer starts at target 26: skipped;
    # example 2 keeps "lon" of "long answer"
    assert (enc.cut, enc.skipped, len(enc.pairs), enc.tokens, enc.trained) == (2, 1, 2, 23 + 23, 3 + 3)
    assert [c.where for c in enc.convs] == ["f[0]", "f[2]"]
    assert enc.pairs[0] == (render_conversation(list(convs[0].messages), "chatml", tok)[0][:23],
                            [X] * 20 + list(b"xyz"))
    assert enc.pairs[1][1] == [X] * 20 + list(b"lon")
    assert "2 answers cut at --max-length 23; 1 skipped" in enc.summary(23)
    every = Encoded(convs, FORMATS["chatml"], tok, max_length=64, pad_id=0, mask_prompt=False)
    inputs = [h + len(a) + 1 for h, a in zip(head, ("xyz", "x", "long answer"))]  # 25, 29, 33
    assert every.trained == every.tokens == sum(inputs) and every.cut == every.skipped == 0
    packed = Encoded(convs, FORMATS["chatml"], tok, max_length=64, pad_id=0, packed=True)
    assert packed.rows == [[1, 2], [0]] and len(packed) == 2  # 33 + 29 <= 64, then 25
    batch = packed.collate([0, 1])
    assert batch["attention_mask"].tolist() == [[1] * 29 + [2] * 33, [1] * 25 + [0] * 37]
    assert int(batch["tokens"]) == sum(inputs) and int((batch["targets"] != X).sum()) == packed.trained == 4 + 2 + 12


def test_choose_format_and_add_format_tokens(chat_tok, capsys):
    chatml = FORMATS["chatml"]
    mine = ChatFormat("chatml", system_prompt="Be brief.", stop=chatml.stop)
    assert choose_format("", mine, "m") is mine and choose_format("chatml", mine, "m") is mine  # keeps its prompt
    assert choose_format("alpaca", mine, "m") == FORMATS["alpaca"]
    assert choose_format("", None, "m/folder") == FORMATS["alpaca"]
    assert "m/folder does not record a chat format: using alpaca" in capsys.readouterr().out
    model = GPT(ModelConfig(**TINY))
    assert add_format_tokens(model, chat_tok, chatml) == []
    assert model.config.vocab_size == 300 == chat_tok.vocab_size
    assert add_format_tokens(model, chat_tok, FORMATS["markers"]) == list(ROLE_MARKERS)
    assert model.config.vocab_size == 304 == chat_tok.vocab_size
    assert [chat_tok.special_tokens[t] for t in ROLE_MARKERS] == [300, 301, 302, 303]


def naive_greedy(model, prompt, max_new, stops) -> list[int]:
    """Argmax of the whole sequence's last logits, one token at a time: no cache, no batch, no padding."""
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(torch.tensor([prompt + out]))[0, -1].argmax())
            if t in stops:
                break
            out.append(t)
    return out


def test_greedy_samples_equal_the_naive_loop():
    torch.manual_seed(3)
    model = GPT(ModelConfig(**{**TINY, "block_size": 16})).eval()
    for prompt in ([1, 2, 3], [5] * 10):
        assert greedy(model, prompt, 5, set()) == naive_greedy(model, prompt, 5, set())
    want = naive_greedy(model, [1, 2, 3], 8, set())
    assert greedy(model, [1, 2, 3], 8, {want[3]}) == want[:want.index(want[3])]  # stops before a stop id
    assert len(greedy(model, [7] * 14, 10, set())) == 2  # learned positions end at block_size
    assert greedy(model, [7] * 16, 10, set()) == []


# --------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_chat_tokenizer):
    root = tmp_path_factory.mktemp("sft")
    base = base_model(tiny_chat_tokenizer, root / "base", chat=FORMATS["chatml"])
    return SimpleNamespace(root=root, base=base, base_tok=tiny_chat_tokenizer,
                           data=write_json(root / "toy.json", toy_records()))


RUNS = {  # name -> extra `scratchllm sft` flags (and steps); each run once per module
    "overfit": (["--eval-every", "10", "--val-data", "{data}", "--test-data", "{data}"], 30),
    "lora": (["--lora-rank", "2"], 4),
    "markers": (["--template", "markers"], 4),
    "markers-lora": (["--template", "markers", "--lora-rank", "2"], 4),
}


@pytest.fixture(scope="module")
def runs(inputs):
    """runs(name) -> the run folder of `scratchllm sft` with RUNS[name] (trained once per module)."""
    done = {}

    def get(name):
        if name not in done:
            extra, steps = RUNS[name]
            out = inputs.root / "runs" / name
            assert cli(*sft_args(inputs.base, inputs.data, out, *[e.format(data=inputs.data) for e in extra],
                                 steps=steps)) == 0
            done[name] = out
        return done[name]

    return get


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def val_convs(run, inputs):
    """The run's validation conversations: its --val-data, else its share of the seeded 85/5/10 split."""
    from scratchllm.data.labelled import split

    convs = read_conversations(str(inputs.data))
    if "--val-data" in RUNS[run.name][0]:
        return convs
    train, val, test = split(convs, (0.85, 0.05, 0.10), seed=7)
    assert (len(train), len(val), len(test)) == (20, 1, 3)
    return val


def masked_loss_by_hand(model, tokenizer, fmt, convs, mask_prompt=True) -> tuple[float, int]:
    """Mean cross-entropy of the trained targets, each example alone, from the model's full logits."""
    total, count = 0.0, 0
    for conv in convs:
        ids, mask = render_conversation(for_format(conv, fmt.name), fmt, tokenizer)
        targets = torch.tensor([t if m or not mask_prompt else X for t, m in zip(ids[1:], mask[1:])])
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0]  # (T, V)
        total += float(F.cross_entropy(logits, targets, ignore_index=X, reduction="sum"))
        count += int((targets != X).sum())
    return total / count, count


def test_a_run_fills_its_folder_and_the_masked_val_loss_falls(runs, inputs):
    run = runs("overfit")  # train == val data, lr 1e-3, 30 steps
    for name in ("metrics.jsonl", "loss.png", "report.md", "config.toml", "test.jsonl", "best/model.safetensors",
                 "best/chat.json", "best/tokenizer/tokenizer.json", "step_0000030/chat.json",
                 "step_0000030/train_state.pt"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "best" / "chat.json").read_text()) == FORMATS["chatml"].to_dict()
    val = records(run, "val")
    assert [r["step"] for r in val] == [0, 10, 20, 30]
    assert val[-1]["loss"] < val[0]["loss"] - 1.0 and val[0]["loss"] == pytest.approx(math.log(300), abs=0.3)
    # the val loss counts the answers' tokens and their <|im_end|>, nothing else
    answers = [e["output"] for e in toy_records()]
    assert val[0]["count"] == sum(len(inputs.base_tok.encode_ordinary(a)) + 1 for a in answers)
    train = records(run, "train")
    assert len(train) == 30 and all(r["count_per_s"] > 0 and r["count"] < r["tokens"] for r in train)
    test = [json.loads(x) for x in (run / "test.jsonl").read_text().splitlines()]
    assert test == toy_records()  # --test-data: the held-out file as given
    report = (run / "report.md").read_text()
    assert "the assistant's answers" in report and "24 train / 24 val / 24 test records" in report
    assert json.loads((run / "best" / "meta.json").read_text())["step"] == 30


@pytest.mark.parametrize("name", list(RUNS))
def test_the_saved_model_gives_the_logged_val_loss(runs, inputs, name):
    """open_model(run) (full weights, or base + adapters, with grown vocabularies) computes exactly
    the masked validation loss the Trainer logged for the step best/ was saved at."""
    run = runs(name)
    step = json.loads((run / "best" / "meta.json").read_text())["step"]
    logged = next(r for r in records(run, "val") if r["step"] == step)
    loaded = open_model(run)
    loss, count = masked_loss_by_hand(loaded.model, loaded.tokenizer, loaded.chat, val_convs(run, inputs))
    assert count == logged["count"] and loss == pytest.approx(logged["loss"], abs=1e-5)
    assert loaded.chat.name == ("markers" if "markers" in name else "chatml")


def test_lora_saves_only_the_adapters_and_merge_folds_them_in(runs, inputs, tmp_path):
    run = runs("lora")
    spec = json.loads((run / "best" / "adapter.json").read_text())
    assert (spec["base"], spec["vocab_size"], spec["also_trained"]) == (str(inputs.base.resolve()), 300, [])
    assert spec["lora"]["rank"] == 2
    saved = tensors(run / "best" / "model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    assert cli("merge", "--model", run, "--out", tmp_path / "merged") == 0
    merged = open_model(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter.json").exists() and merged.chat == FORMATS["chatml"]
    assert not [k for k in tensors(tmp_path / "merged" / "model.safetensors") if "lora" in k]
    idx = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, base = open_model(run).model(idx), merged.model(idx), open_model(inputs.base).model(idx)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - base).abs().max() > 1e-4  # the adapters changed something


@pytest.mark.parametrize("name", ["markers", "markers-lora"])
def test_the_markers_template_adds_its_tokens(runs, inputs, tmp_path, name):
    run = runs(name)
    loaded = open_model(run)
    assert [loaded.tokenizer.special_tokens[t] for t in ROLE_MARKERS] == [300, 301, 302, 303]
    assert loaded.model.config.vocab_size == 304 == loaded.tokenizer.vocab_size
    saved = tensors(run / "best" / "model.safetensors")
    assert saved["transformer.wte.weight"].shape == (304, 32)
    base_wte = tensors(inputs.base / "model.safetensors")["transformer.wte.weight"]
    torch.testing.assert_close(saved["transformer.wte.weight"][:300], base_wte, rtol=0, atol=0.05)  # 4 small steps
    assert (saved["transformer.wte.weight"][303] - base_wte.mean(0)).abs().max() > 0  # <|end|> trained
    if name == "markers-lora":
        spec = json.loads((run / "best" / "adapter.json").read_text())
        assert (spec["vocab_size"], spec["also_trained"]) == (304, ["transformer.wte.weight"])
        assert set(saved) == {"transformer.wte.weight"} | {k for k in saved if ".lora_" in k}
        assert cli("merge", "--model", run, "--out", tmp_path / "merged") == 0
        idx = torch.tensor([[300, 301, 5, 6, 302, 7, 303]])
        with torch.no_grad():
            torch.testing.assert_close(open_model(tmp_path / "merged").model(idx), loaded.model(idx), rtol=0, atol=1e-5)



def test_lora_with_tokens_added_into_padding_rows_loads_back(inputs, tmp_path):
    base = base_model(inputs.base_tok, tmp_path / "padded", chat=FORMATS["chatml"], vocab_size=320)
    run = tmp_path / "run"
    assert cli(*sft_args(base, inputs.data, run, "--template", "markers", "--lora-rank", "2", "--val-data",
                         inputs.data, "--test-data", inputs.data, steps=2)) == 0
    loaded = open_model(run)
    loss, _ = masked_loss_by_hand(loaded.model, loaded.tokenizer, loaded.chat, read_conversations(str(inputs.data)))
    assert loss == pytest.approx(records(run, "val")[-1]["loss"], abs=1e-5)

def test_no_mask_prompt_trains_on_every_token(runs, inputs, tmp_path):
    run = tmp_path / "every"
    assert cli(*sft_args(inputs.base, inputs.data, run, "--no-mask-prompt", "--val-data", inputs.data,
                         "--test-data", inputs.data, steps=1)) == 0
    every, masked = records(run, "val")[0], records(runs("overfit"), "val")[0]
    lengths = [len(render_conversation(for_format(c, "chatml"), "chatml", inputs.base_tok)[0])
               for c in read_conversations(str(inputs.data))]
    assert every["count"] == sum(n - 1 for n in lengths) > masked["count"]  # each id but the first is a target
    assert "every token (--no-mask-prompt)" in (run / "report.md").read_text()
    loaded = open_model(inputs.base)
    loss, _ = masked_loss_by_hand(loaded.model, loaded.tokenizer, loaded.chat, read_conversations(str(inputs.data)),
                                  mask_prompt=False)
    assert every["loss"] == pytest.approx(loss, abs=1e-5)  # step 0: the base model


def test_packing_puts_several_examples_in_a_row(inputs, tmp_path, capsys):
    run = tmp_path / "packed"
    assert cli(*sft_args(inputs.base, inputs.data, run, "--pack", "--max-length", "128", steps=4)) == 0
    out = capsys.readouterr().out
    found = re.search(r"train: 20 examples, ([\d,]+) tokens \(\d+ trained\) in (\d+) packed rows", out)
    tokens, rows = int(found.group(1).replace(",", "")), int(found.group(2))
    lengths = [len(render_conversation(for_format(c, "chatml"), "chatml", inputs.base_tok)[0]) - 1
               for c in read_conversations(str(inputs.data))]
    shortest, longest = min(lengths), max(lengths)
    # rows of 128 hold `tokens` in no fewer than ceil(tokens / 128); any two examples fit in one row, so
    # first-fit leaves at most one row with a single example: at most (20 + 1) // 2 rows
    assert 2 * longest <= 128 and -(-tokens // 128) <= rows <= 10
    train = records(run, "train")
    assert train[0]["epoch"] == pytest.approx(1 / (rows // 2))  # an epoch is rows // batch steps
    assert train[0]["tokens"] >= 3 * shortest  # of the step's two rows, at most one holds a single example
    assert all(math.isfinite(r["loss"]) for r in records(run))


def test_max_length_cuts_skips_and_refuses_when_nothing_is_left(inputs, tmp_path, capsys):
    extra = [{"instruction": "What about the " + "very " * 40 + "cat?", "input": "", "output": "meow"},
             {"instruction": "What about the cat?", "input": "", "output": "meow " * 30}]
    data = write_json(tmp_path / "data.json", toy_records() + extra)
    args = ["--val-data", data, "--test-data", data, "--max-length", "48"]
    assert cli(*sft_args(inputs.base, data, tmp_path / "cut", *args, steps=1)) == 0
    out = capsys.readouterr().out
    assert "train: 25 examples" in out and "; 1 answers cut at --max-length 48; 1 skipped (no answer token left " \
                                            "within --max-length 48)" in out
    tok, fmt = inputs.base_tok, FORMATS["chatml"]
    whole = sum(len(tok.encode_ordinary(e["output"])) + 1 for e in toy_records())  # answers + <|im_end|>
    start = len(render(fmt, [msg(U, extra[1]["instruction"])], tok))  # the cut answer's first id ...
    assert records(tmp_path / "cut", "val")[0]["count"] == whole + 48 - (start - 1)  # ... is target start - 1
    assert cli(*sft_args(inputs.base, data, tmp_path / "none", *args[:-1], "8", steps=1)) == 2
    assert "no train example has a trained token within --max-length 8 (26 skipped)" in capsys.readouterr().err


def test_ctrl_c_then_resume_ends_like_an_uninterrupted_run(inputs, tmp_path, monkeypatch, capfd):
    """LoRA + added tokens, Ctrl-C during step 5 of 8 (checkpoints every 3): the run checkpoints step 5 and
    exits 130; `--resume` alone (the tokens added again, the adapters and sampler state restored) then ends
    with the uninterrupted run's weights and metrics lines, bit for bit (fp32, CPU)."""
    extra = ["--template", "markers", "--lora-rank", "2", "--checkpoint-every", "3", "--eval-every", "3"]
    full, run = tmp_path / "full", tmp_path / "run"
    assert cli(*sft_args(inputs.base, inputs.data, full, steps=8), *extra) == 0
    real, calls = objectives.masked_lm_objective, []

    def objective(model, batch):
        if torch.is_grad_enabled():  # a training step, not an evaluation
            calls.append(1)
            if len(calls) == 5:
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the Trainer's handler catches it
        return real(model, batch)

    monkeypatch.setattr(objectives, "masked_lm_objective", objective)
    assert cli(*sft_args(inputs.base, inputs.data, run, steps=8), *extra) == 130
    assert "signal SIGINT" in capfd.readouterr().out
    assert (run / "latest").read_text().strip() == "step_0000005"
    monkeypatch.setattr(objectives, "masked_lm_objective", real)
    assert cli("sft", "--out", run, "--resume") == 0
    assert "resumed from" in capfd.readouterr().out
    for folder in ("step_0000008", "best"):
        a, b = tensors(full / folder / "model.safetensors"), tensors(run / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    keep = ("step", "split", "loss", "count", "grad_norm", "lr", "epoch", "tokens")
    strip = lambda rs: [tuple(r.get(k) for k in keep) for r in rs]  # noqa: E731
    assert strip(records(full)) == strip(records(run))


def test_show_mask_marks_exactly_the_answers(inputs, capsys):
    assert cli("sft", "--model", inputs.base, "--data", inputs.data, "--show-mask", "2") == 0
    blocks = [b.split("\n", 1) for b in capsys.readouterr().out.split("--- ")[1:]]
    assert len(blocks) == 2
    for i, ((header, body), rec) in enumerate(zip(blocks, toy_records())):
        messages = [msg(U, rec["instruction"]), msg(A, rec["output"])]
        ids, mask = render_conversation(messages, "chatml", inputs.base_tok)
        assert header == f"{inputs.data}[{i}]: {len(ids)} tokens, {sum(mask)} trained (inside [[ ]])"
        assert re.findall(r"\[\[(.*?)\]\]", body, re.S) == [rec["output"] + "<|im_end|>"]
        assert body.replace("[[", "").replace("]]", "") == render_text(FORMATS["chatml"], messages, False) + "\n"
    assert cli("sft", "--model", inputs.base, "--data", inputs.data, "--show-mask", "1", "--no-mask-prompt") == 0
    body = capsys.readouterr().out.split("\n", 1)[1]
    assert body.startswith("[[<|im_start|>user") and body.endswith("<|im_end|>\n]]\n") and body.count("[[") == 1


def test_show_mask_prints_non_ascii_text():
    from scratchllm.data.instructions import Conversation

    conv = Conversation((msg(U, "Où est Tōkyō?"), msg(A, "東京 est là.")), "f[0]")
    buf = io.StringIO()
    show_mask([conv], FORMATS["chatml"], byte_chat_tokenizer(), 1, out=buf)
    assert "[[東京 est là.<|im_end|>]]" in buf.getvalue() and "Où est Tōkyō?" in buf.getvalue()


# --------------------------------------------------------------------------------------------- eval
EVAL = ["--device", "cpu", "--precision", "fp32"]


def test_eval_generate_answers_greedily_as_the_naive_loop(runs, tmp_path, capsys):
    run = runs("overfit")
    out = tmp_path / "answers.jsonl"
    assert cli("eval", "generate", "--model", run, "--out", out, "--max-new-tokens", "6", "--batch-size", "5",
               "--show", "1", *EVAL) == 0
    assert "--- reference: meow" in capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    convs = read_conversations(str(run / "test.jsonl"))  # the run's held-out file by default
    assert len(rows) == 24 and [r["id"] for r in rows] == list(range(24))
    loaded = open_model(run)
    tok, fmt = loaded.tokenizer, loaded.chat
    stops = {tok.special_tokens["<|im_end|>"], tok.special_tokens["<|endoftext|>"]}
    for row, conv, rec in zip(rows, convs, toy_records()):
        assert {k: row[k] for k in ("instruction", "input", "output")} == rec
        assert row["where"] == conv.where
        prompt = render(fmt, for_format(conv, "chatml")[:-1], tok)
        assert row["response"] == tok.decode(naive_greedy(loaded.model, prompt, 6, stops)).strip(), row


def test_eval_loss_is_the_mean_masked_cross_entropy(runs, inputs, tmp_path, capsys):
    run = runs("lora")
    loaded = open_model(run)
    test = read_conversations(str(run / "test.jsonl"))
    assert len(test) == 3
    for flags, mask_prompt in (([], True), (["--no-mask-prompt"], False)):
        capsys.readouterr()
        assert cli("eval", "loss", "--model", run, "--json", "--batch-size", "2", *flags, *EVAL) == 0
        got = json.loads(capsys.readouterr().out)
        loss, count = masked_loss_by_hand(loaded.model, loaded.tokenizer, loaded.chat, test, mask_prompt)
        assert (got["tokens"], got["examples"], got["skipped"], got["cut"]) == (count, 3, 0, 0)
        assert got["loss"] == pytest.approx(loss, abs=1e-5) and got["ppl"] == pytest.approx(math.exp(loss))
    data = write_jsonl(tmp_path / "two.jsonl", toy_records(2))
    assert cli("eval", "loss", "--model", run, "--data", data, *EVAL) == 0
    loss, count = masked_loss_by_hand(loaded.model, loaded.tokenizer, loaded.chat, read_conversations(str(data)))
    assert f"masked loss {loss:.4f}" in capsys.readouterr().out


def test_eval_loss_refuses_a_negative_max_length(runs, capsys):
    assert cli("eval", "loss", "--model", runs("lora"), "--max-length", "-2", *EVAL) == 2


def scripted_answers(tok, text: str, end: str | None, fmt: str, max_new: int = 20) -> list[str]:
    """The answers generate_responses writes for three questions when the model says `text` (then `end`)."""
    from scratchllm.data.instructions import Conversation
    from scratchllm.eval.responses import generate_responses
    from scratchllm.infer.engine import Engine

    script = tok.encode_ordinary(text) + ([tok.special_tokens[end]] if end else [])
    convs = [Conversation((msg(U, q, input=""), msg(A, "ref")), f"f[{i}]") for i, q in
             enumerate(["A rather long question, is it not?", "Short?", "Mid-sized one?"])]
    rows = generate_responses(Engine(ScriptedModel(script, tok.vocab_size), tok), convs, FORMATS[fmt], tok, max_new,
                              batch_size=2, progress=False)
    assert [(r["id"], r["where"], r["instruction"]) for r in rows] == [(i, c.where, c.messages[0]["content"])
                                                                        for i, c in enumerate(convs)]
    return [r["response"] for r in rows]


def test_eval_generate_stops_at_the_formats_end_of_turn(tiny_chat_tokenizer):
    tok = tiny_chat_tokenizer  # no <|end|> token: phi3's markers are text, and so is its stop
    assert scripted_answers(tok, " Blue.<|end|>\nmore", None, "phi3") == ["Blue."] * 3
    assert scripted_answers(tok, "Blue.", "<|im_end|>", "chatml") == ["Blue."] * 3
    assert scripted_answers(tok, "Blue. <|en", "<|endoftext|>", "chatml") == ["Blue. <|en"] * 3  # eot stops too
    n = len(tok.encode_ordinary("Blue <"))
    assert scripted_answers(tok, "Blue <", None, "phi3", max_new=n) == ["Blue <"] * 3  # cut by max_new_tokens


def test_eval_generate_keeps_text_that_only_looked_like_a_stop_string(tiny_chat_tokenizer):
    assert scripted_answers(tiny_chat_tokenizer, "x <", "<|endoftext|>", "phi3") == ["x <"] * 3


def test_eval_generate_refuses_a_negative_limit(runs, tmp_path):
    assert cli("eval", "generate", "--model", runs("overfit"), "--out", tmp_path / "a.jsonl", "--limit", "-1",
               "--max-new-tokens", "1", *EVAL) == 2
