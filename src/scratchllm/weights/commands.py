"""The command-line side of the model and its weights: `model info`, `model list`, `download`, `export`.

What it does: turns parsed arguments into calls of model/info.py, weights/registry.py,
weights/download.py, weights/gguf.py and weights/hf.py and prints the results. What it does not do:
any of the math or the conversions themselves.

    scratchllm model info --preset gpt2 --batch 8 --block 1024
    scratchllm model info --model smollm2-135m-instruct      # or a .gguf file, an HF or model folder
    scratchllm model list
    scratchllm download gpt2 --size 124M --dest models/gpt2
    scratchllm download smollm2-135m-instruct
    scratchllm export --model runs/demo/run --format hf --out out/hf
"""

from __future__ import annotations

from pathlib import Path

from scratchllm.common import ScratchError


def model_info(args) -> int:
    """`scratchllm model info`: sizes, FLOPs and memory of a preset or a saved model's config."""
    from scratchllm.model.config import ModelConfig
    from scratchllm.model.info import estimate, format_report

    if (args.preset is None) == (args.model is None):
        raise ScratchError("model info: give exactly one of --preset NAME or --model DIR")
    if args.preset is not None:
        cfg, name = ModelConfig.from_preset(args.preset), args.preset
    else:
        cfg, name = read_config(args.model), str(args.model)
    if args.batch <= 0 or (args.block is not None and args.block <= 0):
        raise ScratchError("model info: --batch and --block must be positive")
    print(format_report(name, cfg, estimate(cfg, args.batch, args.block)))
    return 0


def read_config(path: str | Path):
    """The ModelConfig of anything `--model` accepts, without reading (or importing) the weights: a
    .gguf file's metadata, a registry name's cached folder or packaged GGUF, a model, run or HF folder."""
    from scratchllm.common import read_json
    from scratchllm.model.config import ModelConfig
    from scratchllm.weights import registry
    from scratchllm.weights.checkpoint import CONFIG, is_hf_config, resolve_model_dir
    from scratchllm.weights.hf import config_from_hf
    from scratchllm.weights.state import config_from_file

    spec = str(path)
    gguf_file = Path(spec).expanduser() if spec.endswith(".gguf") and Path(spec).expanduser().is_file() else None
    if gguf_file is None and not Path(spec).expanduser().exists() and spec in registry.MODELS:
        if not registry.cached(registry.models_dir() / spec):
            gguf_file = registry.packaged_gguf(spec)
    if gguf_file is not None:
        from scratchllm.weights.gguf import config_from_gguf, read_gguf

        return config_from_gguf(read_gguf(gguf_file).metadata, str(gguf_file))
    folder = resolve_model_dir(path)
    source = str(folder / CONFIG)
    d = read_json(source)
    if is_hf_config(d):
        return config_from_file(lambda: config_from_hf(d, source), source)
    return config_from_file(lambda: ModelConfig.from_dict(d, source=source), source)


def model_list(args) -> int:
    """`scratchllm model list`: the registry's models and where each one is available."""
    from scratchllm.weights import registry

    for name in registry.MODELS:
        print(registry.describe(name))
    print(f"cache: {registry.models_dir()} (SCRATCHLLM_CACHE); any of these names works as --model NAME")
    return 0


def download(args) -> int:
    """`scratchllm download gpt2|NAME`: download, then check that the folder loads as a model."""
    from scratchllm.weights.checkpoint import load_model

    if args.name != "gpt2":
        from scratchllm.weights.registry import download_model

        if args.dest or args.size != "124M":
            raise ScratchError("download: --size and --dest are for gpt2 only (registry models go to the cache)")
        folder = download_model(args.name, progress=not args.quiet)
        model, _ = load_model(folder)
        print(f"{args.name} ({model.num_params():,} parameters) is imported into {folder}")
        print(f"use it with: scratchllm generate --model {args.name} --chat 'Hello'")
        return 0
    from scratchllm.weights.download import download_gpt2

    dest = download_gpt2(args.size, args.dest, progress=not args.quiet)
    model, _ = load_model(dest)  # proves the files fit together (every key and shape checked)
    print(f"GPT-2 {args.size} ({model.num_params():,} parameters) is in {dest}")
    print(f"use it with: scratchllm generate --model {dest} --prompt 'Hello'")
    return 0


def export(args) -> int:
    """`scratchllm export --format hf`: a model to a Hugging Face folder (GPT-2, Llama or Qwen2)."""
    from scratchllm.weights.checkpoint import open_model
    from scratchllm.weights.hf import check_export_dir, export_hf

    if args.format != "hf":
        raise ScratchError(f"export: unknown format {args.format!r} (supported: hf)")
    check_export_dir(args.out, overwrite=args.overwrite)  # a bad --out fails before the model is read
    loaded = open_model(args.model)
    if loaded.tokenizer is None:
        raise ScratchError(f"{args.model}: no tokenizer/ folder; the HF export needs the model's tokenizer")
    out = export_hf(loaded.model, loaded.tokenizer, args.out, overwrite=args.overwrite, chat=loaded.chat)
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained and AutoTokenizer)")
    return 0
