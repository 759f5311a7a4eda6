"""Serving: an OpenAI-compatible HTTP server (app.py) over a continuous-batching scheduler
(scheduler.py), with a chat page (static/chat.html); `scratchllm serve` (commands.py) starts it.
Needs the `serve` extra (FastAPI, uvicorn).

    from scratchllm.serve.app import create_app
    app = create_app(Engine(model, tokenizer), "my-model", chat=loaded.chat)
"""
