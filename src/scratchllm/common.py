"""Small shared pieces every stage uses: the ignore index, user-facing errors, device/dtype choice,
seeding, rank-0 printing, atomic folder writes and progress reporting.

Nothing here imports torch at module load, so the tokenizer and the CLI's `--help` stay light.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

IGNORE_INDEX = -100  # targets with this value contribute nothing to the loss


class ScratchError(Exception):
    """An error caused by the user's input (a bad file, flag or config).

    The CLI prints its message as `error: ...` and exits with status 2, without a traceback, so the
    message must say what is wrong and where (file, line, field) and, where possible, how to fix it.
    """


def env_flag(name: str) -> bool:
    """True when the environment variable is set to a truthy value ("1", "true", "yes")."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------
# distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only (every rank prints when not launched by torchrun). A closed stdout
    (`scratchllm pretrain ... | head -1`) silences further output instead of ending the work."""
    if is_rank0():
        safe_print(*args, **kwargs)


def safe_print(*args, file=None, **kwargs) -> bool:
    """print() that survives a reader that went away: after a BrokenPipeError the stream (sys.stdout or
    sys.stderr) is replaced by /dev/null, so long work (training, preparing data) goes on and finishes
    normally. Returns False when the stream was closed."""
    stream = file or sys.stdout
    try:
        print(*args, file=stream, **kwargs, flush=True)
        return True
    except BrokenPipeError:
        for name in ("stdout", "stderr"):
            if getattr(sys, name) is stream:  # also stops Python's "Exception ignored" at exit
                setattr(sys, name, open(os.devnull, "w"))
        return False


# ---------------------------------------------------------------------------------------------
# devices, dtypes, seeds


def select_device(name: str = "auto") -> str:
    """'auto' -> 'cuda' > 'mps' > 'cpu'; anything else is returned after a check that it exists."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScratchError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ScratchError("--device mps: MPS is not available on this machine (use --device cpu)")
    if name != "cpu" and not name.startswith(("cuda", "mps")):
        raise ScratchError(f"unknown device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return name


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (avx2, avx512_bf16, amx_bf16, ...) from /proc/cpuinfo; None where it
    cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {word for line in text.splitlines() if line.startswith("flags") for word in line.split(":", 1)[-1].split()}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AMX or AVX512-BF16), read from /proc/cpuinfo."""
    return bool((cpu_flags() or set()) & {"amx_bf16", "avx512_bf16"})


def select_precision(precision: str, device: str) -> str:
    """Resolve 'auto' to 'bf16' where the hardware has fast bf16 (CUDA Ampere+, AMX/AVX512-BF16 CPUs),
    else 'fp32'. 'fp16' is only allowed on CUDA (it needs a grad scaler)."""
    import torch

    if precision not in {"auto", "fp32", "bf16", "fp16"}:
        raise ScratchError(f"unknown precision {precision!r}: expected auto, fp32, bf16 or fp16")
    if precision == "fp16" and not device.startswith("cuda"):
        raise ScratchError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# files


@contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `final`; on success rename it to `final`.

    If the body raises (or is interrupted), the temporary folder is removed and `final` is untouched,
    so a reader never sees a half-written folder. With overwrite=True an existing `final` is replaced
    only after the new one is complete.

        with atomic_dir("out/tok") as tmp:
            (tmp / "a.txt").write_text("hi")
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise ScratchError(f"{final} already exists (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        # mkdtemp makes 0700 and some writers (safetensors) 0600: what we create follows the umask
        mask = _UMASK
        for p in [tmp, *tmp.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | os.PathLike) -> dict:
    """Parse a JSON file holding one object; an unreadable file, bad JSON or another kind of value
    raises ScratchError naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ScratchError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScratchError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ScratchError(f"{path}: expected a JSON object {{...}}, got a {type(obj).__name__}")
    return obj


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back (at import:
    os.umask(mask)  # no other thread runs yet, so none can create a file while it is 0)
    return mask


_UMASK = _read_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file + fsync + rename: readers see old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a file we create follows the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (constant memory): the one file hash that
    downloads, checkpoints and data sources use.

        sha256_file("empty.txt")  # -> 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_can_create(path: str | os.PathLike) -> None:
    """Before long work: make sure `path` can be created, i.e. the folder above it exists (it is made)
    and is writable, so that a bad output path fails at once and not after the work is done."""
    parent = Path(os.path.abspath(path)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScratchError(f"cannot create {path}: making {parent} failed ({e.strerror or e})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ScratchError(f"cannot create {path}: {parent} is not writable (permission denied); choose another path")


def holds_marker(entries, markers) -> bool:
    """True when one of the entry names matches one of the glob `markers` (what marks a folder as ours)."""
    import fnmatch

    return any(fnmatch.fnmatchcase(name, m) for name in entries for m in markers)


def some_entries(entries: list[str], limit: int = 5) -> str:
    """'a, b, c and 4 more': the first few names of a folder, for a message."""
    return ", ".join(entries[:limit]) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def clear_for_overwrite(path: str | os.PathLike, markers, what: str, *, by: str = "--overwrite",
                        delete: bool = True) -> bool:
    """The one `--overwrite` rule: an existing `path` may be replaced only when it is an empty folder or
    holds one of `markers` (glob patterns of entry names that only our own folders hold), so that no
    flag ever deletes a folder of someone else's files. Returns False when `path` does not exist, True
    when it may be replaced: with `delete` it is gone when this returns; with delete=False it is only
    checked (for callers that check before long work and replace it atomically later: `atomic_dir`).
    Anything else raises ScratchError naming up to 5 of its entries: a folder of other files, a file,
    a symbolic link, or the current folder or one above it. `by` names who would delete, for the message.

        clear_for_overwrite("shards", ["index.json"], "shard folder")   # shards/index.json: deleted
        clear_for_overwrite("docs", ["index.json"], "shard folder")     # ScratchError: it holds a.md, ...
    """
    path = Path(path)
    if path.is_symlink():
        raise ScratchError(f"{path} is a symbolic link; {by} replaces only a real folder, so it is refused: "
                           "give the folder it points to, or another path")
    if not path.exists():
        return False
    if not path.is_dir():
        raise ScratchError(f"{path} is a file, not a {what}; {by} replaces only a {what}, so it is refused: "
                           "choose another path or remove the file yourself")
    here, target = Path(os.path.realpath(Path.cwd())), Path(os.path.realpath(path))
    if target == here or target in here.parents:
        raise ScratchError(f"{path} is the current folder{'' if target == here else ' or holds it'}; {by} "
                           "would delete the folder you are working in, so it is refused: give a subfolder")
    try:
        entries = sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise ScratchError(f"cannot list {path}: {e.strerror or e}") from None
    if entries and not holds_marker(entries, markers):
        raise ScratchError(f"{path} is not a {what} of ours (it holds {some_entries(entries)}); {by} would delete "
                           "those files, so it is refused: choose another path or empty the folder yourself")
    if delete:
        try:
            shutil.rmtree(path)
        except OSError as e:
            raise ScratchError(f"cannot delete {path} to replace it: {e.strerror or e}") from None
    return True


# ---------------------------------------------------------------------------------------------
# progress


class Progress:
    """A minimal progress line for long loops: done/total, rate, ETA and any extra fields.

    Prints to stderr at most every `every` seconds on a terminal, and at most every `log_every`
    seconds when the stream is not a terminal (a log file, a pipe, CI: a 6-minute run writes ~36
    lines there, not one a second), plus a final line at close; on rank 0 only, and silent when
    `enabled` is False. `tqdm` is used where a real bar helps; this one is for loops whose unit is
    not an iteration (merges, tokens).

        p = Progress(total=1000, unit="merges")
        for i in range(1000):
            p.update(1, loss=0.5)
        p.close()
    """

    def __init__(self, total: int | None, unit: str = "it", desc: str = "", every: float = 1.0,
                 enabled: bool = True, stream=None, log_every: float = 10.0):
        self.total, self.unit, self.desc = total, unit, desc
        self.enabled = enabled and is_rank0()
        self.stream = stream or sys.stderr
        try:
            tty = self.stream.isatty()
        except (AttributeError, ValueError):  # no isatty, or a closed stream
            tty = False
        self.every = every if tty else max(every, log_every)
        self.done = 0
        self.printed = False
        self.start = self.last = time.perf_counter()
        self.fields: dict = {}

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            self._print()

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [self.desc] if self.desc else []
        parts.append(f"{self.done}/{self.total}" if self.total else f"{self.done}")
        parts.append(f"{rate:,.1f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.done) / rate)}")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.fields.items()]
        return " | ".join(parts)

    def _print(self) -> None:
        self.printed = True
        if not safe_print(self.line(), file=self.stream):
            self.enabled = False  # nobody reads this stream any more

    def close(self) -> None:
        """Print the final line, if the loop ran long enough to have printed progress at all."""
        if self.enabled and self.printed:
            self._print()


def format_seconds(s: float) -> str:
    """3725 -> '1h02m05s', 65 -> '1m05s', 4.2 -> '4s'."""
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{sec:02d}s"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"
