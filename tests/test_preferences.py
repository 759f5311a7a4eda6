"""Preference data: data/preferences.py (read_pairs, drop_identical, read_prompts, Pair.conversation),
data/collate.collate_pairs and train/pairs.EncodedPairs.

References nobody in src/ wrote: the expected Pairs, error locations (file:line, file[i]) and batch
tensors are written out by hand; a pair's rendering is checked against SFT's own reading of the same
record (data/instructions.read_conversations with output = the answer) and train/sft.encode.

Hermetic: small files written in tmp_path, tiny_chat_tokenizer (ChatML specials), no model.
"""

import json
import re

import pytest
import torch

from scratchllm.common import ScratchError
from scratchllm.data.collate import collate_pairs
from scratchllm.data.instructions import Conversation, read_conversations
from scratchllm.data.preferences import Pair, PairSet, drop_identical, read_pairs, read_prompts
from scratchllm.tokenizer.chat import FORMATS
from scratchllm.train.pairs import EncodedPairs
from scratchllm.train.sft import encode

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CHATML = FORMATS["chatml"]


def user(content, **kw):
    return {"role": "user", "content": content, **kw}


def jsonl(path, rows) -> str:
    """Write rows (dicts, or raw strings written as they are) one per line; return the path as a str."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def json_array(path, rows) -> str:
    path.write_text(json.dumps(rows, indent=1))
    return str(path)


def error(spec, **kw) -> str:
    with pytest.raises(ScratchError) as e:
        read_pairs(spec, **kw)
    return str(e.value)


# --------------------------------------------------------------------------------------------- read_pairs: shapes
def test_book_records_from_a_json_array(tmp_path):
    path = json_array(tmp_path / "book.json", [
        {"instruction": "Name a colour.", "input": "", "output": "ignored", "chosen": "Red.", "rejected": "Dog."},
        {"instruction": "Rewrite politely.", "input": "Give me that.", "chosen": "May I have it?",
         "rejected": "Now!"},
        {"instruction": "No input field at all.", "chosen": "a", "rejected": "b"}])
    ps = read_pairs(path)
    assert isinstance(ps, PairSet) and ps.identical == []
    assert ps.pairs == [
        Pair((user("Name a colour.", input=""),), "Red.", "Dog.", f"{path}[0]"),
        Pair((user("Rewrite politely.", input="Give me that."),), "May I have it?", "Now!", f"{path}[1]"),
        Pair((user("No input field at all.", input=""),), "a", "b", f"{path}[2]")]


def test_prompt_and_messages_records_from_jsonl(tmp_path):
    """Blank lines are skipped but still counted: `where` is the file's real line number."""
    path = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        "",
        {"messages": [{"role": "system", "content": "Be kind.", "name": "dropped"},
                      {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                      {"role": "user", "content": "Q2"}], "chosen": "good", "rejected": "bad"}])
    ps = read_pairs(path)
    assert ps.pairs == [
        Pair((user("Hi?"),), "Hello.", "Go away.", f"{path}:1"),
        Pair(({"role": "system", "content": "Be kind."}, user("Q1"), {"role": "assistant", "content": "A1"},
              user("Q2")), "good", "bad", f"{path}:3")]


def test_messages_take_precedence_over_prompt_and_instruction(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"messages": [user("from messages")], "prompt": "from prompt",
                                          "instruction": "from instruction", "chosen": "c", "rejected": "r"}])
    assert read_pairs(path).pairs[0].prompt == (user("from messages"),)


def test_pair_conversation_is_what_sft_reads_from_the_same_record(tmp_path, tiny_chat_tokenizer):
    """prompt + answer as a Conversation: equal to SFT's reading of {instruction, input, output: answer},
    so train/sft.encode gives the same ids and loss mask."""
    recs = [{"instruction": "Describe the word.", "input": "cat", "chosen": "meow", "rejected": "woof"},
            {"instruction": "What about the dog?", "input": "", "chosen": "woof", "rejected": "hot"}]
    pairs = read_pairs(json_array(tmp_path / "p.json", recs)).pairs
    for answer in ("chosen", "rejected"):
        sft = read_conversations(json_array(tmp_path / "sft.json", [
            {"instruction": r["instruction"], "input": r["input"], "output": r[answer]} for r in recs]))
        for pair, conv in zip(pairs, sft):
            mine = pair.conversation(getattr(pair, answer))
            assert mine.messages == conv.messages and mine.where == pair.where
            assert encode(mine, CHATML, tiny_chat_tokenizer) == encode(conv, CHATML, tiny_chat_tokenizer)
    conv = pairs[0].conversation("an answer")
    assert isinstance(conv, Conversation)
    assert conv.messages == (user("Describe the word.", input="cat"), {"role": "assistant", "content": "an answer"})
    assert pairs[0].prompt == (user("Describe the word.", input="cat"),)  # unchanged (frozen, tuples)


