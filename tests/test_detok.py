"""The incremental detokenizer: deltas never split a UTF-8 character (emoji, CJK), stop strings spanning
several tokens are found and cut, and the streamed text always equals the one-shot decode (the
reference: Python's own bytes.decode and str.find)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchllm.common import ScratchError
from scratchllm.infer.detok import Detokenizer, find_stop, held_back_length
from scratchllm.tokenizer import train_bpe

TEXT = "Hello 🙂 world, 日本語のテキスト and 👩‍👩‍👧 family. END of story 🙂🙂"


@pytest.fixture(scope="module")
def tok():
    # small byte-level BPE: merges split emoji and CJK characters across tokens in many ways
    return train_bpe([TEXT * 2, "the cat sat on the mat"], vocab_size=300, special_tokens=["<|endoftext|>"])


def stream(tok, ids, stop=()):
    detok = Detokenizer(tok, stop)
    deltas = []
    for t in ids:
        deltas.append(detok.push(t))
        if detok.stopped:
            break
    deltas.append(detok.finish())
    return deltas, detok


def byte_ids(text):
    return list(text.encode("utf-8"))  # ids 0..255 are the single bytes in a byte-level BPE


def test_multibyte_characters_are_never_split(tok):
    for ids in (tok.encode(TEXT), byte_ids(TEXT)):
        deltas, _ = stream(tok, ids)
        assert "".join(deltas) == TEXT
        assert all("\ufffd" not in d for d in deltas)
        # each delta is whole characters: it round-trips through UTF-8 on its own
        assert all(d.encode("utf-8").decode("utf-8") == d for d in deltas)


def test_emoji_fed_byte_by_byte_comes_out_once_complete(tok):
    detok = Detokenizer(tok)
    assert [detok.push(b) for b in "🙂".encode()] == ["", "", "", "🙂"]


def test_unfinished_character_at_the_end_becomes_replacement_char(tok):
    deltas, _ = stream(tok, byte_ids("ok 🙂")[:-1])
    assert "".join(deltas) == "ok \ufffd"


def test_stop_string_spanning_tokens_is_cut_and_never_shown(tok):
    ids = byte_ids("Hello world. END of story")  # "END" arrives one byte-token at a time
    deltas, detok = stream(tok, ids, stop=["END"])
    assert "".join(deltas) == "Hello world. "
    assert detok.stopped and detok.stop_string == "END" and detok.text == "Hello world. "
    assert all("E" not in d for d in deltas)


def test_stop_string_inside_one_merged_token(tok):
    ids = tok.encode("family. END of story")
    assert b" E" in [tok.token_bytes(i) for i in ids]  # the space before "E" shares its token
    deltas, detok = stream(tok, ids, stop=["E"])
    assert "".join(deltas) == "family. " and detok.stopped


def test_false_start_of_stop_string_is_released(tok):
    detok = Detokenizer(tok, ["END!"])
    out = [detok.push(t) for t in byte_ids("ENDS")]
    assert out == ["", "", "", "ENDS"]  # "E", "EN", "END" might start "END!", "ENDS" cannot
    assert not detok.stopped


def test_finish_flushes_a_held_back_prefix(tok):
    deltas, detok = stream(tok, byte_ids("the EN"), stop=["END"])
    assert deltas[-1] == "EN" and "".join(deltas) == "the EN" and not detok.stopped


def test_earliest_of_several_stop_strings_wins(tok):
    deltas, detok = stream(tok, byte_ids("a, b. c"), stop=[". ", ","])
    assert "".join(deltas) == "a" and detok.stop_string == ","


def test_stop_string_with_emoji(tok):
    deltas, _ = stream(tok, tok.encode(TEXT), stop=["🙂🙂"])
    assert "".join(deltas) == TEXT[:TEXT.find("🙂🙂")]


def test_helpers_by_hand():
    assert held_back_length("Hello wor", ["world"]) == 3
    assert held_back_length("Hello world", ["world"]) == 0  # a full match is found, not held
    assert held_back_length("abcab", ["abx", "cabz"]) == 3
    assert find_stop("xyz", ["a"]) is None
    assert find_stop("a\n\nb.", ["\n\n", "."]) == (1, "\n\n")


def test_bad_stop_strings_raise(tok):
    with pytest.raises(ScratchError, match="stop strings"):
        Detokenizer(tok, [""])


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab🙂日 .", max_size=30), stop=st.text(alphabet="ab🙂日 .", min_size=1, max_size=4),
       merged=st.booleans())
def test_streaming_with_stop_equals_str_find(tok, text, stop, merged):
    ids = tok.encode(text) if merged else byte_ids(text)
    deltas, detok = stream(tok, ids, stop=[stop])
    cut = text.find(stop)
    assert "".join(deltas) == (text if cut < 0 else text[:cut])
    assert detok.stopped == (cut >= 0)
    assert all("\ufffd" not in d for d in deltas)
