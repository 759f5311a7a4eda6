"""Text <-> token ids: a byte-level BPE trainer, the Tokenizer, and GPT-2's tokenizer.

    >>> from scratchllm.tokenizer import train_bpe, load_tokenizer
    >>> tok = train_bpe(["some text ..."], vocab_size=300, special_tokens=["<|endoftext|>"])
    >>> gpt2 = load_tokenizer("gpt2")
"""

from pathlib import Path

from scratchllm.common import ScratchError
from scratchllm.tokenizer.base import PATTERNS
from scratchllm.tokenizer.bpe import train_bpe
from scratchllm.tokenizer.gpt2 import from_gpt2_files, from_tiktoken_file, gpt2_tokenizer
from scratchllm.tokenizer.tokenizer import Tokenizer

Tokenizer.from_gpt2_files = staticmethod(from_gpt2_files)
Tokenizer.from_tiktoken_file = staticmethod(from_tiktoken_file)
Tokenizer.gpt2 = staticmethod(gpt2_tokenizer)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """`"gpt2"` -> GPT-2's tokenizer; a folder -> `Tokenizer.load(folder)`; a `.tiktoken` file -> its ranks."""
    if str(spec) == "gpt2":
        return gpt2_tokenizer()
    path = Path(spec)
    if path.is_dir():
        return Tokenizer.load(path)
    if path.is_file() and path.suffix == ".tiktoken":
        return from_tiktoken_file(path)
    if path.name == "tokenizer.json" and path.is_file():
        raise ScratchError(f"tokenizer {str(spec)!r} is the file inside a tokenizer folder: give the folder "
                           f"{str(path.parent)!r} instead")
    if path.exists():
        raise ScratchError(f"tokenizer {str(spec)!r} is not a folder or a .tiktoken file: give a tokenizer folder "
                           "(from `scratchllm tokenizer train`), a .tiktoken ranks file, or `gpt2`")
    raise ScratchError(f"tokenizer {str(spec)!r} not found: give a tokenizer folder (from `scratchllm tokenizer "
                       "train`), a .tiktoken ranks file, or `gpt2`")


__all__ = ["PATTERNS", "Tokenizer", "load_tokenizer", "train_bpe", "from_gpt2_files", "from_tiktoken_file",
           "gpt2_tokenizer"]