# --------------------------------------------------------------------------------------------- read_pairs: errors
@pytest.mark.parametrize("record, message", [
    ({"prompt": "p", "rejected": "r"}, "no 'chosen' field"),
    ({"prompt": "p", "chosen": "c"}, "no 'rejected' field"),
    ({"prompt": "p"}, "no 'chosen' and no 'rejected' field"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "field 'chosen' must be a string, got int"),
    ({"prompt": "p", "chosen": "c", "rejected": None}, "field 'rejected' must be a string, got NoneType"),
    ({"prompt": ["p"], "chosen": "c", "rejected": "r"}, "field 'prompt' must be a string, got list"),
    ({"instruction": 1, "chosen": "c", "rejected": "r"}, "field 'instruction' must be a string, got int"),
    ({"instruction": "i", "input": None, "chosen": "c", "rejected": "r"}, "field 'input' must be a string"),
    ({"question": "q", "chosen": "c", "rejected": "r"}, "no prompt: give 'instruction'"),
    ({"messages": [user("q"), {"role": "assistant", "content": "a"}], "chosen": "c", "rejected": "r"},
     "must end with a user message"),
    ({"messages": [{"role": "system", "content": "s"}], "chosen": "c", "rejected": "r"},
     "must end with a user message"),
    ({"messages": [], "chosen": "c", "rejected": "r"}, "'messages' must be a non-empty list"),
    ({"messages": "hello", "chosen": "c", "rejected": "r"}, "'messages' must be a non-empty list"),
    ({"messages": [user("q"), {"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"},
     "messages[1] must be"),
    ({"messages": [{"role": "user", "content": 5}], "chosen": "c", "rejected": "r"}, "messages[0] must be"),
])
def test_a_bad_record_is_named_by_file_line_and_field(tmp_path, record, message):
    """The second line is bad: the error names FILE:2 and what is wrong with it."""
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "fine", "chosen": "c", "rejected": "r"}, record])
    err = error(path)
    assert err.startswith(f"{path}:2: ") and message in err, err


def test_a_bad_json_array_item_is_named_by_index(tmp_path):
    path = json_array(tmp_path / "p.json", [{"prompt": "p", "chosen": "c", "rejected": "r"},
                                            {"prompt": "p", "chosen": "c", "rejected": "r"},
                                            {"prompt": "p", "chosen": "c"}])
    err = error(path)
    assert err.startswith(f"{path}[2]: no 'rejected' field") and "['chosen', 'prompt']" in err, err
    path = json_array(tmp_path / "q.json", [["not", "an", "object"]])
    assert error(path).startswith(f"{path}[0]: expected an object with a prompt")


@pytest.mark.parametrize("name, text, message", [
    ("p.json", '{"prompt": "p", "chosen": "c", "rejected": "r"}', "expected a JSON array of preference records, got a dict"),
    ("p.json", '[\n{"prompt": "p",\n', ":3: not valid JSON"),
    ("p.jsonl", '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{oops\n', "p.jsonl:2: not valid JSON"),
    ("p.jsonl", "\n\n", "no records"),
    ("p.json", "[]", "no records"),
    ("p.txt", "prompt\tchosen\trejected\n", "expected a .json file"),
])
def test_file_level_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    err = error(str(tmp_path / name))
    assert message in err and str(tmp_path / name) in err, err


def test_a_folder_is_refused(tmp_path):
    assert "is a folder" in error(str(tmp_path))


# --------------------------------------------------------------------------------------------- identical pairs
def identical_file(tmp_path) -> str:
    return jsonl(tmp_path / "p.jsonl", [
        {"prompt": "a", "chosen": "same", "rejected": "same"},
        {"prompt": "b", "chosen": "good", "rejected": "bad"},
        {"prompt": "c", "chosen": "x", "rejected": "x"},
        {"prompt": "d", "chosen": "x", "rejected": "x "},  # differs by a space: kept
        {"prompt": "e", "chosen": "y", "rejected": "y"},
        {"prompt": "f", "chosen": "z", "rejected": "z"}])


def test_identical_pairs_are_skipped_and_named(tmp_path):
    path = identical_file(tmp_path)
    ps = read_pairs(path)
    assert [p.where for p in ps.pairs] == [f"{path}:2", f"{path}:4"]
    assert ps.identical == [f"{path}:{n}" for n in (1, 3, 5, 6)]
    assert ps.summary() == (f"2 pairs; 4 skipped because chosen == rejected ({path}:1, {path}:3, {path}:5 ...)")
    assert read_pairs(jsonl(tmp_path / "q.jsonl", [{"prompt": "b", "chosen": "g", "rejected": "b"}])).summary() \
        == "1 pairs"


