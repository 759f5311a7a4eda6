"""`scratchllm chat` (infer/repl.py) against references nobody in that module wrote: Engine.generate on
the conversation render() gives, decoded by the tokenizer, and a scripted stand-in model whose answers
are known in advance (stop strings, trimming, Ctrl-C). The CLI handler is called with a Namespace."""

import argparse
import io
import sys

import pytest
import torch
from scripted import ScriptedModel

from scratchllm.common import ScratchError
from scratchllm.infer.engine import Engine
from scratchllm.infer.repl import HELP, ChatSession, chat
from scratchllm.model import GPT, ModelConfig
from scratchllm.tokenizer.chat import FORMATS, render

CHATML = FORMATS["chatml"]


@pytest.fixture(scope="module")
def tok(tiny_chat_tokenizer):
    return tiny_chat_tokenizer


@pytest.fixture(scope="module")
def gpt(tok):
    torch.manual_seed(0)
    return GPT(ModelConfig.from_preset("tiny", block_size=128, vocab_size=320, n_layer=2)).eval()


def scripted_session(tok, text: str, fmt=CHATML, end: str | None = "<|im_end|>", block_size=512, **kw):
    script = tok.encode_ordinary(text) + ([tok.special_tokens[end]] if end else [])
    engine = Engine(ScriptedModel(script, tok.vocab_size, block_size), tok)
    return ChatSession(engine, tok, fmt, sampling={"temperature": 0}, **kw)


def reference(model, tok, messages, n) -> str:
    ids = render(CHATML, messages, tok, add_generation_prompt=True)
    stop = [tok.special_tokens["<|im_end|>"], tok.eot_token]
    return tok.decode(list(Engine(model, tok).generate(ids, n, temperature=0, stop=stop)))


def test_two_turns_equal_engine_generate_and_join_the_history(gpt, tok):
    session = ChatSession(Engine(gpt, tok), tok, CHATML, max_new_tokens=12, sampling={"temperature": 0})
    u1 = {"role": "user", "content": "Hello!"}
    u2 = {"role": "user", "content": "What is the capital of France?"}
    a1 = "".join(session.send(u1["content"]))
    assert a1 == reference(gpt, tok, [u1], 12) and a1
    a2 = "".join(session.send(u2["content"]))
    history = [u1, {"role": "assistant", "content": a1}, u2]
    assert session.last_prompt == render(CHATML, history, tok)  # the second prompt holds the first answer
    assert a2 == reference(gpt, tok, history, 12)
    assert session.messages == [*history, {"role": "assistant", "content": a2}]


def test_commands(tok, capsys):
    session = scripted_session(tok, "ok")
    assert session.command("/system") == "no system prompt (set one with /system TEXT)"
    session.run_lines(["Hi"], sys.stdout)
    assert session.command("/system Be brief.").startswith("system prompt set")
    assert session.command("/system") == "system prompt: Be brief."
    assert len(session.messages) == 2  # setting the system prompt keeps the conversation
    "".join(session.send("Again"))
    assert tok.decode(session.last_prompt).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert session.command("/reset").startswith("conversation cleared") and session.messages == []
    assert session.system == "Be brief."

    assert session.command("/temperature 0.9") == "temperature 0.9"
    for bad in ("-1", "abc", "nan", "inf"):
        assert "needs a number >= 0" in session.command(f"/temperature {bad}")
    assert session.sampling["temperature"] == 0.9
    assert session.command("/temperature 0") == "temperature 0.0 (greedy)"
    assert session.command("/help") == HELP
    assert session.command("/frobnicate") == f"unknown command /frobnicate\n{HELP}"
    assert session.command("/exit") is None and session.command("/quit") is None

    capsys.readouterr()
    assert session.run_lines(["/temperature x", "/nope", "Hi", "/quit", "never answered"], sys.stdout) == 0
    out = capsys.readouterr()
    assert out.out == "ok\n"  # commands reply on stderr; the session went on after both bad commands
    assert "needs a number" in out.err and "unknown command /nope" in out.err
    assert [m["content"] for m in session.messages] == ["Hi", "ok"]


