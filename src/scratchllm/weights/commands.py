"""The command-line side of the model and its weights: `model info`, `download gpt2`, `export`.

What it does: turns parsed arguments into calls of model/info.py, weights/download.py and weights/hf.py
and prints the results. What it does not do: any of the math or the conversions themselves.

    scratchllm model info --preset gpt2 --batch 8 --block 1024
    scratchllm download gpt2 --size 124M --dest models/gpt2
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
    """The ModelConfig of a model folder, run folder or HF GPT-2 folder, without reading the weights."""
    from scratchllm.common import read_json
    from scratchllm.model.config import ModelConfig
    from scratchllm.weights.checkpoint import CONFIG, resolve_model_dir
    from scratchllm.weights.hf import config_from_hf
    from scratchllm.weights.state import config_from_file

    folder = resolve_model_dir(path)
    source = str(folder / CONFIG)
    d = read_json(source)
    if "model_type" in d or "n_positions" in d:
        return config_from_file(lambda: config_from_hf(d, source), source)
    return config_from_file(lambda: ModelConfig.from_dict(d, source=source), source)


def download(args) -> int:
    """`scratchllm download gpt2`: download, then check that the folder loads as a model."""
    from scratchllm.weights.download import download_gpt2
    from scratchllm.weights.hf import load_hf_gpt2

    dest = download_gpt2(args.size, args.dest, progress=not args.quiet)
    model = load_hf_gpt2(dest)  # proves the files fit together (every key and shape checked)
    print(f"GPT-2 {args.size} ({model.num_params():,} parameters) is in {dest}")
    print(f"use it with: scratchllm generate --model {dest} --prompt 'Hello'")
    return 0


def export(args) -> int:
    """`scratchllm export --format hf`: a model folder to a Hugging Face GPT-2 folder."""
    from scratchllm.weights.checkpoint import load_model
    from scratchllm.weights.hf import check_export_dir, export_hf

    if args.format != "hf":
        raise ScratchError(f"export: unknown format {args.format!r} (supported: hf)")
    check_export_dir(args.out, overwrite=args.overwrite)  # a bad --out fails before the model is read
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ScratchError(f"{args.model}: no tokenizer/ folder; the HF export needs the model's tokenizer")
    out = export_hf(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (load it with transformers.GPT2LMHeadModel.from_pretrained and AutoTokenizer)")
    return 0
