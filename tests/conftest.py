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
