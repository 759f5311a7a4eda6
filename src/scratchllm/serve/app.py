"""The HTTP layer: an OpenAI-compatible API and a chat page over one Scheduler (FastAPI).

What it does: `create_app(engine, model_id, chat=..., api_key=...)` returns a FastAPI app with
- `GET /v1/models`, `GET /v1/models/{id}`: the one model served;
- `POST /v1/chat/completions`: `messages` rendered in the model's chat format, the answer ending at
  the format's end of turn; `POST /v1/completions`: `prompt` (a string, a list of strings, a list of
  ids or a list of lists of ids) continued, ending at `<|endoftext|>`;
- `GET /health` (open, no key): the model and the scheduler's load; `GET /`: the chat page.
Both completion endpoints take max_tokens (or max_completion_tokens), temperature, top_p, top_k,
min_p, repetition_penalty, ignore_eos (vLLM's: no stop at end of text or turn), seed, stop (a string
or a list), n, stream and stream_options.include_usage, answer in OpenAI's shapes (chunks as Server-Sent Events when streaming, then `data: [DONE]`) and
count usage with the model's tokenizer: prompt tokens once per prompt, completion tokens as the tokens
sampled (a stop token included). Unknown fields are ignored, as OpenAI-compatible servers do; a known
field of the wrong type or range is a 400 naming it. Errors come as {"error": {"message", "type",
"param", "code"}}: 400 bad JSON or fields, a prompt that leaves no room in the context, max_tokens
past the limit; 401 a missing or wrong API key (Authorization: Bearer); 404 another model or path;
413 a body over max_body_bytes (refused before it is parsed); 429 the queue is full (Retry-After);
503 the scheduler is not running. A client that disconnects cancels its request at the next step.
What it does not do: batch or sample (scheduler.py) or load models (cli.py `serve`).

    app = create_app(Engine(model, tokenizer), "my-model", chat=loaded.chat, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from scratchllm.common import ScratchError
from scratchllm.infer.commands import encode_prompt
from scratchllm.infer.sampling import SamplingParams
from scratchllm.serve.scheduler import QueueFull, Scheduler
from scratchllm.serve.scheduler import Request as GenRequest

PAGE = Path(__file__).parent / "static" / "chat.html"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_STOPS = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), self.status,
                            headers=self.headers)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --------------------------------------------------------------------------------------------- fields
def _bad(param: str, want: str, value) -> ApiError:
    return ApiError(400, f"'{param}' must be {want}, got {json.dumps(value)[:80]}", param, "invalid_type")


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"a number in {'(' if lo_open else '['}{lo}, {hi}]", v)
    return v


def _integer(body: dict, name: str, default, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        raise _bad(name, f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""), v)
    return v


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(name, "true or false", v)
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise _bad("stop", f"a string or a list of at most {MAX_STOPS} strings", v)
    return tuple(s for s in stops if s)


def sampling_fields(body: dict) -> tuple[SamplingParams, int | None, int]:
    """(sampling parameters, seed, n) of a request body; ApiError names the field that is wrong."""
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, 0, -2, 2):
            raise ApiError(400, f"'{name}' is not supported by this server (use 'repetition_penalty', e.g. 1.1)",
                           name, "unsupported_parameter")
    if body.get("logprobs") not in (None, False, 0) or body.get("echo") not in (None, False):
        name = "logprobs" if body.get("logprobs") not in (None, False, 0) else "echo"
        raise ApiError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    top_k = _integer(body, "top_k", None, -1)
    params = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", None, 0, 1, lo_open=True),
        top_k=None if top_k in (None, -1, 0) else top_k,  # -1 and 0 mean off (vLLM's -1 too)
        min_p=_number(body, "min_p", None, 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", None, 0, 10, lo_open=True))
    seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 63 - 1)
    return params, seed, _integer(body, "n", 1, 1)


def chat_messages(body: dict) -> list[dict]:
    """OpenAI messages -> [{"role", "content": str}]: content parts of type "text" are joined and the
    "developer" role is a system message; other fields of a message (name, ...) are dropped."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list of {role, content} objects", messages)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "an object {role, content}", m)
        role, content = m.get("role"), m.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", "'system', 'developer', 'user' or 'assistant'", role)
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content", "a string or a list of {type: 'text', text} parts", content)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "a string or a list of {type: 'text', text} parts", content)
        out.append({"role": role, "content": content})
    return out


