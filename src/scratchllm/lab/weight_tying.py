"""Claim 3: weight tying (lm_head shares the token embedding) saves vocab_size x n_embd parameters and
costs little or no loss.

Measures: the exact parameter count of the same GPT with and without tying (the lab's byte model, and
GPT-2 124M's shape, counted without building its weights' training), and the validation loss of the
byte model trained with each, same seed and steps.
"""

from __future__ import annotations

from pathlib import Path

from scratchllm.lab.core import Result, byte_config, loss_curves, replace, train_lm
from scratchllm.model import GPT, ModelConfig

NAME = "weight-tying"
CLAIM = ("Tying the output layer to the token embedding saves vocab_size x n_embd parameters (38.6M of "
         "GPT-2 124M's) at little or no cost in loss.")


def run(quick: bool, out: Path) -> Result:
    steps = 60 if quick else 600
    base = byte_config()
    rows, curves = [], {}
    gpt2 = ModelConfig.from_preset("gpt2")
    with_tie, without = GPT(replace(gpt2, n_layer=1)), GPT(replace(gpt2, n_layer=1, tie_embeddings=False))
    saved_gpt2 = without.num_params() - with_tie.num_params()  # one block is enough: the difference is the head
    for tied in (True, False):
        r = train_lm(replace(base, tie_embeddings=tied), steps=steps, out=out / "runs" / f"tied-{tied}")
        curves[f"tied={tied}"] = r.losses
        rows.append({"tied": tied, "parameters": r.params, "val loss": r.val_loss, "train seconds": r.seconds})
    saved = rows[1]["parameters"] - rows[0]["parameters"]
    assert saved == base.vocab_size * base.n_embd, saved
    assert saved_gpt2 == gpt2.vocab_size * gpt2.n_embd, saved_gpt2
    gap = rows[0]["val loss"] - rows[1]["val loss"]
    verdict = "holds" if gap < 0.05 else "does not hold here"
    why = (f"Tying saves exactly vocab_size x n_embd = {saved:,} parameters here ({saved / rows[1]['parameters']:.0%} "
           f"of the untied byte model) and {saved_gpt2:,} in GPT-2 124M; the tied model's validation loss is "
           f"{gap:+.3f} nats/byte against the untied one after {steps} steps.")

    return Result(NAME, CLAIM, {"model": "byte GPT 2x64, block 64", "steps": steps, "batch": 16, "seed": 0,
                                "lr": 3e-3, "gpt2 saved": saved_gpt2}, rows, verdict, why, loss_curves(curves))