def test_skip_identical_false_keeps_every_pair_then_drop_identical_per_split(tmp_path):
    path = identical_file(tmp_path)
    every = read_pairs(path, skip_identical=False)
    assert [p.where for p in every.pairs] == [f"{path}:{n}" for n in range(1, 7)] and every.identical == []
    first, second = drop_identical(every.pairs[:3]), drop_identical(every.pairs[3:])
    assert [p.where for p in first.pairs] == [f"{path}:2"] and first.identical == [f"{path}:1", f"{path}:3"]
    assert [p.where for p in second.pairs] == [f"{path}:4"] and second.identical == [f"{path}:5", f"{path}:6"]
    assert drop_identical([]) == PairSet([], [])


@pytest.mark.parametrize("skip", [True, False])
def test_a_file_of_only_identical_pairs_is_refused(tmp_path, skip):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "s", "rejected": "s"},
                                         {"instruction": "b", "chosen": "t", "rejected": "t"}])
    assert "every pair has chosen == rejected: nothing to learn" in error(path, skip_identical=skip)


# --------------------------------------------------------------------------------------------- read_prompts
def test_read_prompts_of_every_record_shape(tmp_path):
    path = jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Say hi."},
        {"messages": [{"role": "system", "content": "S"}, user("Q"), {"role": "assistant", "content": "old"}]},
        {"messages": [user("Q1"), {"role": "assistant", "content": "A1"}, user("Q2")]},
        {"instruction": "Describe.", "input": "cat", "output": "meow", "chosen": "c", "rejected": "r"},
        {"instruction": "Just this."}])
    convs = read_prompts(path)
    assert convs == [
        Conversation((user("Say hi."),), f"{path}:1"),
        Conversation(({"role": "system", "content": "S"}, user("Q")), f"{path}:2"),  # trailing answer dropped
        Conversation((user("Q1"), {"role": "assistant", "content": "A1"}, user("Q2")), f"{path}:3"),
        Conversation((user("Describe.", input="cat"),), f"{path}:4"),
        Conversation((user("Just this.", input=""),), f"{path}:5")]


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "assistant", "content": "only an answer"}]}, "must end with a user message"),
    ({"messages": [user("q"), {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "must end with a user message"),  # one trailing answer is dropped, not two
    ({"output": "no prompt"}, "no prompt"),
    ({"prompt": 7}, "field 'prompt' must be a string"),
])
def test_read_prompts_errors_name_the_line(tmp_path, record, message):
    path = jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, record])
    with pytest.raises(ScratchError) as e:
        read_prompts(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value), str(e.value)


def test_read_prompts_from_a_json_array(tmp_path):
    path = json_array(tmp_path / "prompts.json", [{"prompt": "a"}, {"prompt": "b"}])
    assert [(c.messages, c.where) for c in read_prompts(path)] == [((user("a"),), f"{path}[0]"),
                                                                  ((user("b"),), f"{path}[1]")]


