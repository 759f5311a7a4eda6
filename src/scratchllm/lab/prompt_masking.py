"""Claim 11: in SFT, computing the loss on the answers only (masking the prompt) gives a better model of
the answers than training on every token, measured by the loss on held-out answers and by an LLM
judge.

Measures: SmolLM2-135M-Instruct fine-tuned with LoRA on the book's instruction data (the SFT stage:
`scratchllm sft`), once with `--mask-prompt` and once with `--no-mask-prompt`, same split, seed and
steps; then for each model `scratchllm eval loss` (the masked loss of the held-out test answers) and
`scratchllm eval generate` on the first test instructions, scored by `scratchllm eval judge` against
`scratchllm serve` running the untuned SmolLM2-135M-Instruct as the judge (in this process). A 135M
judge mostly does not follow the judge prompt (it answers the instruction instead): its few scores are
reported with their count, and the verdict rests on the loss.
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import threading
import time
import urllib.request
from pathlib import Path

from scratchllm.lab.core import Result

NAME = "prompt-masking"
CLAIM = "Masking the prompt in SFT lowers the held-out answer loss and raises the judge's score."
MODEL = "smollm2-135m-instruct"


def cli(*argv) -> str:
    """Run one scratchllm command in-process; its stdout (what it printed) is returned."""
    from scratchllm.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main([str(a) for a in argv])
    if code:
        raise RuntimeError(f"scratchllm {' '.join(map(str, argv))} exited with {code}: {buf.getvalue()[-500:]}")
    return buf.getvalue()


def quick_backbone(out: Path) -> str:
    """--quick: a random 2-block GPT with a ChatML BPE of 400 ids trained on the first records (the same
    commands in seconds; its numbers mean nothing)."""
    import torch

    from scratchllm.data.instructions import read_conversations
    from scratchllm.model import GPT, ModelConfig
    from scratchllm.tokenizer import train_bpe
    from scratchllm.tokenizer.chat import FORMATS
    from scratchllm.weights.folder import save_model

    convs = read_conversations("data:instruction-data")[:200]
    text = "\n".join(m["content"] for c in convs for m in c.messages)
    tok = train_bpe([text], vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=512, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32))
    return str(save_model(model, tok, out / "quick-backbone", chat=FORMATS["chatml"], overwrite=True))


@contextlib.contextmanager
def judge_server(model: str):
    """`scratchllm serve`'s app over the untuned model, in a thread; yields its URL."""
    import uvicorn

    from scratchllm.infer.engine import Engine
    from scratchllm.serve.app import create_app
    from scratchllm.weights.checkpoint import open_model

    loaded = open_model(model)
    app = create_app(Engine(loaded.model, loaded.tokenizer), "judge", chat=loaded.chat)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def run(quick: bool, out: Path) -> Result:
    steps, answers, tokens = (4, 4, 24) if quick else (100, 20, 64)
    model = quick_backbone(out) if quick else MODEL
    rows = {}
    for masked in (True, False):
        name = "masked" if masked else "unmasked"
        run_dir = out / "runs" / name
        cli("sft", "--model", model, "--data", "data:instruction-data", "--out", run_dir, "--overwrite",
            "--lora-rank", 16, "--lr", 2e-4, "--max-steps", steps, "--batch-size", 4, "--max-length", 256,
            "--eval-every", 0, "--samples", 0, "--checkpoint-every", steps, "--no-compile", "--seed", 0,
            "--mask-prompt" if masked else "--no-mask-prompt")
        test = run_dir / "test.jsonl"  # the run's held-out split (the same records for both runs: same seed)
        if quick:  # the first records only
            (run_dir / "test-quick.jsonl").write_text("".join(test.read_text().splitlines(True)[:answers]))
            test = run_dir / "test-quick.jsonl"
        loss = json.loads(cli("eval", "loss", "--model", run_dir, "--data", test, "--json").strip().splitlines()[-1])
        cli("eval", "generate", "--model", run_dir, "--data", test, "--out", run_dir / "responses.jsonl",
            "--limit", answers, "--max-new-tokens", tokens, "--show", 0)
        rows[name] = {"loss on": "answers" if masked else "every token", "held-out answer loss": loss["loss"],
                      "answer perplexity": loss["ppl"]}
    with judge_server(model) as url:
        for name in rows:
            run_dir = out / "runs" / name
            cli("eval", "judge", run_dir / "responses.jsonl", "--judge-url", url, "--judge-model", "judge",
                "--workers", 4, "--retries", 0)
            scores = [json.loads(line).get("score") for line in
                      (run_dir / "responses.scores.jsonl").read_text().splitlines()]
            valid = [s for s in scores if s is not None]
            rows[name]["judge mean (0-100)"] = sum(valid) / len(valid) if valid else float("nan")
            rows[name]["scored"] = f"{len(valid)}/{len(scores)}"
    m, u = rows["masked"], rows["unmasked"]
    lower = m["held-out answer loss"] < u["held-out answer loss"] - 0.01
    verdict = "holds" if lower else "does not hold here"
    why = (f"Held-out answer loss: masked {m['held-out answer loss']:.3f} vs unmasked {u['held-out answer loss']:.3f} "
           f"({steps} LoRA steps each). Judge mean {m['judge mean (0-100)']:.1f} vs {u['judge mean (0-100)']:.1f} from "
           f"{m['scored']} and {u['scored']} readable replies: a judge this small mostly answers the instruction instead "
           "of scoring it (docs/sft.md), so the verdict rests on the loss; point `eval judge` at a bigger model for "
           "the score.")
    table = [{"run": k, **v} for k, v in rows.items()]

    def plot(fig):
        ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        ax1.bar(list(rows), [r["held-out answer loss"] for r in rows.values()])
        ax1.set_ylabel("held-out answer loss (nats/token)")
        ax2.bar(list(rows), [r["judge mean (0-100)"] for r in rows.values()])
        ax2.set_ylabel("judge mean score (0-100)")

    return Result(NAME, CLAIM, {"model": "a random 2x32 GPT (quick: the numbers mean nothing)" if quick else MODEL, "data": "data:instruction-data (the book's 1100, split 85/5/10)",
                                "LoRA": "rank 16, lr 2e-4", "steps": steps, "batch": 4, "judged answers": answers,
                                "max new tokens": tokens, "judge": f"{model} (untuned) via scratchllm serve"},
                  table, verdict, why, plot)
