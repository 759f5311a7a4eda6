"""GPT-2's files on the Hugging Face hub: which files, where, their checksums, and the download.

What it does: `download_gpt2(size, dest)` fetches config.json, vocab.json, merges.txt and
model.safetensors of an OpenAI GPT-2 (124M ... 1558M) from the hub's URL layout (through
`$SCRATCHLLM_MIRROR` when set) and checks each file's size and sha256: the ones pinned in
`GPT2_CHECKS`, else the ones the hub publishes for its LFS files (`published_checksum`).
What it does not do: the HTTP work itself (resume, retries, checksum, atomic rename, mirror, cache
folder: scratchllm/io/download.py, shared with the dataset registry) or loading the files (hf.py).

    >>> dest = download_gpt2("124M")          # doctest: +SKIP
    >>> model = load_hf_gpt2(dest)            # doctest: +SKIP
"""

from __future__ import annotations

import http.client
import urllib.error
import urllib.request
from pathlib import Path

from scratchllm.common import ScratchError
from scratchllm.io.download import USER_AGENT, cache_dir, download, resolve_url

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


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):  # keep the 3xx answer: its headers are what we want
        return None


def published_checksum(url: str, timeout: float = 30.0) -> tuple[int | None, str | None]:
    """(size, sha256) that a Hugging Face hub publishes for a large (LFS) file: a HEAD request to its
    `resolve` URL, redirect not followed, answers with `X-Linked-Size` and `X-Linked-Etag` (the file's
    sha256). (None, None) when the server gives no such headers (a plain mirror, a small file) or
    cannot be asked (a mirror folder, a network error: the download itself will report that).

    >>> published_checksum("/a/mirror/folder/model.safetensors")
    (None, None)
    """
    if not url.startswith(("http://", "https://")):
        return None, None
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        resp = urllib.request.build_opener(_NoRedirect).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:  # a 3xx that was not followed arrives as an HTTPError
        resp = e
    except (OSError, http.client.HTTPException):
        return None, None
    with resp:
        sha = (resp.headers.get("X-Linked-Etag") or "").strip().removeprefix("W/").strip('"').lower()
        size = (resp.headers.get("X-Linked-Size") or "").strip()
    sha_ok = len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
    return (int(size) if size.isdigit() else None), (sha if sha_ok else None)


def download_gpt2(size: str = "124M", dest: str | Path | None = None, progress: bool = True) -> Path:
    """Fetch config.json, vocab.json, merges.txt and model.safetensors of an OpenAI GPT-2 from the
    Hugging Face hub's URL layout (through $SCRATCHLLM_MIRROR when set) into dest (default: the cache)."""
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
