"""Reading JSON Lines files with errors that name the file and line.

What it does: `read_utf8(path)` reads a text file; `read_jsonl(path)` returns the value of every non-blank line as ("FILE:LINE", value);
a file that cannot be read as UTF-8 or a line that is not JSON raises ScratchError naming it. The
callers check the values' shapes (each knows its fields) and use the "FILE:LINE" in their own errors.
What it does not do: write JSONL, or stream files larger than memory.

    for where, obj in read_jsonl("responses.jsonl"):
        if not isinstance(obj, dict): raise ScratchError(f"{where}: expected an object")
"""

from __future__ import annotations

import json
from pathlib import Path

from scratchllm.common import ScratchError


def read_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file; a missing, unreadable or non-UTF-8 file is a ScratchError naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ScratchError(f"{path} is a folder, not a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScratchError(f"{path}: cannot read it as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None


def read_jsonl(path: str | Path) -> list[tuple[str, object]]:
    """[("FILE:LINE", parsed value)] of the file's non-blank lines, in order."""
    out = []
    for n, line in enumerate(read_utf8(path).splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ScratchError(f"{path}:{n}: not valid JSON ({e.msg}); each line holds one JSON value") from None
    return out
