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

HF_URL = "https://huggingface.co/{repo}/resolve/main/{file}"
GPT2_REPOS = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
              "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}
GPT2_FILES = ("config.json", "vocab.json", "merges.txt", "model.safetensors")
# (size, sha256) of files we could check. vocab.json and merges.txt are byte-identical to OpenAI's
# encoder.json / vocab.bpe (verified here against those files). The 124M config.json and
# model.safetensors values come from two independent public manifests of openai-community/gpt2
# (revision 607a30d7), not from a download on this machine. Larger sizes: no checksum known here, so
# the hub's published one is used (`published_checksum`); their weights are also checked key by key
# and shape by shape when loaded.
GPT2_CHECKS = {
    ("124M", "config.json"): (665, "0daed7749b4f02b8f76240d5444551d7b08712dab4d0adb8239c56ba823bb7b4"),
    ("124M", "model.safetensors"): (548105171, "248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707"),
    ("*", "vocab.json"): (1042301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    ("*", "merges.txt"): (456318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


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

    folder = resolve_model_dir(path)
    d = read_json(folder / CONFIG)
    if "model_type" in d or "n_positions" in d:
        return config_from_hf(d, str(folder / CONFIG))
    return ModelConfig.from_dict(d, source=str(folder / CONFIG))


def download_gpt2(size: str = "124M", dest: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch config.json, vocab.json, merges.txt and model.safetensors of an OpenAI GPT-2 from the
    Hugging Face hub's URL layout (through $SCRATCHLLM_MIRROR when set) into dest (default: the cache)."""
    from scratchllm.weights.download import cache_dir, download, published_checksum, resolve_url

    if size not in GPT2_REPOS:
        raise ScratchError(f"unknown GPT-2 size {size!r}: choose one of {', '.join(GPT2_REPOS)}")
    repo = GPT2_REPOS[size]
    dest = Path(dest).expanduser() if dest else cache_dir() / "models" / repo
    for name in GPT2_FILES:
        url = HF_URL.format(repo=repo, file=name)
        size_bytes, sha256 = GPT2_CHECKS.get((size, name)) or GPT2_CHECKS.get(("*", name)) or (None, None)
        if sha256 is None and not (dest / name).is_file():  # not known here: ask the hub for its sha256
            size_bytes, sha256 = published_checksum(resolve_url(url))
        download(url, dest / name, sha256=sha256, size=size_bytes, progress=progress)
    return dest


def download(args) -> int:
    """`scratchllm download gpt2`: download, then check that the folder loads as a model."""
    from scratchllm.weights.hf import load_hf_gpt2

    dest = download_gpt2(args.size, args.dest, progress=not args.quiet)
    model = load_hf_gpt2(dest)  # proves the files fit together (every key and shape checked)
    print(f"GPT-2 {args.size} ({model.num_params():,} parameters) is in {dest}")
    print(f"use it with: scratchllm generate --model {dest} --prompt 'Hello'")
    return 0


def export(args) -> int:
    """`scratchllm export --format hf`: a model folder to a Hugging Face GPT-2 folder."""
    from scratchllm.weights.checkpoint import load_model
    from scratchllm.weights.hf import export_hf

    if args.format != "hf":
        raise ScratchError(f"export: unknown format {args.format!r} (supported: hf)")
    model, tokenizer = load_model(args.model)
    if tokenizer is None:
        raise ScratchError(f"{args.model}: no tokenizer/ folder; the HF export needs the model's tokenizer")
    out = export_hf(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {out} (load it with transformers.GPT2LMHeadModel.from_pretrained and AutoTokenizer)")
    return 0
