"""The dataset registry behind `scratchllm data list` and `scratchllm data get NAME [--dest DIR]`.

Each entry pins a canonical public URL (a fixed commit, so the bytes never change), its size and
sha256. Downloads go through scratchllm/io/download.py (resume, checksum, atomic rename,
`SCRATCHLLM_MIRROR`) into `cache_dir()/datasets/<file>`. Two entries are *derived* from what the URL serves, and their
saved file is checked against a second sha256:
  cp1252-to-utf8   four Gutenberg books stored in Windows-1252 at their URL, saved as UTF-8
  unzip:MEMBER     the UCI SMS Spam zip, from which only the `SMSSpamCollection` file is kept

Offline: SCRATCHLLM_MIRROR may be a folder laid out like the URL paths, or a folder laid out like
../shared/data (`<mirror>/<file>`, e.g. `gutenberg/pg84.txt`, already UTF-8/unzipped); both are
checked against the same sha256.

    $ scratchllm data list
    $ SCRATCHLLM_MIRROR=../shared/data scratchllm data get the-verdict --dest data/
"""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from scratchllm.common import ScratchError, atomic_write_bytes, check_can_create
from scratchllm.io.download import cache_dir, check_file, download, resolve_url

_RASBT = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/28c65cdfbc3338e2e040016eea4b7fdf556e4d57"
_TAHSAN = "https://raw.githubusercontent.com/Tahsan-Alam/Word-Ladder/0f3ccefd05fbf8b7c382f33aaaa0defe4ef1020c"
_CLOCASTO = "https://raw.githubusercontent.com/clocasto/HaikuGenerator/936af28fdf47e9a50abf52183a04959df01daf17"
_PD = "public domain"
_PG_PD = "public domain in the USA (Project Gutenberg)"


@dataclass(frozen=True)
class Dataset:
    name: str
    file: str  # saved as cache_dir()/datasets/<file>; also its path in a ../shared/data-style mirror
    url: str  # canonical public URL, pinned to a commit where the host allows it
    sha256: str | None  # of the bytes at `url` (None: the host's archive is not pinned; final_* is checked)
    size: int | None  # bytes at `url`
    description: str
    license: str
    transform: str | None = None  # None, "cp1252-to-utf8" or "unzip:MEMBER"
    final_sha256: str | None = None  # of the saved file when a transform applies
    final_size: int | None = None

    def __post_init__(self):
        if self.transform and not self.final_sha256:
            raise ValueError(f"dataset {self.name}: a transformed file needs final_sha256")

    @property
    def saved_sha256(self) -> str | None:
        return self.final_sha256 if self.transform else self.sha256

    @property
    def saved_size(self) -> int | None:
        return self.final_size if self.transform else self.size


def _tahsan(name, pg, title, sha, size, final_sha, final_size):
    return Dataset(name, f"gutenberg/pg{pg}.txt", f"{_TAHSAN}/pg{pg}.txt", sha, size,
                   f"{title} (PG #{pg}), full Project Gutenberg file incl. header/footer (use --strip-gutenberg)",
                   _PG_PD, "cp1252-to-utf8", final_sha, final_size)


def _clocasto(name, pg, title, sha, size):
    return Dataset(name, f"gutenberg/pg{pg}.txt", f"{_CLOCASTO}/pg{pg}.txt", sha, size,
                   f"{title} (PG #{pg}), body text only (no Gutenberg header/footer)", _PD)


