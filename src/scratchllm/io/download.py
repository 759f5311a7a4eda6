"""HTTP(S) downloads that survive bad networks: resume, verify, rename atomically, work offline.

`download(url, dest, sha256=..., size=...)` streams the body to `dest.part`, resumes a partial
`.part` with an HTTP Range request (after a dropped connection, within the same call or a later one),
retries a busy or failing server (HTTP 429 and 5xx, honouring a Retry-After in seconds), checks the
size and sha256, and only then renames `.part` to `dest`. A file that fails its checksum
is never renamed into place: an existing good `dest` is kept and the error names the URL.

Offline machines set `SCRATCHLLM_MIRROR` to a folder or a base URL that replaces the scheme and host
of every canonical URL, keeping its path (see `resolve_url`). Files land under `cache_dir()`
(`$SCRATCHLLM_CACHE`, default `~/.cache/scratchllm`) unless the caller picks another `dest`.

What it does not do: know any dataset or model. data/registry.py (datasets) and weights/download.py
(GPT-2's files on the Hugging Face hub) sit above it; it imports nothing of scratchllm but common.py.

    >>> from scratchllm.io.download import cache_dir, download
    >>> download("https://example.org/a.txt", cache_dir() / "a.txt", sha256="ab12...")  # doctest: +SKIP
"""

from __future__ import annotations

import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from scratchllm.common import ScratchError, is_rank0, sha256_file

CHUNK = 1 << 16  # bytes per read
USER_AGENT = "scratchllm-downloader/0.1"
MAX_WAIT = 30.0  # seconds: the longest Retry-After we wait for between two attempts


def _backoff(attempt: int, retry_after: str | None) -> float:
    """Seconds to wait before the next attempt: the server's Retry-After when it is a number of
    seconds (capped at MAX_WAIT), else exponential backoff from 0.2 s.

    >>> _backoff(0, None), _backoff(2, None), _backoff(0, "3"), _backoff(0, "Wed, 21 Oct 2015 07:28:00 GMT")
    (0.2, 0.8, 3.0, 0.2)
    """
    if retry_after is not None and retry_after.strip().isdigit():
        return min(float(retry_after.strip()), MAX_WAIT)
    return min(0.2 * 2**attempt, 5.0)


def cache_dir() -> Path:
    """`$SCRATCHLLM_CACHE`, or `~/.cache/scratchllm` when it is unset or empty."""
    return Path(os.environ.get("SCRATCHLLM_CACHE") or "~/.cache/scratchllm").expanduser()


def resolve_url(url: str) -> str:
    """Apply `$SCRATCHLLM_MIRROR` to a canonical URL: keep the URL's path, replace scheme + host.

    With SCRATCHLLM_MIRROR=http://127.0.0.1:8000/m (a base URL):
        https://host.org/a/b.txt -> http://127.0.0.1:8000/m/a/b.txt
    With SCRATCHLLM_MIRROR=/srv/mirror (a folder; the result is a local path):
        https://host.org/a/b.txt -> /srv/mirror/a/b.txt
    Without a mirror the URL is returned unchanged.
    """
    mirror = os.environ.get("SCRATCHLLM_MIRROR", "").strip()
    if not mirror:
        return url
    parts = urlsplit(url)
    path = parts.path.lstrip("/")
    if mirror.startswith(("http://", "https://", "file://")):
        query = f"?{parts.query}" if parts.query else ""
        return f"{mirror.rstrip('/')}/{path}{query}"
    return str(Path(mirror).expanduser() / unquote(path))


def check_file(path: Path, sha256: str | None, size: int | None) -> str | None:
    """None when `path` has the expected size and sha256 (unchecked when None), else the reason."""
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        return f"size {actual_size} bytes, expected {size}"
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256.lower():
            return f"sha256 {actual}, expected {sha256.lower()}"
    return None


def _bar(total: int | None, start: int, desc: str, enabled: bool):
    """A tqdm byte bar on stderr (rate + ETA), or None when progress is off or not rank 0."""
    if not (enabled and is_rank0()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, file=sys.stderr, leave=False, mininterval=0.5)


