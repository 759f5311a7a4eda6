"""The OpenAI-compatible server against the official `openai` client, on a live `scratchllm serve` of a
tiny chaotic model (serve_helpers.py): every answer is checked against the Engine run alone on the same
weights (greedy) and our tokenizer's counts; errors against OpenAI's shape; 32 concurrent streaming
clients against their answers alone. In-process servers (a slowed model) check the queue limit and that
a client going away frees its slot. The chat page runs in headless Chromium (test_chat_page_*)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
from serve_helpers import KEY, SlowRunner, chaotic_chat_model, cli_server, get_json, thread_server

openai = pytest.importorskip("openai", reason="the official openai client (dev extra)")

from scratchllm.infer.engine import Engine  # noqa: E402
from scratchllm.model.kv_cache import KVCache, SlotKVCache  # noqa: E402
from scratchllm.tokenizer.chat import FORMATS, render, turn_stops  # noqa: E402
from scratchllm.weights.checkpoint import open_model  # noqa: E402

CHATML = FORMATS["chatml"]
HELLO = [{"role": "user", "content": "Hello!"}]
LIMIT = 64  # the live server's --max-tokens-limit
BODY_LIMIT = 65536


@pytest.fixture(scope="module")
def world(tiny_chat_tokenizer, tmp_path_factory):
    folder = chaotic_chat_model(tiny_chat_tokenizer, tmp_path_factory.mktemp("serve") / "tiny-chat")
    loaded = open_model(folder)
    return SimpleNamespace(folder=folder, tok=loaded.tokenizer, model=loaded.model,
                           engine=Engine(loaded.model, loaded.tokenizer))


@pytest.fixture(scope="module")
def live(world):
    """`scratchllm serve` in a subprocess; the API key comes from $SCRATCHLLM_API_KEY."""
    with cli_server(world.folder, "--max-batch", "32", "--max-tokens-limit", str(LIMIT),
                    "--max-body-bytes", str(BODY_LIMIT), env={"SCRATCHLLM_API_KEY": KEY}) as base:
        yield base


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live + "/v1", api_key=KEY, max_retries=0, timeout=60)


def reference(world, prompt_ids: list[int], max_tokens: int, stop_ids) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of greedy decoding alone, cut at the first stop id."""
    out = list(world.engine.generate(prompt_ids, max_tokens, temperature=0))
    for i, t in enumerate(out):
        if t in stop_ids:
            return world.tok.decode(out[:i]), "stop", i + 1
    return world.tok.decode(out), "length", len(out)


def chat_reference(world, messages, max_tokens):
    ids = render(CHATML, messages, world.tok)
    return ids, reference(world, ids, max_tokens, set(turn_stops(CHATML, world.tok)[0]))


def text_reference(world, prompt: str, max_tokens: int):
    ids = world.tok.encode(prompt)
    return ids, reference(world, ids, max_tokens, {world.tok.eot_token})


# --------------------------------------------------------------------------------------------- the API
def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_equals_the_engine_alone_and_counts_usage(client, world):
    ids, (text, finish, n) = chat_reference(world, HELLO, 30)
    r = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=30, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny-chat"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == finish
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), n, len(ids) + n)


def test_chat_stream_with_and_without_usage(client, world):
    ids, (text, finish, n) = chat_reference(world, HELLO, 30)
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == finish
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == len(ids)
    plain = list(client.chat.completions.create(messages=HELLO, model="tiny-chat", max_tokens=30, temperature=0,
                                                stream=True))
    assert all(c.choices and c.usage is None for c in plain)  # no usage chunk unless asked
    assert "".join(c.choices[0].delta.content or "" for c in plain) == text


def test_completions_lists_of_prompts_and_n(client, world):
    prompts = ["Once upon a time", "The cat"]
    refs = [text_reference(world, p, 12) for p in prompts]
    r = client.completions.create(model="tiny-chat", prompt=prompts, n=2, max_tokens=12, temperature=0)
    assert r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [refs[0][1][0]] * 2 + [refs[1][1][0]] * 2
    assert [c.finish_reason for c in r.choices] == [refs[0][1][1]] * 2 + [refs[1][1][1]] * 2
    assert r.usage.prompt_tokens == sum(len(ids) for ids, _ in refs)  # each prompt once, whatever n
    assert r.usage.completion_tokens == 2 * sum(n for _, (_, _, n) in refs)
    texts = ["", "", "", ""]
    for chunk in client.completions.create(model="tiny-chat", prompt=prompts, n=2, max_tokens=12, temperature=0,
                                           stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]
    ids = world.tok.encode("The cat")  # a prompt given as token ids is the same prompt
    assert client.completions.create(model="tiny-chat", prompt=ids, max_tokens=12, temperature=0).choices[0].text \
        == refs[1][1][0]


