"""Model folders: load a model back from any folder we know (or anything else `--model` accepts).

What it does:
- `save_model` / `write_model_files` (written in folder.py, re-exported here) save a model folder
  atomically: model.safetensors, config.json, tokenizer/, chat.json, meta.json.
- `load_model(path)` accepts such a folder, a run folder (follows `RUN_DIR/latest`), a Hugging
  Face folder (GPT-2, Llama, Mistral, Qwen2: hf.py), the path of the `model.safetensors` inside one
  of those model folders (its folder is used), a `.gguf` file or a registry name such as
  `smollm2-135m-instruct` (both imported once into the cache, see registry.py), and returns
  `(GPT, Tokenizer | None)`; `open_model` returns the chat format and the folder too. A LoRA run's
  checkpoint (adapter.json, folder.write_adapter_files) loads as its base with the adapters merged in
  (`load_adapter_model`).
  Weights are loaded with state.load_state_dict_checked: any mismatch is one ScratchError listing the
  missing, unexpected and wrongly shaped keys. A folder with a meta.json (every training checkpoint)
  is first checked against its `files` table (`verify_model_files`): sizes on every load, sha256 on
  the first load of each file version (remembered in `.verified.json`); an empty table is refused.
What it does not do: optimizer / training state (train/checkpointing.py), HF or GGUF conversion (hf.py,
gguf.py) or the registry and its cache (registry.py).

    save_model(model, tok, "out/model", chat=FORMATS["chatml"])   # tokenizer/chat.py
    model, tok = load_model("out/model")      # or a run folder, an HF folder, a .gguf, a registry name
    loaded = open_model("smollm2-135m-instruct"); loaded.chat.name   # 'chatml'
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scratchllm.common import ScratchError, read_json
from scratchllm.model import GPT, ModelConfig
from scratchllm.weights import state
from scratchllm.weights.folder import (  # noqa: F401  (the writers, re-exported: callers import them from here)
    ADAPTER,
    CHAT,
    CONFIG,
    META,
    TOKENIZER_DIR,
    WEIGHTS,
    check_vocab,
    save_model,
    write_model_files,
)


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder itself, the folder of a `model.safetensors` path, or the newest complete
    checkpoint of a run folder (via its `latest` file). A `.gguf` file or a registry name is first
    imported into the cache (registry.resolve)."""
    from scratchllm.weights.registry import resolve

    path = resolve(path)
    if not path.exists():
        raise ScratchError(f"{path} does not exist (give a model folder, a run folder, a Hugging Face folder, "
                           f"the {WEIGHTS} inside one, a .gguf file or a model name from `scratchllm model list`)")
    if path.is_file():
        if path.name != WEIGHTS:
            raise ScratchError(f"{path} is a file: give a model folder, a run folder, a Hugging Face folder, "
                               f"the {WEIGHTS} inside one (its folder holds {CONFIG}) or a .gguf file")
        path = path.parent
    return state.resolve_latest(path, CONFIG)


def _read_by_load(name: str) -> bool:
    """The files of a checkpoint's meta.json table that load_model reads (not train_state.pt)."""
    return name in (WEIGHTS, CONFIG) or name.startswith(TOKENIZER_DIR + "/")


def verify_model_files(folder: str | Path) -> None:
    """When `folder` holds a meta.json (training checkpoints, save_model(meta=...)): check what
    load_model reads against its `files` table: sizes every time, sha256 once per file version (the
    passed checks are kept in `.verified.json`, see state.verify_files). No meta.json: nothing to check."""
    folder = Path(folder)
    meta_path = folder / META
    if not meta_path.is_file():
        return
    meta = read_json(meta_path)
    files = state.listed_files(meta, meta_path, hint=f", or remove {META} to load the model unchecked")
    if WEIGHTS not in files:
        raise ScratchError(f"{meta_path}: its `files` table does not list {WEIGHTS}, so the weights cannot be "
                           f"checked for corruption; restore {META} from the original checkpoint")
    if meta.get("base_fingerprint"):
        raise ScratchError(f"{folder} holds only the trainable parameters of a run (a head or adapters) on top "
                           f"of base model {meta['base_fingerprint']}: load it with "
                           "weights.partial.load_partial(base_model, folder)")
    state.verify_files(folder, files, meta_path, which=_read_by_load, cache=True)


def is_hf_config(d: dict) -> bool:
    """A transformers config.json (rather than our ModelConfig's)."""
    return "model_type" in d or "n_positions" in d


def read_chat_format(folder: str | Path):
    """The ChatFormat of our model folder's chat.json, or None when it has none."""
    from scratchllm.tokenizer.chat import ChatFormat

    path = Path(folder) / CHAT
    return ChatFormat.from_dict(read_json(path), source=str(path)) if path.is_file() else None


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: object | None
    chat: object | None  # the ChatFormat the model speaks, or None
    folder: Path  # the folder the weights came from (an imported model's cache folder)


