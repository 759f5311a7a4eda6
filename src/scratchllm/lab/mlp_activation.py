"""Claim 2: the MLP's nonlinearity matters: GELU (GPT-2) vs ReLU vs SwiGLU (Llama) at equal parameters
and steps.

Measures: the byte model with each MLP, same seed, data order and steps. GELU and ReLU use the 4x
hidden width; SwiGLU has three matrices instead of two, so its hidden width is 8/3x, rounded to the
nearest multiple of 8 (the parameter counts are printed: equal within 1%).
"""

from __future__ import annotations

from pathlib import Path

from scratchllm.lab.core import Result, byte_config, loss_curves, train_lm

NAME = "mlp-activation"
CLAIM = "SwiGLU beats GELU, which beats ReLU, at equal parameters and training steps."


def run(quick: bool, out: Path) -> Result:
    steps = 80 if quick else 800
    d = byte_config().n_embd
    swiglu_hidden = round(8 * d / 3 / 8) * 8
    rows, curves = [], {}
    for mlp, hidden in (("gelu", None), ("relu", None), ("swiglu", swiglu_hidden)):
        r = train_lm(byte_config(mlp=mlp, mlp_hidden=hidden), steps=steps, out=out / "runs" / mlp)
        curves[mlp] = r.losses
        rows.append({"mlp": mlp, "hidden": hidden or 4 * d, "parameters": r.params, "val loss": r.val_loss})
    loss = {r["mlp"]: r["val loss"] for r in rows}
    order = sorted(loss, key=loss.get)
    verdict = "holds" if order == ["swiglu", "gelu", "relu"] else "depends"
    why = (f"Validation loss after {steps} steps: " + ", ".join(f"{m} {loss[m]:.3f}" for m in order) +
           " (best first), one seed.")

    return Result(NAME, CLAIM, {"model": "byte GPT 2x64, block 64", "steps": steps, "seed": 0, "lr": 3e-3},
                  rows, verdict, why, loss_curves(curves))