DATASETS = {d.name: d for d in [
    Dataset("the-verdict", "the-verdict.txt", f"{_RASBT}/ch02/01_main-chapter-code/the-verdict.txt",
            "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", 20479,
            "Edith Wharton's short story, the book's chapter 2-5 corpus (5145 GPT-2 tokens)", _PD),
    Dataset("tinyshakespeare", "tinyshakespeare.txt",
            "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
            "data/tinyshakespeare/input.txt",
            "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1115394,
            "40,000 lines of Shakespeare (karpathy/char-rnn)", f"{_PD} text; repo README says MIT"),
    Dataset("sms-spam", "SMSSpamCollection.tsv",
            "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip", None, None,
            "UCI SMS Spam Collection v.1: 5574 lines `label<TAB>text` (the book's chapter 6)",
            "free with attribution (Almeida & Gomez Hidalgo, DocEng'11)", "unzip:SMSSpamCollection",
            "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d", 477907),
    Dataset("instruction-data", "instruction-data.json",
            f"{_RASBT}/ch07/01_main-chapter-code/instruction-data.json",
            "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944", 203524,
            "1100 Alpaca-style instruction/input/output records (the book's chapter 7)", "Apache-2.0"),
    Dataset("instruction-data-with-preference", "instruction-data-with-preference.json",
            f"{_RASBT}/ch07/04_preference-tuning-with-dpo/instruction-data-with-preference.json",
            "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e", 386968,
            "the same 1100 records with chosen/rejected answers for DPO", "Apache-2.0"),
    _tahsan("pride-and-prejudice", 1342, "Pride and Prejudice, Jane Austen",
            "f0247a0f5038e95d94fb4284ff9d24f07c812058536f6152115e1f9a92260517", 763063,
            "ab1a9c6496caa30d650ed44ba6524c4fe3246c3597f8667f471530e8b50fe1ee", 772447),
    _tahsan("moby-dick", 2701, "Moby Dick, Herman Melville",
            "eb1a1ca16369a025021459cf71bf5c4de1e05852bc1d83160c08484adffab73f", 1260489,
            "f6125467864249ec89fdb51f3bb816a99fe756641e7c447ad003794409f7ee19", 1276228),
    _tahsan("little-women", 37106, "Little Women, Louisa May Alcott",
            "c03045460dc11a7af801c62f291da69d61fdfc24e2371794504898cfb7617d88", 1113231,
            "6e2546c22d7babb6b903e2588f2f8fbdd1df237f9933b779db0a5f02cc1335f5", 1113470),
    _tahsan("frankenstein", 84, "Frankenstein, Mary W. Shelley",
            "4eaa0bd8cf407530e42d99ed95b61b9a4bb8492a3a9c0c9a41cd017bfed7bcd7", 446581,
            "2b15972876abe8250136d72038b770cffed69ea1f2f0e9c08123b2796f5b751e", 448964),
    _clocasto("alice-in-wonderland", 11, "Alice's Adventures in Wonderland, Lewis Carroll",
              "89a0ec3297622e5cadd32a68311c7d08a5948444274f21dd12d151672f2a0730", 147618),
    _clocasto("tale-of-two-cities", 98, "A Tale of Two Cities, Charles Dickens",
              "5d1ba49aa66841d2ef97f50f6ff172052fb8de4c442335c03dcce5c44de30419", 771136),
    _clocasto("dracula", 345, "Dracula, Bram Stoker",
              "e9a145c513b63acde80fbf65458431c22419b9302df21f43ff811d754699c3fe", 857413),
    _clocasto("sherlock-holmes", 1661, "The Adventures of Sherlock Holmes, A. Conan Doyle",
              "67475446cbaa516d8cd21d5569438c2c5450f763b7d5d17173cd3089c0cfc02d", 574438),
    _clocasto("dorian-gray", 174, "The Picture of Dorian Gray, Oscar Wilde",
              "0b2e2444e0d6cb698528cf69c4e876cfddd307afea798706e27556d3f1f59011", 442125),
    Dataset("tinystories-sample", "tinystories/tinystories_sample_2MiB.txt",
            "https://raw.githubusercontent.com/gusjengis/toy-RNN/40f1854472f2e06a5a6e68703750bfbe016b4c50/"
            "data/tinystories_sample.txt",
            "5352b299dcb1a32898b2d779b145b5a05f3e1265953fd21c264c9f9f9c9ae33d", 2097152,
            "first 2 MiB of TinyStories v1 train: 2316 stories split by <|endoftext|> (last one cut off)",
            "CDLA-Sharing-1.0 (R. Eldan, Y. Li); keep the attribution"),
    Dataset("tinystories-cs336", "tinystories/tinystories_sample_cs336.txt",
            "https://raw.githubusercontent.com/stanford-cs336/assignment1-basics/"
            "25a8a49f6460c83a30416d42348f2ef11d1dd185/tests/fixtures/tinystories_sample.txt",
            "defaedb58bf28079f3e29c6142cb7f3568d331a577e0911c5d7925c465c50c43", 3794,
            "5 TinyStoriesV2 stories, a fixture for BPE unit tests", "CDLA-Sharing-1.0; repo MIT"),
]}