def test_default_system_prompt_is_shown(tok):
    session = scripted_session(tok, "ok", fmt=FORMATS["alpaca"], end="<|endoftext|>")
    default = FORMATS["alpaca"].system_prompt
    assert session.command("/system") == f"system prompt (the alpaca format's default): {default}"


@pytest.mark.parametrize("leave", [EOFError, KeyboardInterrupt])
def test_the_terminal_loop_prompts_and_leaves_cleanly_on_ctrl_d_and_ctrl_c(tok, capsys, monkeypatch, leave):
    lines, prompts = ["Hi", "", "/reset"], []

    def fake_input(prompt):
        prompts.append(prompt)
        if not lines:
            raise leave
        return lines.pop(0)

    monkeypatch.setattr("builtins.input", fake_input)
    session = scripted_session(tok, "ok")
    assert session.interactive(sys.stdout) == 0
    assert prompts == ["you> "] * 4 and session.messages == []
    assert capsys.readouterr().out == "ok\n\n"  # the answer, then a newline after the prompt left


def test_old_exchanges_are_dropped_when_the_block_is_full(tok, capsys):
    session = scripted_session(tok, "ok", block_size=64, max_new_tokens=8, system="Be brief.")
    for i in range(8):
        assert "".join(session.send(f"question {i}")) == "ok"
        assert len(session.last_prompt) + 8 <= 64
        assert tok.decode(session.last_prompt).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    err = capsys.readouterr().err
    assert "[dropped the oldest 1 exchange(s) to fit the model's block_size 64]" in err
    contents = [m["content"] for m in session.messages]
    assert contents[-2:] == ["question 7", "ok"] and "question 0" not in contents
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * (len(contents) // 2)
    # the kept exchanges are exactly what the last prompt holds
    assert session.last_prompt == render(CHATML, [{"role": "system", "content": "Be brief."},
                                                  *session.messages[:-1]], tok)


def test_a_message_too_long_for_the_block_is_refused_and_the_chat_goes_on(tok, capsys):
    session = scripted_session(tok, "ok", block_size=64, max_new_tokens=8)
    session.run_lines(["Hi", "word " * 60, "Hi again"], sys.stdout)
    out = capsys.readouterr()
    assert out.out == "ok\nok\n"
    assert "error: this message does not fit" in out.err and "block_size 64" in out.err
    assert "Traceback" not in out.err
    assert [m["content"] for m in session.messages] == ["Hi", "ok", "Hi again", "ok"]
    assert scripted_session(tok, "ok", block_size=64, max_new_tokens=64).max_new_tokens == 32
    assert "[--max-new-tokens 64 leaves no room" in capsys.readouterr().err
    with pytest.raises(ScratchError, match="must be >= 1"):
        scripted_session(tok, "ok", max_new_tokens=0)


def test_phi3_text_marker_ends_the_turn_and_is_not_shown(tok, capsys):
    assert "<|end|>" not in tok.special_tokens  # phi3's markers are plain text for this tokenizer
    session = scripted_session(tok, "Paris.<|end|>\n<|user|>\nmore", fmt=FORMATS["phi3"], end=None)
    assert session.stop_strings == ["<|end|>"]
    deltas = list(session.send("Capital of France?"))
    assert "".join(deltas) == "Paris." and not any("<" in d for d in deltas)
    assert session.messages[-1] == {"role": "assistant", "content": "Paris."}
    assert tok.decode(session.last_prompt) == "<|user|>\nCapital of France?<|end|>\n<|assistant|>\n"
    session.run_lines(["Again?"], sys.stdout)
    assert capsys.readouterr().out == "Paris.\n"


class Interrupting:
    """An engine whose next generation raises KeyboardInterrupt (as Ctrl-C would) after `after` tokens."""

    def __init__(self, engine: Engine, after: int):
        self.engine, self.config, self.after = engine, engine.config, after

    def generate(self, *args, **kwargs):
        tokens, after = self.engine.generate(*args, **kwargs), self.after
        self.after = None  # once

        def run():
            for i, t in enumerate(tokens):
                if i == after:
                    raise KeyboardInterrupt
                yield t
        return run()


def test_ctrl_c_mid_answer_keeps_the_partial_answer_and_the_chat_goes_on(tok, capsys):
    session = scripted_session(tok, "The quick brown fox")
    session.engine = Interrupting(session.engine, after=3)
    partial = tok.decode(session.engine.engine.generate([0], 3, temperature=0))  # the script's first 3 tokens
    assert session.run_lines(["Hi", "Again"], sys.stdout) == 0
    out = capsys.readouterr()
    assert out.out == f"{partial}\nThe quick brown fox\n"
    assert out.err == "[stopped]\n"
    assert [m["content"] for m in session.messages] == ["Hi", partial, "Again", "The quick brown fox"]
    assert tok.decode(session.last_prompt).endswith(f"user\nHi<|im_end|>\n<|im_start|>assistant\n{partial}"
                                                    "<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
                                                    "<|im_start|>assistant\n")


def test_closing_the_stream_early_keeps_what_was_shown(tok):
    session = scripted_session(tok, "The quick brown fox")
    deltas = session.send("Hi")
    shown = next(deltas) + next(deltas)
    deltas.close()
    assert session.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": shown}]
    assert session.last_stats[0] == 2


# ------------------------------------------------------------------ chat(args), the CLI handler
@pytest.fixture(scope="module")
def model_dir(gpt, tok, tmp_path_factory):
    from scratchllm.weights.folder import save_model

    root = tmp_path_factory.mktemp("chat")
    save_model(gpt, tok, root / "plain")
    return save_model(gpt, tok, root / "chatml", chat=CHATML)


def namespace(model, **kw):
    args = dict(model=str(model), chat_format=None, system=None, message=None, temperature=0.0, top_k=None,
                top_p=None, min_p=None, repetition_penalty=None, seed=None, max_new_tokens=10, device="cpu",
                precision="fp32", weights="fp32", verbose=False)
    return argparse.Namespace(**{**args, **kw})


def test_chat_answers_each_message_in_order(model_dir, gpt, tok, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("not read\n"))
    u1, u2 = {"role": "user", "content": "Hello!"}, {"role": "user", "content": "Paris?"}
    a1 = reference(gpt, tok, [u1], 10)
    a2 = reference(gpt, tok, [u1, {"role": "assistant", "content": a1}, u2], 10)
    assert chat(namespace(model_dir, message=["Hello!", "Paris?"], verbose=True)) == 0
    out = capsys.readouterr()
    assert out.out == f"{a1}\n{a2}\n"
    assert out.err.count("tokens/s]") == 2


def test_chat_reads_piped_stdin_line_by_line(model_dir, gpt, tok, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/temperature 0\nHello!\n\n/reset\nHello!\n"))
    answer = reference(gpt, tok, [{"role": "user", "content": "Hello!"}], 10)
    assert chat(namespace(model_dir, temperature=1.0)) == 0
    out = capsys.readouterr()
    assert out.out == f"{answer}\n{answer}\n"  # no prompt text; /reset made the second turn a first one
    assert "you>" not in out.out + out.err


def test_chat_without_a_chat_format_says_to_pass_one(model_dir, gpt, tok, capsys):
    plain = model_dir.parent / "plain"
    with pytest.raises(ScratchError, match="pass --chat-format"):
        chat(namespace(plain, message=["Hi"]))
    assert chat(namespace(plain, chat_format="chatml", message=["Hello!"])) == 0
    assert capsys.readouterr().out == reference(gpt, tok, [{"role": "user", "content": "Hello!"}], 10) + "\n"