def test_completions_default_max_tokens_is_openais_16(client, world):
    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens == text_reference(world, "Once upon a time", 16)[1][2]


def _stop_spanning_tokens(world, prompt: str, max_tokens: int) -> tuple[str, str]:
    """(full greedy text, a 3-character stop string that starts in one token and ends in the next)."""
    ids = world.tok.encode(prompt)
    out = list(world.engine.generate(ids, max_tokens, temperature=0))
    pieces = [world.tok.decode([t]) for t in out]
    full = world.tok.decode(out)
    assert "".join(pieces) == full or "\ufffd" in full
    at = 0
    for a, b in zip(pieces, pieces[1:]):
        at += len(a)
        if "".join(pieces[:pieces.index(a) + 1]) != full[:at] or "\ufffd" in a + b or not 1 <= len(a) <= 2:
            continue
        stop = full[at - 1:at + 2]
        if len(stop) == 3 and "\ufffd" not in stop and full.find(stop) == at - 1 and len(b) >= 2:
            return full, stop
    pytest.fail(f"no stop string spanning two tokens in {full!r}")


def test_stop_string_spanning_tokens_is_never_shown(client, world):
    full, stop = _stop_spanning_tokens(world, "Once upon a time", 40)
    want = full[:full.index(stop)]
    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=40, temperature=0,
                                  stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    deltas = [c.choices[0].text for c in client.completions.create(
        model="tiny-chat", prompt="Once upon a time", max_tokens=40, temperature=0, stop=[stop, "never"],
        stream=True)]
    assert "".join(deltas) == want  # no delta ever held a part of the stop string


def test_seed_reproduces_samples_and_n_uses_seed_plus_i(client):
    def draw(seed, n=1):
        r = client.completions.create(model="tiny-chat", prompt="Once upon", max_tokens=20, temperature=1.0,
                                      seed=seed, n=n)
        return [c.text for c in r.choices]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(7, n=2) == draw(7) + draw(8)


def test_repetition_penalty_equals_the_engines(client, world):
    ids = world.tok.encode("Once upon a time")
    want = world.tok.decode(list(world.engine.generate(ids, 24, temperature=0, repetition_penalty=1.5)))
    plain = world.tok.decode(list(world.engine.generate(ids, 24, temperature=0)))
    assert want != plain  # the penalty changes this model's answer, so the check below can fail
    r = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=24, temperature=0,
                                  extra_body={"repetition_penalty": 1.5, "ignore_eos": True})
    assert r.choices[0].text == want


def test_unknown_fields_are_ignored(client):
    r = client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=3,
                                       extra_body={"frobnicate": {"x": 1}, "user": "me"})
    assert r.usage.completion_tokens <= 3


def test_eval_judge_runs_against_the_server(tiny_chat_tokenizer, tmp_path):
    """docs/serve.md points `scratchllm eval judge` at this server: every prompt gets a reply (a tiny random
    model's replies hold no score, so they are counted as unreadable, not as failures). The book's judge
    prompt is ~280 tokens: this model has a context of 512."""
    from scratchllm.cli import main
    from scratchllm.serve.app import create_app

    loaded = open_model(chaotic_chat_model(tiny_chat_tokenizer, tmp_path / "judge", block_size=512))
    records = [{"instruction": f"Say {w}.", "input": "", "output": w, "response": w} for w in ("yes", "no", "maybe")]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    app = create_app(Engine(loaded.model, loaded.tokenizer), "judge", chat=loaded.chat, api_key=KEY)
    with thread_server(app) as base:
        assert main(["eval", "judge", str(path), "--judge-url", base, "--judge-model", "judge", "--api-key", KEY,
                     "--workers", "3", "--retries", "0"]) == 0
    cache = [json.loads(line) for line in (tmp_path / "responses.judge-cache.jsonl").read_text().splitlines()]
    assert len(cache) == 3


# --------------------------------------------------------------------------------------------- errors
def _error(e) -> dict:
    body = e.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("field, value", [("temperature", "hot"), ("max_tokens", 2.5), ("n", 0), ("stop", 3),
                                          ("top_p", 0), ("seed", "1"), ("stream", "yes"), ("top_k", True)])