# --------------------------------------------------------------------------------------------- the app
class Server:
    """What the endpoints share: the engine's tokenizer, the scheduler and the limits."""

    def __init__(self, engine, model_id: str, chat=None, api_key: str | None = None, max_batch: int = 16,
                 max_queue: int = 64, max_tokens_limit: int | None = None, max_body_bytes: int = 1 << 20):
        if engine.tokenizer is None:
            raise ScratchError("serving needs the model's tokenizer: create the Engine with one")
        self.engine, self.tokenizer, self.model_id, self.chat = engine, engine.tokenizer, model_id, chat
        self.api_key = api_key or None
        self.context = engine.config.block_size
        self.max_tokens_limit = min(max_tokens_limit or self.context, self.context)
        self.max_body_bytes = max_body_bytes
        self.scheduler = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
        self.created = int(time.time())
        eot = self.tokenizer.eot_token
        self.eot_ids = frozenset() if eot is None else frozenset([eot])

    # ------------------------------------------------------------------ checks
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if not auth:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        """The body as a JSON object; one over max_body_bytes is refused before it is parsed (413)."""
        too_big = ApiError(413, f"the request body is larger than this server's limit of {self.max_body_bytes} "
                                "bytes", code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise _bad("model", "a string", model)
        if model is not None and model != self.model_id:
            raise ApiError(404, f"the model '{model}' does not exist: this server serves '{self.model_id}'",
                           "model", "model_not_found")
        return body

    def max_tokens(self, body: dict, n_prompt: int, default: int | None, prompt_param: str) -> int:
        """The request's max_tokens, checked against the limit and what the context leaves."""
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        given = _integer(body, name, None, 1)
        room = self.context - n_prompt
        if room < 1:
            raise ApiError(400, f"the prompt has {n_prompt} tokens, which leaves no room in this model's context "
                                f"of {self.context} tokens: shorten it", prompt_param, "context_length_exceeded")
        if given is None:
            return max(1, min(default or room, room, self.max_tokens_limit))
        if given > self.max_tokens_limit:
            raise ApiError(400, f"'{name}' is {given}, more than this server allows ({self.max_tokens_limit})",
                           name, "invalid_value")
        if given > room:
            raise ApiError(400, f"the prompt ({n_prompt} tokens) + '{name}' ({given}) is more than this model's "
                                f"context of {self.context} tokens: ask for at most {room}", name,
                           "context_length_exceeded")
        return given

    # ------------------------------------------------------------------ prompts
    def chat_prompt(self, body: dict) -> tuple[list[int], frozenset[int], tuple[str, ...]]:
        from scratchllm.tokenizer.chat import render, turn_stops

        if self.chat is None:
            raise ApiError(400, f"'{self.model_id}' has no chat format (no chat.json or known chat template): use "
                                "/v1/completions, or restart the server with --chat-format", "messages",
                           "no_chat_format")
        messages = chat_messages(body)
        try:
            ids = render(self.chat, messages, self.tokenizer, add_generation_prompt=True)
        except ScratchError as e:
            raise ApiError(400, str(e), "messages", "invalid_value") from None
        stop_ids, stop_texts = turn_stops(self.chat, self.tokenizer)
        return ids, frozenset(stop_ids), tuple(stop_texts)

    def completion_prompts(self, body: dict) -> list[list[int]]:
        p = body.get("prompt")
        want = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        V = self.tokenizer.vocab_size

        def ids_ok(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < V
                                                     for t in x)

        if isinstance(p, str):
            prompts = [p]
        elif ids_ok(p):
            return [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            prompts = p
        elif isinstance(p, list) and p and all(ids_ok(x) for x in p):
            return list(p)
        else:
            raise _bad("prompt", want + f" (ids in [0, {V}))", p)
        out = []
        for text in prompts:
            try:
                ids = encode_prompt(self.tokenizer, text)
            except ValueError as e:
                raise ApiError(400, f"prompt: {e}", "prompt", "invalid_value") from None
            if not ids:
                raise ApiError(400, "the prompt is empty", "prompt", "invalid_value")
            out.append(ids)
        return out


def create_app(engine, model_id: str, chat=None, api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 64, max_tokens_limit: int | None = None, max_body_bytes: int = 1 << 20,
               scheduler_thread: bool = True) -> FastAPI:
    """scheduler_thread: the app starts (and stops) its scheduler in a background thread; False = the
    caller runs app.state.server.scheduler.run() itself (in the main thread: `scratchllm serve`)."""
    server = Server(engine, model_id, chat, api_key, max_batch, max_queue, max_tokens_limit, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if scheduler_thread:
            server.scheduler.start()
        yield
        if scheduler_thread:
            server.scheduler.stop()

    app = FastAPI(title="scratchllm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error", None, code), exc.status_code)

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), 500)

    def model_card() -> dict:
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "scratchllm",
                "context_length": server.context}

    @app.get("/health")
    async def health():
        ok = server.scheduler.alive
        return JSONResponse({"status": "ok" if ok else "down", "model": server.model_id,
                             "context_length": server.context, "chat": server.chat is not None,
                             **server.scheduler.load()}, 200 if ok else 503)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.check_key(request)
        if model_id != server.model_id:
            raise ApiError(404, f"the model '{model_id}' does not exist: this server serves '{server.model_id}'",
                           "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        body = await server.read_json(request)
        params, seed, n = sampling_fields(body)
        ids, stop_ids, stop_texts = server.chat_prompt(body)
        max_tokens = [server.max_tokens(body, len(ids), None, "messages")]
        return await _run(request, body, "chat", [ids], n, params, seed, max_tokens, stop_ids, stop_texts)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_key(request)
        body = await server.read_json(request)
        params, seed, n = sampling_fields(body)
        prompts = server.completion_prompts(body)
        max_tokens = [server.max_tokens(body, len(p), COMPLETIONS_DEFAULT_MAX_TOKENS, "prompt") for p in prompts]
        return await _run(request, body, "text", prompts, n, params, seed, max_tokens, server.eot_ids, ())

    async def _run(request: Request, body: dict, kind: str, prompts: list[list[int]], n: int,
                   params: SamplingParams, seed, max_tokens: list[int], stop_ids, stop_texts):
        stream = _boolean(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise _bad("stream_options", "an object {include_usage}", options)
        include_usage = _boolean(options or {}, "include_usage")
        if _boolean(body, "ignore_eos"):  # vLLM's extra field: run to max_tokens (benchmarks use it)
            stop_ids, stop_texts = frozenset(), ()
        stops = stop_texts + _stops(body)
        if len(prompts) * n > server.scheduler.max_batch:
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={n} is more sequences than this server runs at once "
                                f"({server.scheduler.max_batch})", "n", "invalid_value")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gens = []
        for i, ids in enumerate(prompts):
            def sink(batch, offset=i * n):  # choice j of prompt i is choice i * n + j of the response
                batch = [(kind_, None if index is None else offset + index, *rest) for kind_, index, *rest in batch]
                try:
                    loop.call_soon_threadsafe(events.put_nowait, batch)
                except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
                    pass
            gens.append(GenRequest(ids, max_tokens[i], params, sink, n=n, seed=seed, stop_ids=stop_ids,
                                   stop_strings=stops))
        if not server.scheduler.alive:
            raise ApiError(503, "the server is not running its model (starting or shutting down)",
                           type="server_error", code="unavailable")
        try:
            for g in gens:
                server.scheduler.submit(g)
        except QueueFull as e:
            for g in gens:
                g.cancel()
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
                from None
        usage_prompt = sum(len(p) for p in prompts)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": server.model_id}
        total = len(prompts) * n

        def usage(completion: int) -> dict:
            return {"prompt_tokens": usage_prompt, "completion_tokens": completion,
                    "total_tokens": usage_prompt + completion}

        if not stream:
            texts, finish, counts = [""] * total, [None] * total, [0] * total
            try:
                pending = total
                while pending:
                    try:
                        batch = await asyncio.wait_for(events.get(), timeout=0.5)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return JSONResponse({}, 499)
                        continue
                    for event in batch:
                        if event[0] == "error":
                            raise ApiError(500, event[2], type="server_error", code="generation_failed")
                        if event[0] == "delta":
                            texts[event[1]] += event[2]
                        else:
                            finish[event[1]], counts[event[1]] = event[2], event[3]
                            pending -= 1
            finally:
                for g in gens:
                    g.cancel()  # a no-op for requests that ended; frees the slots of an abandoned one
            if kind == "chat":
                choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                            "finish_reason": finish[i]} for i in range(total)]
            else:
                choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": finish[i]}
                           for i in range(total)]
            return {**meta, "choices": choices, "usage": usage(sum(counts)), "system_fingerprint": None}

        chunk_meta = {**meta, "object": "chat.completion.chunk" if kind == "chat" else "text_completion"}

        def sse(choices: list, **extra) -> str:
            data = {**chunk_meta, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                data["usage"] = None
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        def choice(i: int, text: str | None, finish_reason=None, role: bool = False) -> dict:
            if kind == "chat":
                delta = {} if text is None else {"content": text}
                if role:
                    delta = {"role": "assistant", "content": ""}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

        async def chunks():
            try:
                if kind == "chat":
                    for i in range(total):
                        yield sse([choice(i, None, role=True)])
                pending, completion = total, 0
                while pending:
                    batches = [await events.get()]
                    while not events.empty():  # the client fell behind: send what waits in one write
                        batches.append(events.get_nowait())
                    out = []
                    for event in (e for batch in batches for e in batch):
                        if event[0] == "error":
                            yield "".join(out) + f"data: {json.dumps(error_body(event[2], 'server_error'))}\n\n"
                            return
                        if event[0] == "delta":
                            out.append(sse([choice(event[1], event[2])]))
                        else:
                            pending -= 1
                            completion += event[3]
                            out.append(sse([choice(event[1], None, event[2])]))
                    yield "".join(out)
                if include_usage:
                    yield sse([], usage=usage(completion))
                yield "data: [DONE]\n\n"
            finally:
                for g in gens:
                    g.cancel()  # the client went away (or we are done): free the slots now

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
