"""Writing our model folders: the file names, and `save_model` / `write_model_files`.

What it does: `save_model(model, tokenizer, out_dir, meta=None, chat=None, extra=None)` writes
`model.safetensors` (the unwrapped module's weights: `_orig_mod.` / `module.` prefixes stripped, the
tied head stored once; the rules are state.py's), `config.json` (ModelConfig.to_dict()), `tokenizer/`,
and optionally `chat.json` (the chat format the model speaks, tokenizer/chat.py), more JSON files
(`extra`, e.g. an import's `source.json`) and `meta.json` (with the size and sha256 of every file),
through a temp folder renamed into place. `write_model_files` does the same into a folder the caller
manages (the trainer's checkpoints use it); `write_adapter_files` writes a LoRA run's checkpoint (the
adapters, `adapter.json` naming the base, config.json, tokenizer/).
What it does not do: read folders back (checkpoint.py) or know where models come from (registry.py);
it sits below both, so each can use it without an import cycle.

    save_model(model, tok, "out/model", chat=FORMATS["chatml"])   # FORMATS: tokenizer/chat.py
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from scratchllm.common import ScratchError, atomic_dir
from scratchllm.weights import state

WEIGHTS, CONFIG, TOKENIZER_DIR, META = "model.safetensors", "config.json", "tokenizer", "meta.json"
CHAT = "chat.json"  # the chat format a model speaks (tokenizer/chat.py ChatFormat.to_dict())
ADAPTER = "adapter.json"  # a LoRA run's checkpoint: {"base": the --model it started from, "lora": settings}


def check_vocab(model, tokenizer, source: str) -> None:
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ScratchError(f"{source}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                           f"{model.config.vocab_size} embedding rows (vocab_size): they do not belong together")


def write_model_files(model: torch.nn.Module, tokenizer, folder: str | Path, meta: dict | None = None,
                      chat=None, extra: dict[str, dict] | None = None) -> None:
    """Write model.safetensors, config.json, tokenizer/ (and chat.json, the `extra` JSON files by
    name, meta.json) into an existing folder."""
    folder = Path(folder)
    inner = state.unwrap_model(model)
    check_vocab(inner, tokenizer, str(folder))
    save_weights(folder, state.state_to_save(model))
    write_model_meta(folder, inner.config, tokenizer, chat)
    for name, content in (extra or {}).items():
        (folder / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    if meta is not None:  # with the size + sha256 of every file, as a training checkpoint has
        meta = {**meta, "files": state.folder_digests(folder)}
        (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def save_weights(folder: str | Path, state_dict: dict, name: str = WEIGHTS) -> None:
    """folder/model.safetensors (or folder/NAME) from a state dict (on the CPU, contiguous)."""
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(weights, str(Path(folder) / name), metadata={"format": "pt"})


def write_model_meta(folder: str | Path, model_config, tokenizer, chat=None) -> None:
    """config.json, tokenizer/ (when given) and chat.json (when given) of a model folder."""
    folder = Path(folder)
    (folder / CONFIG).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER_DIR)
    if chat is not None:
        (folder / CHAT).write_text(json.dumps(chat.to_dict(), indent=2, ensure_ascii=False) + "\n")


def write_state_files(folder: str | Path, state_dict: dict, model_config, tokenizer, chat=None) -> None:
    """A training checkpoint's model files from a full state dict: model.safetensors (as the Trainer
    gives it: unwrapped, the tied head once) and write_model_meta's."""
    save_weights(folder, state_dict)
    write_model_meta(folder, model_config, tokenizer, chat)


def write_adapter_files(folder: str | Path, state_dict: dict, base: str, lora: dict, model_config,
                        tokenizer, chat=None, also_trained: list[str] | tuple = (), new_rows_from: int | None = None
                        ) -> None:
    """A LoRA checkpoint's model files: only the adapters (`state_dict`, with `also_trained` base
    parameters such as an embedding that grew), adapter.json (the base, the LoRA settings, the vocab_size,
    those names and `new_rows_from`, the first id given a new mean-initialised row: model/vocab.py),
    config.json, tokenizer/ and chat.json; checkpoint.open_model loads it as base + adapters."""
    folder = Path(folder)
    save_weights(folder, state_dict)
    spec = {"base": base, "lora": lora, "vocab_size": model_config.vocab_size, "also_trained": list(also_trained),
            "new_rows_from": new_rows_from}
    (folder / ADAPTER).write_text(json.dumps(spec, indent=2) + "\n")
    write_model_meta(folder, model_config, tokenizer, chat)


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, meta: dict | None = None,
               overwrite: bool = False, chat=None, extra: dict[str, dict] | None = None) -> Path:
    """Save a model folder atomically (a temp folder renamed to out_dir only once complete)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_files(model, tokenizer, tmp, meta, chat=chat, extra=extra)
    return Path(out_dir)