def test_wrong_types_are_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2, extra_body={field: value})
    assert e.value.status_code == 400 and _error(e.value)["param"] == field


def test_bad_messages_are_400(client):
    for messages, param in (([], "messages"), ([{"role": "wizard", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": 3}], "messages[0].content")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-chat", messages=messages)
        assert _error(e.value)["param"] == param


def test_limits_are_400(client, world):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=HELLO, max_tokens=LIMIT + 1)
    assert _error(e.value)["param"] == "max_tokens" and str(LIMIT) in _error(e.value)["message"]
    long = "cat " * 150  # > 128 tokens, the model's context
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt=long, max_tokens=1)
    assert _error(e.value)["code"] == "context_length_exceeded"
    n = len(world.tok.encode("cat " * 40))
    with pytest.raises(openai.BadRequestError) as e:  # fits alone, not with max_tokens
        client.completions.create(model="tiny-chat", prompt="cat " * 40, max_tokens=128 - n + 1)
    assert _error(e.value)["code"] == "context_length_exceeded" and str(128 - n) in _error(e.value)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-chat", prompt="hi", n=33)
    assert _error(e.value)["param"] == "n"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert _error(e.value)["code"] == "model_not_found" and "tiny-chat" in _error(e.value)["message"]


def test_api_key_missing_or_wrong_is_401(live):
    bad = openai.OpenAI(base_url=live + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert _error(e.value)["code"] == "invalid_api_key"
    r = httpx.post(live + "/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
    assert httpx.get(live + "/health").status_code == 200  # health and the page stay open
    assert "<html" in httpx.get(live + "/").text


def test_bad_json_too_big_and_unknown_path(live):
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(live + "/v1/completions", content=b'{"prompt": "hi"', headers=auth)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(live + "/v1/completions", content=b'["hi"]', headers=auth)
    assert r.status_code == 400 and "object" in r.json()["error"]["message"]
    big = json.dumps({"prompt": "x" * BODY_LIMIT}).encode()
    r = httpx.post(live + "/v1/completions", content=big, headers=auth)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted while read, refused once past the limit
        for _ in range(BODY_LIMIT // 1000 + 2):
            yield b" " * 1000

    r = httpx.post(live + "/v1/completions", content=chunked(), headers=auth)
    assert r.status_code == 413
    r = httpx.get(live + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# --------------------------------------------------------------------------------------------- batching
def test_32_concurrent_streams_equal_their_answers_alone(client, live, world):
    prompts = [f"{w} {i}" for i, w in enumerate(["Once upon", "The cat", "Hello", "A dog", "Tell me"] * 7)][:32]

    def run(prompt):
        stream = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=24, temperature=0,
                                           stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    alone = [run(p) for p in prompts]
    assert alone == [text_reference(world, p, 24)[1][0] for p in prompts]
    steps_before = get_json(live + "/health")["steps"]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone
    health = get_json(live + "/health")
    assert health["peak_batch"] >= 8, health  # they really shared decode steps
    assert health["steps"] - steps_before < 24 * 32 / 4


def test_slot_cache_rows_compute_what_they_would_alone(world):
    """Prefill two prompts into rows 0 and 1, move row 1 to row 0's place (a retire), decode: each row's
    logits equal a plain KVCache run of its sequence alone."""
    model = world.model
    torch.manual_seed(0)
    seqs = [torch.randint(0, 300, (n,)) for n in (5, 9, 3)]
    cache = SlotKVCache(model.config, slots=3, max_len=128, capacity=4)  # grows by doubling on the way
    firsts = []
    with torch.no_grad():
        for row, s in enumerate(seqs):
            cache.select(row, 1)
            firsts.append(model(s[None], kv_cache=cache)[0, -1])
        cache.move(2, 0)  # sequence 0 leaves; sequence 2 takes its row
        order = [2, 1]
        nxt = torch.tensor([[7], [11]])
        cache.select(0, 2)
        batched = model(nxt, kv_cache=cache)[:, -1]
        for b, i in enumerate(order):
            alone = KVCache(model.config, 1, 64)
            assert torch.allclose(model(seqs[i][None], kv_cache=alone)[0, -1], firsts[i], atol=1e-5)
            want = model(nxt[b:b + 1], kv_cache=alone)[0, -1]
            assert torch.allclose(batched[b], want, atol=1e-4), (i, (batched[b] - want).abs().max())
    assert cache.lens[:2].tolist() == [4, 10] and cache.max_len == 16


def test_scheduler_prefills_prompts_of_different_lengths_together(world):
    """Requests queued before the scheduler starts are admitted at once: one right-padded prefill, the
    n=2 request's second choice copied into its own row; each answer equals the engine's alone."""
    from scratchllm.infer.sampling import SamplingParams
    from scratchllm.serve.scheduler import Request, Scheduler

    sched = Scheduler(world.engine, max_batch=8)
    prompts = [world.tok.encode(t) for t in ("Once upon a time there was", "Hi", "The cat sat on the")]
    texts = {}

    def sink_for(p):
        def sink(batch):
            for kind, index, *rest in batch:
                if kind == "delta":
                    texts[(p, index)] = texts.get((p, index), "") + rest[0]
                else:
                    texts[(kind, p, index)] = rest
        return sink

    for p, ids in enumerate(prompts):
        sched.submit(Request(ids, 10, SamplingParams(0.0), sink_for(p), n=2 if p == 1 else 1))
    prefills = []
    real = sched._prefill
    sched._prefill = lambda batch: (prefills.append(len(batch)), real(batch))
    sched.start()
    deadline = time.monotonic() + 20
    while sum(1 for k in texts if k[0] == "done") < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    sched.stop()
    assert prefills == [3] and sched.peak_batch == 4
    for p, ids in enumerate(prompts):
        want = world.tok.decode(list(world.engine.generate(ids, 10, temperature=0)))
        for i in range(2 if p == 1 else 1):
            assert texts.get((p, i), "") == want and texts[("done", p, i)] == ["length", 10]


# --------------------------------------------------------------------------------------------- in-process
@pytest.fixture()
def slow_app(world):
    """An app over the tiny model slowed to 20 ms a forward, 1 slot and a queue of 1."""
    from scratchllm.serve.app import create_app

    engine = Engine(world.model, world.tok)
    engine.runner = SlowRunner(world.model, 0.02)
    return create_app(engine, "tiny-chat", chat=CHATML, max_batch=1, max_queue=1)


def _wait_for(base, key, value, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if get_json(base + "/health")[key] == value:
            return
        time.sleep(0.02)
    raise AssertionError(f"/health {key} never became {value}: {get_json(base + '/health')}")


def test_a_full_queue_is_429_with_retry_after(slow_app):
    with thread_server(slow_app) as base:
        body = {"prompt": "Once", "max_tokens": 60, "temperature": 0}
        first = threading.Thread(target=httpx.post, args=(base + "/v1/completions",), kwargs={"json": body,
                                                                                              "timeout": 30})
        first.start()
        _wait_for(base, "running", 1)
        second = threading.Thread(target=httpx.post, args=(base + "/v1/completions",), kwargs={"json": body,
                                                                                               "timeout": 30})
        second.start()
        _wait_for(base, "waiting", 1)
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny-chat", prompt="Once", max_tokens=1)
        assert e.value.response.headers["retry-after"] == "1"
        assert _error(e.value)["code"] == "queue_full"
        first.join()
        second.join()


def test_a_client_that_goes_away_frees_its_slot_at_once(slow_app):
    with thread_server(slow_app) as base:
        body = {"prompt": "Once", "max_tokens": 120, "temperature": 0, "stream": True}  # 2.4 s if left to run
        t0 = time.monotonic()
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())
            assert get_json(base + "/health")["running"] == 1
        _wait_for(base, "running", 0, timeout=2.0)
        assert time.monotonic() - t0 < 1.5
        steps = get_json(base + "/health")["steps"]
        assert steps < 60, steps


def test_scheduler_failure_answers_500_and_keeps_serving(world):
    from scratchllm.serve.app import create_app

    engine = Engine(world.model, world.tok)

    class Broken(SlowRunner):
        def __call__(self, *args, **kwargs):
            raise RuntimeError("boom")

    engine.runner = Broken(world.model, 0)
    with thread_server(create_app(engine, "tiny-chat", chat=CHATML)) as base:
        r = httpx.post(base + "/v1/completions", json={"prompt": "Once", "max_tokens": 5})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        r = httpx.post(base + "/v1/completions", json={"prompt": "Once", "max_tokens": 1})
        assert r.status_code == 200  # one token needs no decode step: the server still works
        engine.runner.hidden_states = engine.runner.__call__  # now the prefill fails too
        r = httpx.post(base + "/v1/chat/completions", json={"messages": HELLO, "stream": True}, timeout=10)
        assert r.status_code == 200 and '"error"' in r.text and "boom" in r.text  # told, not left waiting
        assert get_json(base + "/health")["running"] == 0


def test_no_scheduler_running_is_503(world):
    from scratchllm.serve.app import create_app

    app = create_app(world.engine, "tiny-chat", chat=CHATML, scheduler_thread=False)  # nobody runs it
    with thread_server(app, healthy=False) as base:
        assert httpx.get(base + "/health").status_code == 503
        r = httpx.post(base + "/v1/completions", json={"prompt": "Once"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


# --------------------------------------------------------------------------------------------- the CLI
def test_cli_flags_reach_the_app(world, monkeypatch, capsys):
    import scratchllm.serve.commands as commands
    from scratchllm.cli import main

    seen = {}
    monkeypatch.setattr(commands, "serve_forever", lambda app, host, port, log_level: seen.update(app=app, host=host,
                                                                                                 port=port))
    monkeypatch.setenv("SCRATCHLLM_API_KEY", "from-env")
    assert main(["serve", "--model", str(world.folder), "--host", "0.0.0.0", "--port", "9", "--max-batch", "4",
                 "--api-key", "from-flag", "--device", "cpu", "--precision", "fp32"]) == 0
    server = seen["app"].state.server
    assert (seen["host"], seen["port"], server.api_key, server.scheduler.max_batch) == ("0.0.0.0", 9, "from-flag", 4)
    assert server.model_id == "tiny-chat" and server.chat.name == "chatml"
    monkeypatch.delenv("SCRATCHLLM_API_KEY")
    assert main(["serve", "--model", str(world.folder), "--host", "0.0.0.0", "--name", "x", "--device", "cpu"]) == 0
    assert "without an API key" in capsys.readouterr().err
    assert seen["app"].state.server.api_key is None and seen["app"].state.server.model_id == "x"


# --------------------------------------------------------------------------------------------- past one machine
def test_exported_folder_carries_what_other_engines_read(world, tmp_path):
    """docs/serve.md hands `scratchllm export --format hf` to vLLM / llama.cpp: they read config.json,
    the tokenizer files, the chat template and the turn-ending tokens (generation_config.json)."""
    transformers = pytest.importorskip("transformers", reason="transformers (dev extra)")
    from scratchllm.cli import main

    out = tmp_path / "hf"
    assert main(["export", "--model", str(world.folder), "--format", "hf", "--out", str(out)]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.model_type, config.n_positions, config.vocab_size) == ("gpt2", 128, 300)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = HELLO + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == render(CHATML, messages, world.tok)
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert set(gen.eos_token_id) == set(turn_stops(CHATML, world.tok)[0]) == {world.tok.special_tokens["<|im_end|>"],
                                                                             world.tok.eot_token}
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([render(CHATML, HELLO, world.tok)])
    with torch.no_grad():
        assert torch.allclose(model(prompt).logits, world.model(prompt), atol=1e-3)


@pytest.mark.parametrize("weights", ["int4", "bf16"])
def test_quantized_weights_serve_the_engines_answers(world, weights):
    """The server on an Engine with quantized weights (model/quant.py): 6 concurrent greedy streams, each
    equal to the same Engine run alone (bf16 on AVX512-BF16 CPUs sums a row the same way at any batch
    size; the AVX2 kernels sum batched rows in another order, which this chaotic model does not notice)."""
    import openai

    from scratchllm.serve.app import create_app

    engine = Engine(world.model, world.tok, weights=weights)
    assert weights in engine.weights
    prompts = [f"Tell me about {w}." for w in ("cats", "the sea", "rain", "bread", "maps", "ice")]

    def alone(text):
        ids = render(CHATML, [{"role": "user", "content": text}], world.tok, add_generation_prompt=True)
        out = engine.generate(ids, 12, temperature=0, stop=turn_stops(CHATML, world.tok)[0])
        return world.tok.decode(list(out))

    app = create_app(engine, "tiny-chat", chat=CHATML)
    with thread_server(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)

        def served(text):
            r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": text}],
                                               max_tokens=12, temperature=0)
            return r.choices[0].message.content

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(served, prompts))
    assert got == [alone(p) for p in prompts]