def open_model(path: str | Path, device="cpu") -> LoadedModel:
    """Model (eval mode), tokenizer, chat format and folder of anything `--model` accepts (see the
    module doc). A checkpoint's files are first checked against its meta.json (verify_model_files)."""
    from scratchllm.weights import hf

    folder = resolve_model_dir(path)
    if (folder / ADAPTER).is_file():  # a LoRA run: its base + these adapters, merged
        return load_adapter_model(folder, device=device)
    if (folder / "classifier.json").is_file():
        kind = read_json(folder / "classifier.json").get("extra", {}).get("kind")
        if kind == "reward":
            raise ScratchError(f"{folder} is a reward model, not a language model: use it with `scratchllm reward score` "
                               "or as --reward-model of `scratchllm ppo`")
        raise ScratchError(f"{folder} is a text classifier, not a language model: use `scratchllm classify eval` or "
                           "`classify predict` with it (infer/classifier.py: Classifier.load)")
    verify_model_files(folder)
    config_dict = read_json(folder / CONFIG)
    chat = None
    if is_hf_config(config_dict):
        model, tokenizer = hf.load_hf_model(folder, device=device), hf.load_hf_tokenizer(folder)
        chat = hf.hf_chat_format(folder)
    else:
        source = str(folder / CONFIG)
        config = state.config_from_file(lambda: ModelConfig.from_dict(config_dict, source=source), source)
        if not (folder / WEIGHTS).is_file():
            raise ScratchError(f"{folder / WEIGHTS} is missing")
        model = state.empty_model(config, device)
        state.read_safetensors_into(model, folder / WEIGHTS)
        model.eval()
        tokenizer = None
        if (folder / TOKENIZER_DIR).is_dir():
            from scratchllm.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(folder / TOKENIZER_DIR)
        chat = read_chat_format(folder)
    check_vocab(model, tokenizer, str(folder))
    return LoadedModel(model, tokenizer, chat, folder)


def load_adapter_model(folder: Path, device="cpu") -> LoadedModel:
    """Base (anything `--model` accepts, named in adapter.json) + the folder's LoRA adapters, checked
    (files, base fingerprint: weights/partial.py) and merged into plain Linear weights."""
    from scratchllm.model.lora import apply_lora, merge_lora
    from scratchllm.weights.partial import load_partial

    path = Path(folder) / ADAPTER
    spec = read_json(path)
    lora = spec.get("lora") if isinstance(spec, dict) else None
    if not isinstance(lora, dict) or not isinstance(spec.get("base"), str) or not {"rank", "alpha", "targets"} <= set(lora):
        raise ScratchError(f"{path}: damaged adapter description (needs base and lora {{rank, alpha, targets}})")
    also = spec.get("also_trained", [])
    if not isinstance(also, list) or not all(isinstance(n, str) for n in also):
        raise ScratchError(f"{path}: field 'also_trained' must be a list of parameter names")
    base = open_model(spec["base"], device=device)
    vocab, first_new = spec.get("vocab_size", base.model.config.vocab_size), spec.get("new_rows_from")
    if first_new is not None or vocab != base.model.config.vocab_size:
        # special tokens were added: rebuild the base as the run started (its fingerprint); trained rows follow
        from scratchllm.model.vocab import grow_vocab

        grow_vocab(base.model, vocab, first_new=base.model.config.vocab_size if first_new is None else first_new)
    apply_lora(base.model, lora["rank"], lora["alpha"], lora.get("dropout", 0.0), tuple(lora["targets"]))
    params = dict(base.model.named_parameters())
    for name in also:
        if name not in params:
            raise ScratchError(f"{path}: also_trained names {name!r}, which the base model {spec['base']} lacks")
        params[name].requires_grad_(True)
    load_partial(base.model, folder)
    tokenizer = base.tokenizer
    if (Path(folder) / TOKENIZER_DIR).is_dir():
        from scratchllm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(Path(folder) / TOKENIZER_DIR)
    chat = read_chat_format(folder) or base.chat  # the format the adapters were trained on
    merged = merge_lora(base.model).eval().requires_grad_(True)  # a plain model again, as open_model gives
    return LoadedModel(merged, tokenizer, chat, Path(folder))


def load_model(path: str | Path, device="cpu") -> tuple[GPT, object | None]:
    """(model in eval mode, tokenizer or None) of anything `--model` accepts: open_model without the
    chat format."""
    loaded = open_model(path, device=device)
    return loaded.model, loaded.tokenizer