def _fetch_once(source: str, part: Path, size: int | None, progress: bool, timeout: float) -> None:
    """Append the rest of `source` to `part` (one attempt; raises OSError/HTTPException on failure)."""
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have >= size:  # nothing left to fetch; check_file decides
        if have > size:
            part.unlink()
            have = 0
        else:
            return
    if not source.startswith(("http://", "https://")):  # a mirror folder or a file:// URL
        local = Path(unquote(urlsplit(source).path)) if source.startswith("file://") else Path(source)
        if not local.is_file():
            raise FileNotFoundError(f"mirror file {local} does not exist")
        with open(local, "rb") as src, open(part, "ab") as out:
            src.seek(have)
            while chunk := src.read(CHUNK):
                out.write(chunk)
        return
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(source, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our part already holds the whole file (or garbage): restart
            part.unlink()
            raise ConnectionError("server refused the range request; restarting from byte 0") from None
        raise
    with resp:
        resumed = resp.status == 206
        if resumed and not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise ConnectionError(f"server answered Range: bytes={have}- with Content-Range "
                                  f"{resp.headers.get('Content-Range')!r}")
        if have and not resumed:  # the server ignored Range: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else size
        bar = _bar(total, have, Path(part.name).stem[:40], progress)
        try:
            with open(part, "ab" if resumed else "wb") as out:
                got = 0
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    got += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            if length is not None and got < int(length):
                raise http.client.IncompleteRead(b"", int(length) - got)
        finally:
            if bar is not None:
                bar.close()


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, size: int | None = None,
             progress: bool = True, retries: int = 3, timeout: float = 30.0, force: bool = False,
             source: str | None = None) -> Path:
    """Download `url` (through the mirror, if any) to `dest`; return `dest`.

    - An existing `dest` that passes the checks (size/sha256 when given) is returned as is, without
      network access, unless `force`.
    - The body goes to `dest.part`; a dropped connection is retried `retries` times, each retry
      resuming with `Range: bytes=N-`. A `.part` left by an earlier, interrupted call is resumed too.
    - HTTP 429 and 5xx answers are retried the same way (after the server's Retry-After, when it
      gives one in seconds); other HTTP errors (404, 403, ...) fail at once.
    - Size and sha256 are checked before the atomic rename. On a mismatch the `.part` is deleted,
      any existing `dest` is left untouched, and ScratchError names the URL and both hashes.
    - `source` (a URL or a local path) replaces `resolve_url(url)` as the place to fetch from.
    """
    dest = Path(dest)
    source = source or resolve_url(url)
    via = f" (via mirror {source})" if source != url else ""
    if dest.is_dir():
        raise ScratchError(f"cannot download {url} to {dest}: that is a folder (remove it or choose another place)")
    if dest.exists() and not force and check_file(dest, sha256, size) is None:
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder should be, no permission, ...
        raise ScratchError(f"cannot download {url}: cannot create the folder {dest.parent} "
                           f"({e.strerror or e})") from None
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            _fetch_once(source, part, size, progress, timeout)
            last_error = None
            break
        except FileNotFoundError as e:
            raise ScratchError(f"cannot download {url}: {e} (check SCRATCHLLM_MIRROR)") from None
        except (PermissionError, IsADirectoryError, NotADirectoryError) as e:  # local: retrying cannot help
            raise ScratchError(f"cannot download {url}{via}: {e.filename}: {e.strerror}") from None
        except urllib.error.HTTPError as e:
            if not (e.code == 429 or 500 <= e.code <= 599):  # not busy or failing: final
                raise ScratchError(f"cannot download {url}{via}: HTTP {e.code} {e.reason}") from None
            if attempt == retries:
                raise ScratchError(f"cannot download {url}{via}: HTTP {e.code} {e.reason} on all {retries + 1} "
                                   "attempts; the server is busy or failing, try again later") from None
            time.sleep(_backoff(attempt, e.headers.get("Retry-After") if e.headers else None))
        except (OSError, http.client.HTTPException) as e:  # dropped connection, timeout, DNS, ...
            last_error = e
            if attempt < retries:
                time.sleep(_backoff(attempt, None))
    if last_error is not None:
        kept = part.stat().st_size if part.is_file() else 0
        if kept:
            left = f"{kept} bytes kept in {part}, run again to resume"
        else:  # nothing arrived (offline, DNS, refused): no .part to speak of
            if part.is_file():
                part.unlink()
            left = ("nothing was downloaded; check the network connection, or set SCRATCHLLM_MIRROR to a "
                    "local mirror folder or URL")
        raise ScratchError(f"cannot download {url}{via} after {retries + 1} attempts: "
                           f"{type(last_error).__name__}: {last_error}; {left}") from None
    problem = check_file(part, sha256, size)
    if problem is not None:
        part.unlink(missing_ok=True)
        kept = f"; the existing {dest} was kept" if dest.exists() else ""
        raise ScratchError(f"download of {url}{via} failed its check: {problem}. The file was not "
                           f"saved{kept}. The server or mirror may hold a corrupted or changed file.")
    os.replace(part, dest)
    return dest
