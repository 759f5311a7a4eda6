"""Preference pairs tokenized for the stages that compare two answers (train/reward.py, train/dpo.py).

What it does: `EncodedPairs(pairs, fmt, tokenizer, max_length, pad_id)` renders every pair's prompt +
chosen answer and prompt + rejected answer in a chat format with SFT's masks (train/sft.encode: 1 on
the answer and its end-of-turn token; assistant turns inside the prompt get 0), cuts each to
max_length tokens from the right (counting the answers that lose a scored token) and skips, counting, a pair whose answers leave no token within max_length.
`collate(indices)` is data/collate.collate_pairs plus, when `ref` holds precomputed reference
log-probs (N, 2), their "ref" rows (B, 2) (chosen, rejected).
What it does not do: read files (data/preferences.py) or score anything (the stages' objectives).

    enc = EncodedPairs(read_pairs(spec).pairs, fmt, tokenizer, 512, tokenizer.pad_id)
    batch = enc.collate([0, 1, 2])     # idx (6, T): 3 chosen rows, then 3 rejected rows
"""

from __future__ import annotations

import torch


def last_run(mask: list[int]) -> list[int]:
    """The mask with only its last run of 1s kept.

    >>> last_run([1, 1, 0, 0, 1, 1, 0])
    [0, 0, 0, 0, 1, 1, 0]
    """
    end = max((i for i, m in enumerate(mask) if m), default=-1) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [1 if start <= i < end else 0 for i in range(len(mask))]


class EncodedPairs:
    def __init__(self, pairs, fmt, tokenizer, max_length: int, pad_id: int):
        from scratchllm.train.sft import encode

        self.rows, self.pairs = [], []
        self.cut = self.skipped = self.tokens = 0
        for pair in pairs:
            row = []
            for answer in (pair.chosen, pair.rejected):
                ids, mask = encode(pair.conversation(answer), fmt, tokenizer)
                mask = last_run(mask)  # the answer only, not earlier assistant turns of the prompt
                if len(ids) > max_length:
                    self.cut += any(mask[max_length:])
                    ids, mask = ids[:max_length], mask[:max_length]
                row += [ids, mask]
            if not any(row[1][1:]) or not any(row[3][1:]):  # an answer with no token left to score
                self.skipped += 1
                continue
            self.rows.append(tuple(row))
            self.pairs.append(pair)
            self.tokens += len(row[0]) + len(row[2])
        self.pad_id = pad_id
        self.ref: torch.Tensor | None = None  # (N, 2) reference log-probs, when precomputed

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int]) -> dict:
        from scratchllm.data.collate import collate_pairs

        batch = collate_pairs([self.rows[i] for i in indices], self.pad_id)
        if self.ref is not None:
            batch["ref"] = self.ref[indices]  # (B, 2)
        return batch

    def summary(self, max_length: int) -> str:
        s = f"{len(self.rows)} pairs, {self.tokens:,} tokens"
        if self.cut:
            s += f"; {self.cut} answers cut at --max-length {max_length}"
        if self.skipped:
            s += f"; {self.skipped} pairs skipped (an answer with no token within --max-length {max_length})"
        return s
