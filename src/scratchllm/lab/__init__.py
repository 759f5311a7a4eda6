"""The lab: every design claim of the book, measured here by an experiment anyone can rerun.

`scratchllm lab list` names them; `scratchllm lab run NAME [--quick] [--out DIR]` runs one (commands.py)
and writes result.json, result.md and result.png. Each experiment is one module with NAME, CLAIM and
`run(quick, out) -> Result` (core.py), built from the package's own model, Trainer and stages.
"""

from importlib import import_module

MODULES = ["norm_position", "mlp_activation", "weight_tying", "grad_clip", "lr_schedule", "tokenization", "attention", "kv_cache",
           "compile_bf16", "lora", "prompt_masking", "freezing"]


def experiments() -> dict:
    """{name: module} of every experiment, in the order of the book's claims."""
    mods = [import_module(f"scratchllm.lab.{m}") for m in MODULES]
    return {m.NAME: m for m in mods}
