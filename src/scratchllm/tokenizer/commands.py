"""The `scratchllm tokenizer ...` subcommands: train, encode, decode, stats.

Each function takes the parsed argparse namespace from cli.py and prints its result.

    scratchllm tokenizer train --input book.txt --vocab-size 4096 --out tok/
    scratchllm tokenizer encode --tokenizer tok/ "Hello world" --pieces
    scratchllm tokenizer stats --tokenizer tok/ --file book.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from scratchllm.common import ScratchError, check_can_create, clear_for_overwrite
from scratchllm.tokenizer import load_tokenizer, train_bpe
from scratchllm.tokenizer.bpe import merges_for_vocab
from scratchllm.tokenizer.tokenizer import FOLDER_MARKERS, Tokenizer, check_special_tokens

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".py", ".tsv", ".csv", ".json", ".jsonl", ".html"}


def not_a_file(path: Path) -> str:
    """Why an input path that is not a regular file cannot be read, as a phrase.

    >>> not_a_file(Path("/dev/zero"))
    'is not a regular file (a device, FIFO or socket), so it cannot be read as text'
    """
    if path.is_symlink() and not path.exists():
        return "is a broken symbolic link (what it points to does not exist)"
    if path.is_dir():
        return "is a folder, not a file"
    if path.exists():
        return "is not a regular file (a device, FIFO or socket), so it cannot be read as text"
    return "does not exist"


def read_text_file(path: Path, errors: str = "strict") -> str:
    """Read UTF-8 text; invalid bytes raise a ScratchError naming the file and byte offset."""
    if not path.is_file():  # /dev/zero would fill memory, a FIFO block forever
        raise ScratchError(f"{path} {not_a_file(path)}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScratchError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ScratchError(f"{path}: invalid UTF-8 at byte offset {e.start} ({data[e.start:e.start + 4]!r}); "
                           "fix the file or pass --errors replace") from None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded recursively to their text files, in sorted order."""
    paths = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise ScratchError(f"folder {p} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            raise ScratchError(f"input {item!r} {not_a_file(p)}")
    return paths


def train(args) -> int:
    out = Path(args.out)
    merges_for_vocab(args.vocab_size, len(check_special_tokens(args.special)), "--vocab-size")
    if out.exists() and not args.overwrite:  # say so before training, not after
        raise ScratchError(f"{out} already exists: choose another --out or pass --overwrite")
    if args.overwrite:  # only an empty folder or a tokenizer folder, checked again when saving
        clear_for_overwrite(out, FOLDER_MARKERS, "tokenizer folder", delete=False)
    check_can_create(out)
    paths = expand_inputs(args.input)
    texts = [read_text_file(p, args.errors) for p in paths]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    print(f"training a {args.vocab_size}-token BPE ({args.pattern} pattern) on {len(paths)} file(s), "
          f"{n_bytes / 1e6:.2f} MB", file=sys.stderr)
    start = time.perf_counter()
    tok = train_bpe(texts, args.vocab_size, special_tokens=args.special, pattern=args.pattern,
                    progress=not args.quiet, name=Path(args.out).name)
    tok.save(args.out, overwrite=args.overwrite)
    print(f"saved {tok.vocab_size}-token tokenizer to {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def _encode_cli(tok: Tokenizer, text: str, allow: bool) -> list[int]:
    if not allow:
        found = [s for s in tok.special_tokens if s in text]
        if found:
            raise ScratchError(f"the text contains the special token {found[0]!r}; pass --allow-special to "
                               "encode it as one token")
    return tok.encode(text, allowed_special="all")


def encode(args) -> int:
    tok = load_tokenizer(args.tokenizer)
    text = read_text_file(Path(args.file), args.errors) if args.file else args.text
    ids = _encode_cli(tok, text, args.allow_special)
    if args.pieces:
        for i in ids:
            print(f"{i}\t{tok.token_bytes(i).decode('utf-8', errors='backslashreplace')!r}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def decode(args) -> int:
    tok = load_tokenizer(args.tokenizer)
    sys.stdout.write(tok.decode(args.ids))
    sys.stdout.write("\n")
    return 0


def measure(tok: Tokenizer, text: str) -> dict:
    """Compression of `tok` on `text`: tokens, bytes per token, tokens per whitespace-separated word."""
    n_tokens = len(tok.encode_ordinary(text))
    n_bytes, n_words = len(text.encode("utf-8")), len(text.split())
    return {"tokens": n_tokens, "bytes_per_token": n_bytes / max(n_tokens, 1),
            "tokens_per_word": n_tokens / max(n_words, 1)}


def stats(args) -> int:
    tok = load_tokenizer(args.tokenizer)
    text = "\n".join(read_text_file(Path(f), args.errors) for f in args.file)
    rows = [(f"{tok.name} ({tok.vocab_size})", measure(tok, text))]
    if str(args.tokenizer) != "gpt2":
        try:
            gpt2 = load_tokenizer("gpt2")
            rows.append((f"gpt2 ({gpt2.vocab_size})", measure(gpt2, text)))
        except ScratchError as e:
            print(f"note: GPT-2 not available for comparison: {e}", file=sys.stderr)
    print_stats(rows, len(text.encode("utf-8")), len(text.split()))
    return 0


def print_stats(rows: list[tuple[str, dict]], n_bytes: int, n_words: int) -> None:
    print(f"text: {n_bytes:,} bytes, {n_words:,} words")
    print(f"{'tokenizer':<28}{'tokens':>12}{'bytes/token':>14}{'tokens/word':>14}")
    for name, m in rows:
        print(f"{name:<28}{m['tokens']:>12,}{m['bytes_per_token']:>14.3f}{m['tokens_per_word']:>14.3f}")