# --------------------------------------------------------------------------------------------- collate_pairs
def test_collate_pairs_layout_by_hand():
    """B chosen rows, then B rejected rows, right-padded; mask from each answer's mask; tokens = real ones."""
    pairs = [([1, 2, 3], [0, 1, 1], [4, 5], [0, 1]),
             ([6, 7], [0, 1], [8, 9, 10, 11], [0, 0, 1, 1])]
    b = collate_pairs(pairs, pad_id=0)
    assert set(b) == {"idx", "mask", "attention_mask", "tokens"}
    assert b["idx"].tolist() == [[1, 2, 3, 0], [6, 7, 0, 0], [4, 5, 0, 0], [8, 9, 10, 11]]
    assert b["mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert int(b["tokens"]) == 11
    assert all(b[k].dtype == torch.long for k in ("idx", "mask", "attention_mask"))


def test_collate_pairs_pads_with_the_pad_id():
    b = collate_pairs([([5], [1], [6, 7, 8], [0, 1, 1])], pad_id=99)
    assert b["idx"].tolist() == [[5, 99, 99], [6, 7, 8]]
    assert b["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]] and b["mask"].tolist() == [[1, 0, 0], [0, 1, 1]]


# --------------------------------------------------------------------------------------------- EncodedPairs
def pairs_file(tmp_path) -> list[Pair]:
    return read_pairs(jsonl(tmp_path / "p.jsonl", [
        {"instruction": "What about the cat?", "input": "", "chosen": "yes good", "rejected": "no"},
        {"prompt": "Tell me about the dog.", "chosen": "good yes", "rejected": "bad no bad no"},
        {"messages": [{"role": "system", "content": "Be brief."}, user("Sun?")], "chosen": "yes",
         "rejected": "no bad"}])).pairs


def test_encoded_pairs_use_sft_masks(tmp_path, tiny_chat_tokenizer):
    tok, pairs = tiny_chat_tokenizer, pairs_file(tmp_path)
    enc = EncodedPairs(pairs, CHATML, tok, 128, tok.pad_id)
    assert len(enc) == 3 and enc.pairs == pairs and enc.cut == enc.skipped == 0 and enc.ref is None
    expected = []
    for p in pairs:
        (ci, cm), (ri, rm) = (encode(p.conversation(a), CHATML, tok) for a in (p.chosen, p.rejected))
        expected.append((ci, cm, ri, rm))
        # the mask covers exactly the answer and its <|im_end|>
        assert [t for t, m in zip(ci, cm) if m] == tok.encode_ordinary(p.chosen) + [tok.special_tokens["<|im_end|>"]]
    assert [tuple(r) for r in enc.rows] == expected
    assert enc.tokens == sum(len(r[0]) + len(r[2]) for r in expected)
    assert enc.summary(128) == f"3 pairs, {enc.tokens:,} tokens"


def test_encoded_pairs_collate_is_collate_pairs_of_the_chosen_rows(tmp_path, tiny_chat_tokenizer):
    tok, pairs = tiny_chat_tokenizer, pairs_file(tmp_path)
    enc = EncodedPairs(pairs, CHATML, tok, 128, tok.pad_id)
    batch = enc.collate([2, 0])
    ref = collate_pairs([enc.rows[2], enc.rows[0]], tok.pad_id)
    assert batch.keys() == ref.keys() and all(torch.equal(batch[k], ref[k]) for k in ref)
    c2, _, r2, _ = enc.rows[2]
    assert batch["idx"][0, :len(c2)].tolist() == c2 and batch["idx"][2, :len(r2)].tolist() == r2
    enc.ref = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])
    batch = enc.collate([2, 0])
    assert batch["ref"].tolist() == [[-5.0, -6.0], [-1.0, -2.0]]
    assert torch.equal(batch["idx"], ref["idx"])


def test_encoded_pairs_cut_at_max_length_and_count(tmp_path, tiny_chat_tokenizer):
    """A limit inside the longer rejected answer of pair 1: that answer is cut (kept from the left), counted."""
    tok, pairs = tiny_chat_tokenizer, pairs_file(tmp_path)[1:2]
    (ci, cm), (ri, rm) = (encode(pairs[0].conversation(a), CHATML, tok) for a in (pairs[0].chosen,
                                                                                  pairs[0].rejected))
    start = cm.index(1)  # the first answer token; the answers are the only difference
    assert len(ri) > len(ci) and sum(rm) > 3
    limit = len(ri) - 3  # cuts the rejected answer's last tokens; the chosen one fits
    assert limit >= len(ci) and limit > start
    enc = EncodedPairs(pairs, CHATML, tok, limit, tok.pad_id)
    assert (enc.cut, enc.skipped, len(enc)) == (1, 0, 1)
    assert enc.rows[0] == (ci, cm, ri[:limit], rm[:limit])
    assert enc.tokens == len(ci) + limit
    assert enc.summary(limit) == f"1 pairs, {len(ci) + limit:,} tokens; 1 answers cut at --max-length {limit}"
    both = EncodedPairs(pairs, CHATML, tok, start + 1, tok.pad_id)  # one answer token left in each
    assert (both.cut, both.skipped, len(both)) == (2, 0, 1)
    assert both.rows[0][1] == cm[:start + 1] and sum(both.rows[0][1]) == 1


def test_a_pair_whose_answer_has_no_token_left_is_skipped(tmp_path, tiny_chat_tokenizer):
    tok, pairs = tiny_chat_tokenizer, pairs_file(tmp_path)
    lengths = [len(encode(p.conversation(p.chosen), CHATML, tok)[0]) for p in pairs]
    starts = [encode(p.conversation(p.chosen), CHATML, tok)[1].index(1) for p in pairs]
    limit = min(starts)  # every prompt fills the limit: no answer token is left in any pair
    enc = EncodedPairs(pairs, CHATML, tok, limit, tok.pad_id)
    assert (len(enc), enc.skipped, enc.cut) == (0, 3, 6) and enc.pairs == [] and enc.tokens == 0
    # a limit that keeps answer tokens of the pairs with the shorter prompts only
    limit = sorted(starts)[1] + 1
    enc = EncodedPairs(pairs, CHATML, tok, limit, tok.pad_id)
    kept = [p for p, s in zip(pairs, starts) if s < limit]
    assert enc.pairs == kept and enc.skipped == 3 - len(kept) > 0 and len(enc) == len(kept)
    assert f"; {enc.skipped} pairs skipped (an answer with no token within --max-length {limit})" in enc.summary(limit)
    assert max(lengths) > limit


