"""The engine against references nobody here wrote: a naive generator written in this file (a full
forward each step, argmax, no cache), one-by-one runs for batched ones, Python's str.find for stop
strings, and a scripted stand-in model whose output text is known in advance for streaming tests."""

import warnings

import pytest
import torch
from scripted import ScriptedModel

from scratchllm.common import ScratchError
from scratchllm.infer.engine import Engine, split_stop
from scratchllm.model import GPT, ModelConfig
from scratchllm.tokenizer import train_bpe

TEXT = "Hello 🙂 world, 日本語のテキスト and 👩‍👩‍👧 family. END of story"

VARIANTS = {
    "gpt2-sdpa": dict(),
    "gpt2-naive": dict(attention="naive"),
    "llama-gqa": dict(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_head=2),
}


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", block_size=64, vocab_size=512, **overrides)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return {name: make_model(**kw) for name, kw in VARIANTS.items()}


def naive_generate(model, prompt, n, repetition_penalty=None):
    """The reference: full forward over the whole sequence each step, argmax of the last logits
    (with CTRL's repetition penalty applied token by token when asked)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]))[0, -1].clone()  # (V,)
            if repetition_penalty:
                for t in set(ids):
                    logits[t] = logits[t] / repetition_penalty if logits[t] > 0 else logits[t] * repetition_penalty
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def prompt_of(n, seed=1, vocab=512):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_equals_naive_uncached(models, variant):
    model = models[variant]
    prompt = prompt_of(7)
    ours = list(Engine(model).generate(prompt, 20, temperature=0))
    assert ours == naive_generate(model, prompt, 20)


def test_single_token_prompt_and_zero_new_tokens(models):
    model = models["gpt2-sdpa"]
    assert list(Engine(model).generate([5], 6, temperature=0)) == naive_generate(model, [5], 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(Engine(model).generate([5], 0)) == []


def test_top_k_1_equals_greedy(models):
    engine = Engine(models["gpt2-sdpa"])
    prompt = prompt_of(5)
    assert list(engine.generate(prompt, 15, temperature=1.5, top_k=1, seed=3)) == \
        list(engine.generate(prompt, 15, temperature=0))


def test_fixed_seed_reproduces_samples(models):
    engine = Engine(models["llama-gqa"])
    prompt = prompt_of(5)

    def run(seed):
        return list(engine.generate(prompt, 20, temperature=1.0, top_p=0.95, min_p=0.01, seed=seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_repetition_penalty_equals_naive_reference(models):
    model = models["gpt2-sdpa"]
    prompt = prompt_of(6)
    ours = list(Engine(model).generate(prompt, 15, temperature=0, repetition_penalty=1.8))
    assert ours == naive_generate(model, prompt, 15, repetition_penalty=1.8)
    assert ours != naive_generate(model, prompt, 15)  # the penalty did change something


@pytest.mark.parametrize("variant", ["gpt2-sdpa", "llama-gqa"])
def test_batched_equals_one_by_one(models, variant):
    engine = Engine(models[variant])
    prompts = [prompt_of(9, seed=2), prompt_of(3, seed=3), prompt_of(6, seed=4)]
    batched = engine.generate_batch(prompts, 12, temperature=0)
    assert batched == [list(engine.generate(p, 12, temperature=0)) for p in prompts]


def test_batched_rows_stop_independently(models):
    engine = Engine(models["gpt2-sdpa"])
    prompts = [prompt_of(4, seed=5), prompt_of(8, seed=6)]
    free = engine.generate_batch(prompts, 10, temperature=0)
    stop_id = free[0][3]  # row 0 stops at its 4th token; row 1 only if it meets the same id
    batched = engine.generate_batch(prompts, 10, temperature=0, stop=[stop_id])
    assert batched[0] == free[0][:free[0].index(stop_id)]
    assert batched == [list(engine.generate(p, 10, temperature=0, stop=[stop_id])) for p in prompts]


def test_stop_token_is_not_returned(models):
    engine = Engine(models["gpt2-sdpa"])
    prompt = prompt_of(5)
    free = list(engine.generate(prompt, 15, temperature=0))
    stop_id = free[6]
    assert list(engine.generate(prompt, 15, temperature=0, stop=stop_id)) == free[:free.index(stop_id)]


# ------------------------------------------------------------------ prompt length and block_size
def test_long_prompt_is_truncated_with_a_warning(models):
    model = models["gpt2-sdpa"]
    prompt = prompt_of(100)  # block_size is 64
    with pytest.warns(UserWarning, match="keeping its last 54 tokens"):
        ours = list(Engine(model).generate(prompt, 10, temperature=0))
    assert ours == naive_generate(model, prompt[-54:], 10)


def test_long_prompt_raises_when_truncation_is_off(models):
    with pytest.raises(ScratchError, match="100 tokens, more than the model's block_size 64"):
        Engine(models["gpt2-sdpa"]).generate(prompt_of(100), 10, truncate=False)
    with pytest.raises(ScratchError, match="max_new_tokens"):
        Engine(models["gpt2-sdpa"]).generate(prompt_of(100), 64)


def test_learned_positions_stop_at_block_size_with_a_message(models):
    model = models["gpt2-sdpa"]
    prompt = prompt_of(60)
    # positions 60..63 feed 4 new tokens; the logits at position 63 predict a 5th, which is never fed
    with pytest.warns(UserWarning, match="stopped after 5 new token.*block_size 64 \\+ 1.*position 64"):
        ours = list(Engine(model).generate(prompt, 10, temperature=0))
    assert ours == naive_generate(model, prompt, 5)  # the naive forward sees at most 64 tokens
    with pytest.raises(ScratchError, match="position 64"):
        naive_generate(model, prompt, 6)  # one more would need position 64: the limit is real


def test_prompt_of_exactly_block_size_still_gives_one_token(models):
    model = models["gpt2-sdpa"]
    prompt = prompt_of(64)
    with pytest.warns(UserWarning, match="stopped after 1 new token"):
        ours = list(Engine(model).generate(prompt, 3, temperature=0))
    assert ours == naive_generate(model, prompt, 1)
    with pytest.warns(UserWarning, match="stopped after 1 new token"):  # the longest row limits them all
        batched = Engine(model).generate_batch([prompt, prompt_of(62)], 3, temperature=0)
    assert batched == [naive_generate(model, prompt, 1), naive_generate(model, prompt_of(62), 1)]


def test_rope_generates_past_block_size_without_warning(models):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = list(Engine(models["llama-gqa"]).generate(prompt_of(60), 10, temperature=0))
    assert len(ours) == 10


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(min_p=2), "min_p"),
    (dict(stop=[1.5]), "stop"),
    (dict(stop=["x"]), "tokenizer"),
])
def test_bad_arguments_raise_before_the_first_token(models, kwargs, match):
    with pytest.raises(ScratchError, match=match):
        Engine(models["gpt2-sdpa"]).generate([1, 2], 5, **kwargs)  # not iterated: errors are eager


def test_bad_prompts_raise(models):
    engine = Engine(models["gpt2-sdpa"])
    with pytest.raises(ScratchError, match="empty prompt"):
        engine.generate([], 5)
    with pytest.raises(ScratchError, match=r"outside this model's vocabulary \[0, 512\)"):
        engine.generate([1, 512], 5)
    with pytest.raises(ScratchError, match="max_new_tokens"):
        engine.generate([1], -1)
    with pytest.raises(ScratchError, match=r"1-D sequence of token ids, got a tensor of shape \(1, 3\)"):
        engine.generate(torch.tensor([[1, 2, 3]]), 5)
    with pytest.raises(ScratchError, match="1-D sequence of token ids, got a nested sequence"):
        engine.generate([[1, 2, 3]], 5)
    with pytest.raises(ScratchError, match="encode it first"):
        engine.generate("hello", 5)


def test_prompt_as_1d_tensor_and_batch_as_2d_tensor(models):
    engine = Engine(models["gpt2-sdpa"])
    prompt = prompt_of(6)
    expected = naive_generate(models["gpt2-sdpa"], prompt, 4)
    assert list(engine.generate(torch.tensor(prompt), 4, temperature=0)) == expected
    assert engine.generate_batch(torch.tensor([prompt, prompt]), 4, temperature=0) == [expected, expected]


def test_padded_vocab_rows_are_never_sampled(tok):
    # `scratchllm pretrain` pads vocab_size up to a multiple of 64: here 320 rows for a 300-id tokenizer,
    # and the padding rows are made to dominate every logit
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", block_size=32, vocab_size=320)).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] = model.transformer.wte.weight[tok.vocab_size:] * 0
        model.lm_head.weight[tok.vocab_size:, 0] = 1.0
        model.transformer.ln_f.bias[0] = 1e3  # feature 0 is huge, so ids >= 300 get logits ~1e3
    raw = list(Engine(model).generate([1, 2], 8, temperature=0))
    assert all(t >= tok.vocab_size for t in raw)  # without a limit, padding ids win
    engine = Engine(model, tok)
    assert engine.n_valid == tok.vocab_size
    greedy = list(engine.generate([1, 2], 8, temperature=0))
    sampled = engine.generate_batch([[1, 2], [3]], 8, temperature=2.0, repetition_penalty=1.3, seed=0)
    assert greedy and all(t < tok.vocab_size for t in greedy + sampled[0] + sampled[1])
    assert "".join(engine.stream_text("Hello", 8, temperature=1.0, seed=0)) == tok.decode(
        list(engine.generate(tok.encode("Hello"), 8, temperature=1.0, seed=0)))  # decodable, no crash
    assert all(t < 50 for t in Engine(model, n_valid=50).generate([1], 8, temperature=3.0, seed=1))
    with pytest.raises(ScratchError, match=r"n_valid must be an integer in \[1, 320\]"):
        Engine(model, n_valid=321)


def test_tokenizer_larger_than_the_model_is_refused(tok):
    small = GPT(ModelConfig.from_preset("tiny", vocab_size=100))
    with pytest.raises(ScratchError, match="tokenizer has 300 ids but the model only 100"):
        Engine(small, tok)


def test_split_stop():
    assert split_stop(None) == (set(), [])
    assert split_stop([3, "ab", 4]) == ({3, 4}, ["ab"])
    assert split_stop("x") == (set(), ["x"])


# ------------------------------------------------------------------ text: a scripted model
@pytest.fixture(scope="module")
def tok():
    return train_bpe([TEXT * 2], vocab_size=300, special_tokens=["<|endoftext|>"])


def test_stream_text_never_splits_utf8_and_equals_decode(tok):
    script = tok.encode(TEXT)
    assert any(len(tok.token_bytes(i).decode("utf-8", errors="replace")) != len(tok.token_bytes(i))
               for i in script)  # some tokens hold a piece of a multi-byte character
    engine = Engine(ScriptedModel(script, tok.vocab_size), tok)
    deltas = list(engine.stream_text("Q:", len(script), temperature=0))
    assert "".join(deltas) == TEXT
    assert all(d and "\ufffd" not in d for d in deltas)


def test_stream_byte_tokens_of_emoji(tok):
    script = list("🙂日".encode())  # 7 single-byte tokens
    deltas = list(Engine(ScriptedModel(script, tok.vocab_size), tok).stream_text([1], 7, temperature=0))
    assert deltas == ["🙂", "日"]


def test_stop_string_across_token_boundaries(tok):
    script = list(b"once upon. END more")  # one byte per token: "END" spans three
    engine = Engine(ScriptedModel(script, tok.vocab_size), tok)
    text = "".join(engine.stream_text([1], len(script), temperature=0, stop=["END"]))
    assert text == "once upon. "
    ids = list(engine.generate([1], len(script), temperature=0, stop=["END"]))
    assert ids == script[:script.index(ord("D"))]  # ends before the token that completes "END"
    # batched rows with stop strings end on their own
    assert engine.generate_batch([[1], [2, 3]], len(script), temperature=0, stop=[". "]) == \
        [script[:10], script[:10]]


def test_stop_string_and_stop_id_together(tok):
    script = tok.encode(TEXT) + [tok.eot_token] + tok.encode(" after")
    engine = Engine(ScriptedModel(script, tok.vocab_size), tok)
    assert "".join(engine.stream_text([1], len(script), temperature=0, stop=[tok.eot_token, "nothing"])) == TEXT
    assert "".join(engine.stream_text([1], len(script), temperature=0, stop=[tok.eot_token, "日本"])) == \
        TEXT[:TEXT.find("日本")]


# ------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    from scratchllm.weights.checkpoint import save_model

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", block_size=64, vocab_size=tok.vocab_size))
    return save_model(model, tok, tmp_path_factory.mktemp("m") / "model"), model


def test_cli_generate_matches_the_engine(model_dir, tok, capsys):
    from scratchllm.cli import main

    folder, model = model_dir
    prompt = "Hello 🙂"
    expected = tok.decode(list(Engine(model, tok).generate(tok.encode(prompt), 12, temperature=0,
                                                            stop=[tok.eot_token])))
    args = ["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "12",
            "--temperature", "0", "--precision", "fp32"]
    assert main(args) == 0
    assert capsys.readouterr().out == prompt + expected + "\n"
    assert main(args + ["--stream", "--no-echo"]) == 0
    captured = capsys.readouterr()
    assert captured.out == expected + "\n"
    assert "tokens/s" in captured.err
    # the path of the folder's model.safetensors works too
    assert main(args[:1] + ["--model", str(folder / "model.safetensors")] + args[3:]) == 0
    assert capsys.readouterr().out == prompt + expected + "\n"


def test_cli_errors_are_clean(model_dir, tmp_path, capsys):
    from scratchllm.cli import main

    folder, _ = model_dir
    assert main(["generate", "--model", str(folder), "--prompt", "hi", "--top-p", "1.5"]) == 2
    assert "error: sampling parameter top_p=1.5" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # sampling parameters are checked before the model is loaded (here it does not even exist)
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--temperature", "-1"]) == 2
    assert "error: sampling parameter temperature=-1.0" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--max-new-tokens", "-3"]) == 2
    assert "--max-new-tokens must be >= 0, got -3" in capsys.readouterr().err


def test_cli_model_without_tokenizer_needs_tokenizer_flag(model_dir, tok, tmp_path, capsys):
    from scratchllm.cli import main
    from scratchllm.weights.checkpoint import save_model

    _, model = model_dir
    bare = save_model(model, None, tmp_path / "bare")
    assert main(["generate", "--model", str(bare), "--prompt", "hi", "--precision", "fp32"]) == 2
    assert "no tokenizer/ folder: pass --tokenizer" in capsys.readouterr().err
    tok.save(tmp_path / "tok")
    assert main(["generate", "--model", str(bare), "--tokenizer", str(tmp_path / "tok"), "--prompt", "hi",
                 "--max-new-tokens", "3", "--seed", "1", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.startswith("hi")


def test_unescape_stop_strings():
    from scratchllm.infer.commands import unescape

    assert unescape("a\\n\\tb é 🙂\\\\") == "a\n\tb é 🙂\\"


# ------------------------------------------------------------------ packed CPU weights
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_copy_gives_the_same_logits_and_leaves_the_model_alone(models, dtype):
    """Packing follows the product's rule (can_pack, what the Engine checks): fp32 wherever torch has
    oneDNN, bf16 only where oneDNN has bf16 kernels (AVX512BW/AVX-NE-CONVERT/AMX; not on an AVX2-only
    CPU such as many AMD EPYCs, where packing a bf16 weight raises and the Engine never tries)."""
    from scratchllm.infer.packed import PackedLinear, can_pack, packed_copy

    model = models["llama-gqa"]
    if dtype != torch.float32:
        model = GPT(model.config).to(dtype).eval()
    if not can_pack(model):
        reason = ("this torch build has no oneDNN (mkldnn) linear kernels" if dtype == torch.float32 else
                  "this CPU has no oneDNN bf16 kernels (needs AVX512BW/AVX-NE-CONVERT, e.g. not an AVX2-only "
                  "AMD EPYC): can_pack is False, so the Engine does not pack bf16 here either")
        pytest.skip(reason)
    params_before = {k: v for k, v in model.named_parameters()}
    fast = packed_copy(model)
    assert all(type(m) is not PackedLinear for m in model.modules())  # original untouched
    # per layer: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj; plus the lm_head
    assert sum(type(m) is PackedLinear for m in fast.modules()) == 4 * 4 + 1
    assert {k: v for k, v in model.named_parameters()} == params_before
    idx = torch.tensor([prompt_of(10)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.inference_mode():
        torch.testing.assert_close(fast(idx).float(), model(idx).float(), atol=tol, rtol=tol)


def test_bf16_model_runs_unpacked_where_onednn_has_no_bf16(monkeypatch):
    """What an AVX2-only CPU sees (simulated): can_pack is False for bf16, so the default Engine keeps
    the plain model and pack=True is refused with a clear error instead of oneDNN's."""
    from scratchllm.infer.packed import can_pack

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    model = make_model().to(torch.bfloat16)  # small: emulated bf16 is fine
    assert not can_pack(model)
    assert Engine(model).runner is model
    with pytest.raises(ScratchError, match="pack=True needs a CPU model in fp32 or bf16 with oneDNN support"):
        Engine(model, pack=True)


def test_packed_and_unpacked_engines_agree(models):
    from scratchllm.infer.packed import can_pack

    model = models["gpt2-sdpa"]
    if not can_pack(model):
        pytest.skip("this torch build has no oneDNN (mkldnn) linear kernels")
    prompt = prompt_of(8)
    assert list(Engine(model, pack=True).generate(prompt, 15, temperature=0)) == \
        list(Engine(model, pack=False).generate(prompt, 15, temperature=0))


def test_pack_refused_where_unsupported():
    model = GPT(ModelConfig.from_preset("tiny", block_size=16, vocab_size=64)).to(torch.float64)
    with pytest.raises(ScratchError, match="pack=True needs a CPU model in fp32 or bf16"):
        Engine(model, pack=True)
    assert list(Engine(model).generate([1, 2], 3, temperature=0)) == naive_generate(model, [1, 2], 3)
