"""Model state on disk: the rules that every writer and reader of model weights shares.

What it does, once for the whole package (model folders in checkpoint.py and hf.py, training
checkpoints in train/):
- names: `unwrap_key` / `unwrap_model` strip the `_orig_mod.` (torch.compile) and `module.` (DDP)
  wrappers; `tied_names` lists the parameters that alias an earlier one (a tied `lm_head.weight`),
  which are saved once, under the first name; `state_to_save` applies both to a state dict.
- loading: `load_state_dict_checked` copies weights into a model, or raises one ScratchError that
  lists every missing, unexpected and misshapen key; `read_safetensors_into` does the same from a
  safetensors file, reading each tensor straight into its parameter (no second copy of the weights); `empty_model` allocates a GPT to load into;
  `read_safetensors` reads a file with a clear error.
- integrity: `listed_files` reads the `files` table of a checkpoint's meta.json (size + sha256 of every
  file; an empty table is an error), `verify_files` checks files against it (sizes always; hashes
  once, then cached in `.verified.json` while the file stays untouched, when asked), `folder_digests`
  writes such a table.
- run folders: `write_latest` / `read_latest` / `resolve_latest` handle `RUN_DIR/latest`, the file
  that names the newest complete checkpoint folder.
What it does not do: choose file names inside a folder, write folders atomically, or hold any
training state (optimizer, RNG): checkpoint.py and train/checkpointing.py do those. It imports
only torch, safetensors and common.py, so any layer can import it without a cycle.

    state = state_to_save(compiled_model)       # unwrapped names, tied head left out
    load_state_dict_checked(model, state, "run/step_0000100/model.safetensors")
    folder = resolve_latest("runs/x", "config.json")   # runs/x/step_XXXXXXX
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from scratchllm.common import ScratchError, atomic_write_text, sha256_file

WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers
LATEST = "latest"  # RUN_DIR/latest holds the name of the newest complete checkpoint folder


# --------------------------------------------------------------------------------------------- names
def unwrap_key(key: str) -> str:
    """'module._orig_mod.transformer.wte.weight' -> 'transformer.wte.weight'."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside torch.compile (`_orig_mod`) and DDP (`module`) wrappers, however nested."""
    while True:
        for attr in ("_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, torch.nn.Module):
                model = inner
                break
        else:
            return model


def tied_names(model: torch.nn.Module) -> set[str]:
    """Unwrapped names of the parameters that alias an earlier-registered one: saved once, under the
    first name. For a GPT with tied embeddings: {'lm_head.weight'} (it is transformer.wte.weight)."""
    every = {unwrap_key(n) for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {unwrap_key(n) for n, _ in model.named_parameters()}


def state_to_save(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """`state` (default: model.state_dict()) with wrapper prefixes stripped and the aliases of
    `tied_names(model)` left out. Tensors are not copied or moved: writers do `.cpu().contiguous()`."""
    state = model.state_dict() if state is None else state
    drop = tied_names(model)
    out = {unwrap_key(k): v for k, v in state.items()}
    return {k: v for k, v in out.items() if k not in drop}


# --------------------------------------------------------------------------------------------- loading
def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, on the CPU; an unreadable file is a ScratchError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ScratchError(f"{path}: cannot read safetensors file ({e})") from None


def meta_model(config):
    """A GPT for `config` on the meta device (no memory), built without its random init (which on the
    meta device still costs ~1 s for GPT-2 124M: torch runs normal_'s decomposition per tensor)."""
    import dataclasses

    from scratchllm.model import GPT

    with torch.device("meta"):
        model = GPT(dataclasses.replace(config, init="torch"))
    model.config = config
    return model


def empty_model(config, device="cpu"):
    """A GPT for `config` with uninitialised weights (built on the meta device, so no time goes into
    random init), meant to be filled by load_state_dict_checked. A tied head is re-tied after
    allocation."""

    model = meta_model(config)
    model.to_empty(device=device)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    return model


def config_from_file(build: Callable[[], object], source: str):
    """`build()`, a ModelConfig made from the values of the file `source`, with every error naming that
    file: ModelConfig's own checks say 'model config: ...', and a value of the wrong type ("n_head":
    "four", "dropout": "x") fails inside them with a TypeError.

    >>> config_from_file(lambda: int("x"), "m/config.json")
    Traceback (most recent call last):
    scratchllm.common.ScratchError: m/config.json: a value of the wrong kind (invalid literal for int() with base 10: 'x')
    """
    try:
        return build()
    except ScratchError as e:
        msg = str(e)
        raise ScratchError(msg if msg.startswith(source) else f"{source}: {msg.removeprefix('model config: ')}") from None
    except (TypeError, ValueError) as e:
        raise ScratchError(f"{source}: a value of the wrong kind ({e})") from None


def listed(title: str, items: list[str], limit: int = 8) -> list[str]:
    """One line per item under a title line, cut after `limit` items.

    >>> listed("missing keys", ["a", "b", "c"], limit=2)
    ['  missing keys (3):', '    a', '    b', '    ... and 1 more']
    """
    more = [f"    ... and {len(items) - limit} more"] if len(items) > limit else []
    return [f"  {title} ({len(items)}):", *(f"    {item}" for item in items[:limit]), *more]


def _check_keys(inner: torch.nn.Module, shapes: dict[str, tuple], source: str,
                expected: Iterable[str] | None) -> set[str]:
    """The names to load from a state of {name: shape} (wrappers stripped, aliases dropped), or one
    ScratchError naming every missing, unexpected and misshapen key."""
    tied = tied_names(inner)
    want_shapes = {k: tuple(v.shape) for k, v in inner.state_dict().items() if k not in tied}
    want = set(want_shapes) if expected is None else {unwrap_key(k) for k in expected} - tied
    missing = sorted(want - set(shapes))
    unexpected = sorted(set(shapes) - want)
    misshapen = [f"{k}: checkpoint {shapes[k]} vs model {want_shapes[k]}"
                 for k in want_shapes if k in want and k in shapes and shapes[k] != want_shapes[k]]
    problems = [line for title, items in (("shape mismatch", misshapen), ("missing keys", missing),
                                          ("unexpected keys", unexpected)) if items for line in listed(title, items)]
    if problems:
        raise ScratchError("\n".join([f"{source}: weights do not fit the model config:", *problems]))
    return want


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                            expected: Iterable[str] | None = None) -> None:
    """Copy `state` into `model` (values cast to the model's dtype and device), or raise one
    ScratchError naming every missing, unexpected and misshapen key.

    Wrapper prefixes are stripped on both sides. Aliases (`tied_names`) are never required, and a
    copy stored by a writer that kept them is ignored. `expected`: the names that must be present
    (default: every tensor of the model's state dict but the aliases; a partial checkpoint passes
    its trainable names)."""
    inner = unwrap_model(model)
    tied = tied_names(inner)
    state = {unwrap_key(k): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in tied}
    _check_keys(inner, {k: tuple(v.shape) for k, v in state.items()}, source, expected)
    inner.load_state_dict(state, strict=False)


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file (8-byte little-endian header
    length, then that many bytes of JSON, then the tensor bytes), each entry checked against the file
    size; a damaged file is a ScratchError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            size = path.stat().st_size
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ScratchError(f"{path}: cannot read safetensors file ({e})") from None
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, e in header.items():
        ok = isinstance(e, dict) and isinstance(e.get("shape"), list) and isinstance(e.get("data_offsets"), list)
        start, end = e["data_offsets"] if ok and len(e["data_offsets"]) == 2 else (-1, -1)
        if not ok or not 0 <= start <= end <= data:
            raise ScratchError(f"{path}: tensor {name!r} lies outside the file (truncated or damaged)")
        e["start"] = 8 + n + start
    return header


def read_safetensors_into(model: torch.nn.Module, path: str | os.PathLike, source: str | None = None,
                          expected: Iterable[str] | None = None) -> None:
    """load_state_dict_checked(model, read_safetensors(path)), without a second copy of the weights:
    every tensor's bytes are read straight into the model's own parameter (cast through one temporary
    tensor when the file's dtype differs), so loading needs the model's memory and no more."""
    source = source or str(path)
    inner = unwrap_model(model)
    header = {unwrap_key(k): v for k, v in safetensors_header(path).items()}
    header = {k: v for k, v in header.items() if k not in tied_names(inner)}
    want = _check_keys(inner, {k: tuple(v["shape"]) for k, v in header.items()}, source, expected)
    params = inner.state_dict()  # tensors sharing the parameters' storage
    with open(path, "rb") as f, torch.no_grad():
        for name in sorted(want, key=lambda k: header[k]["start"]):
            e, target = header[name], params[name]
            dtype = SAFETENSORS_DTYPES.get(e["dtype"])
            if dtype is None:
                raise ScratchError(f"{source}: tensor {name!r} has dtype {e['dtype']}; model weights must be one of "
                                   f"{', '.join(SAFETENSORS_DTYPES)}")
            nbytes = e["data_offsets"][1] - e["data_offsets"][0]
            if nbytes != target.numel() * dtype.itemsize:
                raise ScratchError(f"{source}: tensor {name!r} holds {nbytes} bytes, not {target.numel()} "
                                   f"{e['dtype']} values (a damaged file)")
            f.seek(e["start"])
            direct = target.dtype == dtype and target.device.type == "cpu" and target.is_contiguous()
            buffer = target if direct else torch.empty(target.shape, dtype=dtype)
            if nbytes and f.readinto(memoryview(buffer.view(torch.uint8).numpy()).cast("B")) != nbytes:
                raise ScratchError(f"{source}: the file ends inside tensor {name!r} (truncated)")
            if not direct:
                target.copy_(buffer)


# --------------------------------------------------------------------------------------------- integrity
VERIFIED = ".verified.json"  # a folder's record of the sha256 checks that passed, keyed by file identity


def file_digest(path: str | os.PathLike) -> dict:
    """{'size': bytes, 'sha256': hex} of one file, the entry a meta.json `files` table holds for it."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def folder_digests(folder: str | os.PathLike) -> dict[str, dict]:
    """file_digest of every file under `folder`, by relative path: {'model.safetensors': {...}, ...}."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def listed_files(meta, meta_path: str | os.PathLike, hint: str = "") -> dict[str, dict]:
    """The `files` table of a parsed meta.json, checked: a non-empty {relative path: {'size', 'sha256'}}.

    An empty or missing table would switch the integrity check off without a word, so it is an error
    (`hint` is added to its message: what else the user may do)."""
    meta_path = Path(meta_path)
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not files:
        what = "empty" if files == {} else "missing" if files is None else f"a {type(files).__name__}"
        raise ScratchError(f"{meta_path}: its `files` table is {what}, so nothing in {meta_path.parent} can be "
                           "checked for corruption (scratchllm lists the size and sha256 of every file it saves). "
                           f"Restore {meta_path.name} from the original checkpoint{hint}")
    for rel, want in files.items():
        ok = isinstance(want, dict) and type(want.get("size")) is int and isinstance(want.get("sha256"), str)
        if not ok or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ScratchError(f"{meta_path}: `files` entry {rel!r} must name a file inside the folder with "
                               f'{{"size": BYTES, "sha256": HEX}}, got {want!r}')
    return files


def _identity(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: any write or copy gives a new mtime/ctime/inode."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _read_verified(folder: Path) -> dict:
    try:
        record = json.loads((folder / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def verify_files(folder: str | os.PathLike, files: dict[str, dict], meta_path: str | os.PathLike,
                 which: Callable[[str], bool] | None = None, cache: bool = False) -> None:
    """Check the files of a `listed_files` table (those `which(name)` selects; default: all): every size
    first (cheap), then every sha256. Raises one ScratchError naming the first file that is missing or
    differs.

    cache=True keeps the sha256 checks that passed in FOLDER/.verified.json, keyed by each file's device,
    inode, size, mtime and ctime: the next call hashes again only a file that was written, copied or
    replaced since (any of those changes the key). Sizes are always checked. A folder we cannot write to
    is simply hashed every time."""
    folder, meta_path = Path(folder), Path(meta_path)
    names = [rel for rel in files if which is None or which(rel)]
    hint = "re-copy it, or use an older step_* folder of the run"
    for rel in names:
        f, want = folder / rel, files[rel]["size"]
        if not f.is_file():
            raise ScratchError(f"corrupted checkpoint: {f} is missing (it is listed in {meta_path}); {hint}")
        if f.stat().st_size != want:
            raise ScratchError(f"corrupted checkpoint: {f} does not match its size in {meta_path} "
                               f"({f.stat().st_size} bytes, expected {want}); {hint}")
    known = _read_verified(folder) if cache else {}
    passed = {}
    for rel in names:
        f, want = folder / rel, files[rel]["sha256"].lower()
        before = _identity(f.stat())
        if known.get(rel) == {"id": before, "sha256": want}:
            continue
        if sha256_file(f) != want:
            raise ScratchError(f"corrupted checkpoint: {f} does not match its sha256 in {meta_path}; {hint}")
        if _identity(f.stat()) == before:  # not changed while we read it
            passed[rel] = {"id": before, "sha256": want}
    if cache and passed:
        try:
            atomic_write_text(folder / VERIFIED, json.dumps({**known, **passed}) + "\n")
        except OSError:  # a read-only folder: verify again next time
            pass


# --------------------------------------------------------------------------------------------- run folders
def write_latest(run_dir: str | os.PathLike, folder_name: str) -> None:
    """Point RUN_DIR/latest at RUN_DIR/folder_name (atomically: readers see the old or the new name)."""
    if not folder_name or Path(folder_name).name != folder_name:
        raise ValueError(f"latest must name a folder inside the run folder, got {folder_name!r}")
    atomic_write_text(Path(run_dir) / LATEST, folder_name + "\n")


def read_latest(run_dir: str | os.PathLike) -> str | None:
    """The folder name RUN_DIR/latest holds ('' when the file is empty), or None when there is none."""
    latest = Path(run_dir) / LATEST
    return latest.read_text().strip() if latest.is_file() else None


def resolve_latest(path: str | os.PathLike, marker: str) -> Path:
    """`path` itself when it holds the file `marker` (e.g. config.json, meta.json), else the folder
    its `latest` file names, which must hold `marker` too. Anything else is a ScratchError.

        resolve_latest("runs/x", "meta.json")                  # -> runs/x/step_0000100
        resolve_latest("runs/x/step_0000100", "meta.json")     # -> the same folder
    """
    path = Path(path)
    if (path / marker).is_file():
        return path
    name = read_latest(path)
    if name is None:
        raise ScratchError(f"{path}: no {marker} here and no `{LATEST}` file: neither a checkpoint (or model) "
                           "folder nor a run folder")
    target = path / name
    if not name or Path(name).name != name or not (target / marker).is_file():
        raise ScratchError(f"{path / LATEST} points to {name!r}, which is not a complete checkpoint folder "
                           f"(no {target / marker})")
    return target
