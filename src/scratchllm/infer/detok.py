"""Incremental detokenization: token ids in, text deltas out, stop strings honoured.

What it does: `Detokenizer.push(token_id)` returns the new text that is now certain. Bytes that end
inside a UTF-8 character wait for the token that completes it, so a delta never holds half a character;
bytes that can never become valid UTF-8 come out as U+FFFD. With stop strings, text that could be the
start of a stop string is held back until it is known not to be one, so a stop string spanning several
tokens is found and never shown; the text before it is. `finish()` flushes what was held back.
What it does not do: run the model or choose tokens (see engine.py).

    >>> detok = Detokenizer(tok, stop=["\\n\\n"])
    >>> for t in ids:
    ...     print(detok.push(t), end="")
    ...     if detok.stopped:
    ...         break
    >>> print(detok.finish())
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from scratchllm.common import ScratchError


def held_back_length(text: str, stops: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string: the part
    that must wait because the next tokens may complete a stop string.

    >>> held_back_length("Hello wor", ["world"])
    3
    >>> held_back_length("Hello", ["world"])
    0
    """
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def find_stop(text: str, stops: Iterable[str]) -> tuple[int, str] | None:
    """(index, stop string) of the earliest stop string in text, or None.

    >>> find_stop("a.b\\n\\nc", ["\\n\\n", "."])
    (1, '.')
    """
    found = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    return min(found) if found else None


class Detokenizer:
    def __init__(self, tokenizer, stop: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stop]
        if any(not isinstance(s, str) or not s for s in self.stops):
            raise ScratchError(f"stop strings must be non-empty strings, got {self.stops!r}")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded text not yet returned (it may start a stop string)
        self.text = ""  # all text returned so far
        self.stopped = False  # a stop string was found; nothing more will be returned
        self.stop_string: str | None = None  # which one

    def push(self, token_id: int) -> str:
        """Add one token; return the text delta that is now final ("" when nothing is)."""
        if self.stopped:
            return ""
        return self._release(self._decoder.decode(self.tokenizer.token_bytes(int(token_id)), final=False))

    def finish(self) -> str:
        """No more tokens: return everything held back (an unfinished UTF-8 character becomes U+FFFD)."""
        if self.stopped:
            return ""
        delta = self._release(self._decoder.decode(b"", final=True))
        if not self.stopped:
            rest, self._pending = self._pending, ""
            self.text += rest
            delta += rest
        return delta

    def _release(self, new_text: str) -> str:
        self._pending += new_text
        hit = find_stop(self._pending, self.stops)
        if hit is not None:
            delta, self._pending = self._pending[:hit[0]], ""
            self.stopped, self.stop_string = True, hit[1]
        else:
            keep = held_back_length(self._pending, self.stops)
            cut = len(self._pending) - keep
            delta, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += delta
        return delta
