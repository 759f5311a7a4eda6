"""The `scratchllm serve` subcommand: load a model and serve it over the OpenAI API and a chat page.

What it does: loads anything `--model` accepts (as `generate` does) in the chosen precision, checks
the limits, and runs app.py's FastAPI app under uvicorn on --host:--port (127.0.0.1 unless told
otherwise). The API key is --api-key or $SCRATCHLLM_API_KEY; without one, every client that can reach
the port may use the model, so binding another address without a key prints a warning. The model's
id in the API is --name (default: the last part of --model).
What it does not do: batch or speak HTTP itself (scheduler.py, app.py).

    scratchllm serve --model smollm2-135m-instruct --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from scratchllm.common import ScratchError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def model_name(spec: str) -> str:
    """The model id clients send: the last part of --model, without .gguf.

    >>> model_name("runs/sft/run/"), model_name("models/SmolLM2.Q4_1.gguf"), model_name("smollm2-135m-instruct")
    ('run', 'SmolLM2.Q4_1', 'smollm2-135m-instruct')
    """
    name = Path(spec.rstrip("/\\")).name
    return name[:-5] if name.lower().endswith(".gguf") else name


def check_args(args) -> None:
    for flag, value, lo in (("--port", args.port, 0), ("--max-batch", args.max_batch, 1),
                            ("--max-queue", args.max_queue, 1), ("--max-body-bytes", args.max_body_bytes, 1)):
        if value < lo:
            raise ScratchError(f"{flag} must be >= {lo}, got {value}")
    if args.port > 65535:
        raise ScratchError(f"--port must be <= 65535, got {args.port}")
    if args.max_tokens_limit is not None and args.max_tokens_limit < 1:
        raise ScratchError(f"--max-tokens-limit must be >= 1, got {args.max_tokens_limit}")


def serve(args) -> int:
    check_args(args)
    try:
        import uvicorn  # noqa: F401  (checked here, used by serve_forever)

        from scratchllm.serve.app import create_app
    except ImportError as e:
        raise ScratchError(f"serving needs FastAPI and uvicorn ({e}): pip install 'scratchllm[serve]'") from None
    from scratchllm.infer.commands import open_for_inference
    from scratchllm.infer.engine import Engine
    from scratchllm.tokenizer.chat import pick_format

    api_key = args.api_key or os.environ.get("SCRATCHLLM_API_KEY") or None
    loaded, device, what = open_for_inference(args.model, args.device, args.precision, "serving", args.weights)
    chat = pick_format(args.chat_format, loaded.chat)
    engine = Engine(loaded.model, loaded.tokenizer)
    name = args.name or model_name(args.model)
    app = create_app(engine, name, chat=chat, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                     scheduler_thread=False)
    if args.host not in LOOPBACK and api_key is None:
        print(f"warning: serving on {args.host} without an API key: anyone who can reach port {args.port} can "
              "use the model (pass --api-key or set SCRATCHLLM_API_KEY)", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {name} ({what}, context {engine.config.block_size}, "
          f"chat format {chat.name if chat else 'none'}) at http://{host}:{args.port}/v1 — chat page "
          f"http://{host}:{args.port}/{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    serve_forever(app, args.host, args.port, args.log_level)
    return 0


def serve_forever(app, host: str, port: int, log_level: str) -> None:
    """uvicorn in a background thread, the scheduler in this (the main) thread, until Ctrl-C or SIGTERM.
    The model runs in the main thread because bf16 matmuls measured 1.5x slower from any other thread
    on this project's CPUs (docs/serve.md); fp32 ran equally fast in both. Sets the interpreter's
    switch interval to 0.1 ms for the process (see below)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    web = threading.Thread(target=server.run, name="scratchllm-http", daemon=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    # every torch op of a decode step gives up the GIL and takes it back; with Python's default switch
    # interval (5 ms) the HTTP thread could keep it that long each time. 0.1 ms: 8 clients measured
    # 1.2x the tokens/s of the default (docs/benchmarks.md)
    sys.setswitchinterval(1e-4)
    web.start()
    try:
        app.state.server.scheduler.run(keep_going=web.is_alive)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        web.join(timeout=10)
    if not server.started:
        raise ScratchError(f"could not serve on {host}:{port} (uvicorn's error is above: is the port in use?)")
