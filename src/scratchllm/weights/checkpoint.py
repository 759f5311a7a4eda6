"""Model folders: save a model (+ tokenizer) atomically, load one back from any folder we know.

What it does:
- `save_model(model, tokenizer, out_dir, meta=None)` writes `model.safetensors` (the unwrapped
  module's weights: `_orig_mod.` / `module.` prefixes stripped, the tied head stored once),
  `config.json` (ModelConfig.to_dict()), `tokenizer/` and optionally `meta.json`, through a temp
  folder renamed into place. `write_model_files` does the same into a folder the caller manages
  (the trainer's checkpoints use it).
- `load_model(path)` accepts such a folder, a run folder (follows `RUN_DIR/latest`), a Hugging
  Face GPT-2 folder, or the path of the `model.safetensors` inside one of those model folders (its
  folder is used), and returns `(GPT, Tokenizer | None)`.
- `load_state_dict_checked` loads weights and, on any mismatch, raises one ScratchError that lists
  the missing, unexpected and wrongly shaped keys.
What it does not do: optimizer / training state (train/checkpointing.py) or HF conversion (hf.py).

    save_model(model, tok, "out/model")
    model, tok = load_model("out/model")      # or a run folder, or an HF GPT-2 folder
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from scratchllm.common import ScratchError, atomic_dir
from scratchllm.model import GPT, ModelConfig

WEIGHTS, CONFIG, TOKENIZER_DIR, META = "model.safetensors", "config.json", "tokenizer", "meta.json"
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP/FSDP wrappers


def unwrap_key(key: str) -> str:
    """'module._orig_mod.transformer.wte.weight' -> 'transformer.wte.weight'."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights to save: unwrapped names, contiguous CPU tensors, a tied lm_head left out."""
    sd = {unwrap_key(k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = getattr(model, "config", None) or getattr(getattr(model, "_orig_mod", model), "config", None)
    if config is not None and config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def empty_model(config: ModelConfig, device="cpu") -> GPT:
    """A GPT with uninitialised weights (built on the meta device, so no time goes into random init),
    meant to be filled by load_state_dict_checked. The head is re-tied after allocation."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model


def load_state_dict_checked(model: GPT, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy `sd` into `model`, or raise a ScratchError naming every missing / unexpected / misshapen key."""
    sd = {unwrap_key(k): v for k, v in sd.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight", None)
        sd.pop("lm_head.weight", None)  # some writers store the tied head too; it is wte
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
              for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    for title, items in (("shape mismatch", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            shown = "; ".join(items[:12]) + (f"; ... ({len(items) - 12} more)" if len(items) > 12 else "")
            problems.append(f"{title} ({len(items)}): {shown}")
    if problems:
        raise ScratchError(f"{source}: weights do not fit the model config: " + " | ".join(problems))
    model.load_state_dict(sd, strict=False)


def check_vocab(model: GPT, tokenizer, source: str) -> None:
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ScratchError(f"{source}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                           f"{model.config.vocab_size} embedding rows (vocab_size): they do not belong together")


def write_model_files(model: torch.nn.Module, tokenizer, folder: str | Path, meta: dict | None = None) -> None:
    """Write model.safetensors, config.json, tokenizer/ (and meta.json) into an existing folder."""
    folder = Path(folder)
    inner = getattr(model, "_orig_mod", getattr(model, "module", model))
    check_vocab(inner, tokenizer, str(folder))
    save_file(model_state_dict(model), str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(inner.config.to_dict(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(folder / TOKENIZER_DIR)
    if meta is not None:
        (folder / META).write_text(json.dumps(meta, indent=2) + "\n")


def save_model(model: torch.nn.Module, tokenizer, out_dir: str | Path, meta: dict | None = None,
               overwrite: bool = False) -> Path:
    """Save a model folder atomically (a temp folder renamed to out_dir only once complete)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_model_files(model, tokenizer, tmp, meta)
    return Path(out_dir)


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder itself, the folder of a `model.safetensors` path, or the newest complete
    checkpoint of a run folder (via its `latest` file)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ScratchError(f"{path} does not exist (give a model folder, a run folder, a HF GPT-2 folder "
                           f"or the {WEIGHTS} inside one)")
    if path.is_file():
        if path.name != WEIGHTS:
            raise ScratchError(f"{path} is a file: give a model folder, a run folder, a HF GPT-2 folder or "
                               f"the {WEIGHTS} inside one (its folder holds {CONFIG})")
        path = path.parent
    latest = path / "latest"
    if not (path / CONFIG).is_file() and latest.is_file():
        name = latest.read_text().strip()
        if not name or not (path / name / CONFIG).is_file():
            raise ScratchError(f"{latest} points to {name!r}, which is not a complete checkpoint folder")
        path = path / name
    if not (path / CONFIG).is_file():
        raise ScratchError(f"{path}: no config.json here and no `latest` file; not a model, run or HF folder")
    return path


def load_model(path: str | Path, device="cpu") -> tuple[GPT, object | None]:
    """(model in eval mode, tokenizer or None) from a model folder, a run folder, a HF GPT-2 folder
    or a model folder's model.safetensors."""
    from scratchllm.common import read_json
    from scratchllm.weights.hf import load_hf_gpt2, load_hf_tokenizer, read_safetensors

    folder = resolve_model_dir(path)
    config_dict = read_json(folder / CONFIG)
    if "model_type" in config_dict or "n_positions" in config_dict:  # a transformers config
        model, tokenizer = load_hf_gpt2(folder, device=device), load_hf_tokenizer(folder)
    else:
        config = ModelConfig.from_dict(config_dict, source=str(folder / CONFIG))
        if not (folder / WEIGHTS).is_file():
            raise ScratchError(f"{folder / WEIGHTS} is missing")
        model = empty_model(config, device)
        load_state_dict_checked(model, read_safetensors(folder / WEIGHTS), str(folder / WEIGHTS))
        model.eval()
        tokenizer = None
        if (folder / TOKENIZER_DIR).is_dir():
            from scratchllm.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(folder / TOKENIZER_DIR)
    check_vocab(model, tokenizer, str(folder))
    return model, tokenizer