def test_dropping_only_the_untrained_trailing_newline_cuts_no_answer(tmp_path, tiny_chat_tokenizer):
    tok, pair = tiny_chat_tokenizer, pairs_file(tmp_path)[0]
    ids, mask = encode(pair.conversation(pair.chosen), CHATML, tok)
    rids, _ = encode(pair.conversation(pair.rejected), CHATML, tok)
    assert mask[-1] == 0 and mask[-2] == 1 and len(rids) < len(ids)  # ... <|im_end|> "\n"
    enc = EncodedPairs([pair], CHATML, tok, len(ids) - 1, tok.pad_id)
    assert enc.rows[0][1] == mask[:-1] and sum(enc.rows[0][1]) == sum(mask)  # every answer token is kept
    assert enc.cut == 0 and "cut" not in enc.summary(len(ids) - 1)


def test_encoded_pairs_summary_reports_cuts_and_skips_together(tmp_path, tiny_chat_tokenizer):
    tok, pairs = tiny_chat_tokenizer, pairs_file(tmp_path)
    starts = [encode(p.conversation(p.chosen), CHATML, tok)[1].index(1) for p in pairs]
    limit = sorted(starts)[1] + 1
    enc = EncodedPairs(pairs, CHATML, tok, limit, tok.pad_id)
    assert re.fullmatch(rf"{len(enc)} pairs, [\d,]+ tokens; {enc.cut} answers cut at --max-length {limit}; "
                        rf"{enc.skipped} pairs skipped \(an answer with no token within --max-length {limit}\)",
                        enc.summary(limit)), enc.summary(limit)


# --------------------------------------------------------------------------------------------- multi-turn prompts
def multi_turn_pair() -> Pair:
    return Pair((user("Q1"), {"role": "assistant", "content": "A1"}, user("Q2")), "yes good", "no bad", "f:1")


def final_answer_start(tok, pair: Pair, answer: str) -> int:
    """Where the final answer's tokens start: ChatML ends with answer, <|im_end|>, "\\n"."""
    ids, _ = encode(pair.conversation(answer), CHATML, tok)
    tail = tok.encode_ordinary(answer) + [tok.special_tokens["<|im_end|>"]] + tok.encode_ordinary("\n")
    assert ids[-len(tail):] == tail
    return len(ids) - len(tail)


def test_a_multi_turn_prompt_renders_its_earlier_answer_before_the_final_one(tiny_chat_tokenizer):
    tok, pair = tiny_chat_tokenizer, multi_turn_pair()
    for answer in (pair.chosen, pair.rejected):
        ids, _ = encode(pair.conversation(answer), CHATML, tok)
        start = final_answer_start(tok, pair, answer)
        assert "A1" in tok.decode(ids[:start]) and tok.decode(ids[start:]) == answer + "<|im_end|>\n"
    enc = EncodedPairs([pair], CHATML, tok, 128, tok.pad_id)
    assert len(enc) == 1 and enc.rows[0][0] == encode(pair.conversation(pair.chosen), CHATML, tok)[0]


def test_the_response_mask_covers_only_the_final_answer(tiny_chat_tokenizer):
    tok, pair = tiny_chat_tokenizer, multi_turn_pair()
    enc = EncodedPairs([pair], CHATML, tok, 128, tok.pad_id)
    im_end = tok.special_tokens["<|im_end|>"]
    for (ids, mask), answer in ((enc.rows[0][:2], pair.chosen), (enc.rows[0][2:], pair.rejected)):
        assert [t for t, m in zip(ids, mask) if m] == tok.encode_ordinary(answer) + [im_end]


def test_a_multi_turn_pair_whose_answers_are_cut_away_is_skipped(tiny_chat_tokenizer):
    tok, pair = tiny_chat_tokenizer, multi_turn_pair()
    limit = min(final_answer_start(tok, pair, a) for a in (pair.chosen, pair.rejected))  # no answer token left
    enc = EncodedPairs([pair], CHATML, tok, limit, tok.pad_id)
    assert (len(enc), enc.skipped) == (0, 1)
