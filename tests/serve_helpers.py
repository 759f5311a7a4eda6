"""Live servers for the serving tests: `scratchllm serve` as a subprocess (the real command), or create_app
run by uvicorn in a thread of the test process (when a test needs to reach inside: a slowed model, a
small queue), each on a free port of 127.0.0.1. Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

KEY = "sk-scratchllm-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_healthy(base: str, proc: subprocess.Popen | None = None, timeout: float = 90.0,
                 healthy: bool = True) -> None:
    """Wait until /health answers 200 (healthy=False: answers at all, 503 included)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{proc.stderr.read()}")
        try:
            get_json(base + "/health", timeout=2)
            return
        except urllib.error.HTTPError:
            if not healthy:
                return
            time.sleep(0.2)
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{base}/health did not answer within {timeout} s")


@contextlib.contextmanager
def cli_server(model: Path, *args: str, env: dict | None = None):
    """`scratchllm serve --model MODEL ARGS` on a free port; yields http://127.0.0.1:PORT."""
    port = free_port()
    cmd = [sys.executable, "-m", "scratchllm", "serve", "--model", str(model), "--port", str(port),
           "--device", "cpu", "--precision", "fp32", "--weights", "fp32", "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        proc.stderr.close()


@contextlib.contextmanager
def thread_server(app, healthy: bool = True):
    """Run a FastAPI app with uvicorn in a background thread; yields http://127.0.0.1:PORT."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout=30, healthy=healthy)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class SlowRunner:
    """A model that takes `delay` seconds more per forward: makes a request last long enough for a test
    to see it queued, running or cancelled."""

    def __init__(self, model, delay: float):
        self.model, self.delay, self.lm_head = model, delay, model.lm_head

    def hidden_states(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.model.hidden_states(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


def chaotic_chat_model(tokenizer, folder: Path, seed: int = 3, block_size: int = 128) -> Path:
    """A tiny random GPT with ChatML whose 2-D weights are scaled x20: its greedy output is varied (no
    near-ties, no one token repeated forever, as a plain random init gives), and fully determined."""
    import torch

    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer.chat import FORMATS
    from scratchllm.weights.folder import save_model

    torch.manual_seed(seed)
    model = GPT(ModelConfig(block_size=block_size, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
    return save_model(model, tokenizer, folder, chat=FORMATS["chatml"])