def lookup(name: str) -> Dataset:
    if name not in DATASETS:
        raise ScratchError(f"unknown dataset {name!r}; `scratchllm data list` shows: {', '.join(DATASETS)}")
    return DATASETS[name]


def _apply(transform: str, raw: bytes, where: str) -> bytes:
    """cp1252 -> UTF-8, or extract one member of a zip archive."""
    if transform == "cp1252-to-utf8":
        return raw.decode("cp1252").encode("utf-8")
    member = transform.removeprefix("unzip:")
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ScratchError(f"{where}: cannot extract {member!r}: {e}") from None


def get(name: str, dest: str | os.PathLike | None = None, force: bool = False, progress: bool = True) -> Path:
    """Fetch dataset `name` into the cache (verified), copy it into `dest` when given; return its path."""
    ds = lookup(name)
    target = cache_dir() / "datasets" / ds.file
    mirror = os.environ.get("SCRATCHLLM_MIRROR", "").strip()
    flat = Path(mirror).expanduser() / ds.file if mirror and not mirror.startswith(("http:", "https:")) else None
    if not force and target.exists() and check_file(target, ds.saved_sha256, ds.saved_size) is None:
        pass
    elif flat is not None and not Path(resolve_url(ds.url)).exists() and flat.is_file():
        # a ../shared/data-style mirror holds the final file itself
        download(ds.url, target, ds.saved_sha256, ds.saved_size, progress, force=True, source=str(flat))
    elif ds.transform is None:
        download(ds.url, target, ds.sha256, ds.size, progress, force=force)
    else:
        raw = cache_dir() / "datasets" / ".raw" / Path(ds.url).name
        download(ds.url, raw, ds.sha256, ds.size, progress, force=force)
        data = _apply(ds.transform, raw.read_bytes(), ds.url)
        tmp = target.with_name(target.name + ".new")
        atomic_write_bytes(tmp, data)
        problem = check_file(tmp, ds.final_sha256, ds.final_size)
        if problem is not None:
            tmp.unlink()
            raw.unlink()  # its own checksum passed (or it has none): the next call fetches it again
            raise ScratchError(f"dataset {name}: the file derived from {ds.url} has {problem}; it was "
                               "not saved. The server or SCRATCHLLM_MIRROR holds a different file")
        os.replace(tmp, target)
    if dest is None:
        return target
    check_dest(dest)
    out = Path(dest) / Path(ds.file).name
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        shutil.copyfile(target, tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ScratchError(f"cannot copy {name} into --dest {dest}: {e.strerror or e}") from None
    return out


def check_dest(dest: str | os.PathLike) -> None:
    """--dest is a folder we can write into (it is created when missing)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ScratchError(f"--dest {dest} is a file, not a folder")
    check_can_create(dest / "x")


# --------------------------------------------------------------------------------------------- CLI
def _human(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def list_cmd(args) -> int:
    """`scratchllm data list`: two lines per dataset: name, size, cached?, description, license; then,
    indented, the first 12 hex digits of the saved file's sha256, the canonical URL and any transform."""
    width = max(map(len, DATASETS))
    for ds in DATASETS.values():
        target = cache_dir() / "datasets" / ds.file
        mark = "cached" if target.exists() else "      "
        print(f"{ds.name:<{width}}  {_human(ds.saved_size):>8}  {mark}  {ds.description}  [{ds.license}]")
        transform = f"  ({ds.transform})" if ds.transform else ""
        print(f"    sha256 {(ds.saved_sha256 or '?' * 12)[:12]}  {ds.url}{transform}")
    print(f"\nsha256: of the saved file (`scratchllm data get` checks all 64 digits)\n"
          f"cache: {cache_dir() / 'datasets'} (SCRATCHLLM_CACHE); mirror: "
          f"{os.environ.get('SCRATCHLLM_MIRROR') or 'none'} (SCRATCHLLM_MIRROR)")
    return 0


def get_cmd(args) -> int:
    """`scratchllm data get NAME... [--dest DIR] [--force]`: prints the path of each file."""
    names = list(DATASETS) if args.names == ["all"] else args.names
    for name in names:
        lookup(name)  # fail on a typo before downloading anything
    if args.dest is not None:
        check_dest(args.dest)  # and on a --dest that cannot be written
    for name in names:
        print(get(name, dest=args.dest, force=args.force, progress=not args.quiet))
    return 0
