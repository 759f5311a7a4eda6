"""A toy classification stage on the Trainer, for the stage-contract tests: a frozen tiny LM backbone,
a low-rank adapter and a new head train; the objective reports accuracy.

The task: is the last token of a random sequence in the lower half of the vocabulary? A head on the
last hidden state learns it in a few dozen steps, so accuracy rises, saturates and early stopping
has something to do. `python classify_helpers.py OUT --global-batch 8 ...` runs it as a script (one
process, or one rank under torchrun) for the DDP test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from trainer_helpers import VOCAB, TinyLM

BLOCK = 6


class Adapter(nn.Module):
    """x -> x + B(A(x)), B zero-initialised: a fresh adapter changes nothing."""

    def __init__(self, d: int, r: int = 2):
        super().__init__()
        self.A = nn.Linear(d, r, bias=False)
        self.B = nn.Linear(r, d, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x):
        return x + self.B(self.A(x))


class TinyClassifier(nn.Module):
    """Frozen TinyLM backbone -> adapter -> Linear head on the last position."""

    def __init__(self, backbone: TinyLM, n_classes: int = 2):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        d = backbone.wte.weight.shape[1]
        self.adapter = Adapter(d)
        self.head = nn.Linear(d, n_classes)

    def hidden_states(self, idx):
        b = self.backbone
        h = b.wte(idx) + b.wpe(torch.arange(idx.size(1), device=idx.device))
        h = h + torch.tanh(b.fc(b.ln(h)))
        return self.adapter(h)  # (B, T, d)

    def classify(self, idx):
        return self.head(self.hidden_states(idx)[:, -1])  # (B, n_classes)


def classification_objective(model, batch):
    """Cross-entropy summed over the batch; accuracy is summed correct predictions (reported per count)."""
    x, labels = batch
    logits = model.classify(x)  # through the Trainer's wrapper: DDP syncs the head's gradients
    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
    return loss, {"count": labels.numel(), "accuracy": (logits.argmax(-1) == labels).sum()}


def labelled(g: torch.Generator, n: int):
    x = torch.randint(0, VOCAB, (n, BLOCK), generator=g)
    return x, (x[:, -1] < VOCAB // 2).long()


class Batches:
    """Batch k of the global stream is a pure function of (seed, k); rank r of W takes its rows r::W,
    so W processes with batch B/W see exactly one process's batch B."""

    def __init__(self, global_batch: int = 8, seed: int = 0, rank: int = 0, world: int = 1):
        self.global_batch, self.seed, self.rank, self.world, self.k = global_batch, seed, rank, world, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.k)
        self.k += 1
        x, y = labelled(g, self.global_batch)
        return x[self.rank::self.world], y[self.rank::self.world]

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, d):
        self.k = d["k"]


def val_set(n_batches: int = 4, batch: int = 8):
    g = torch.Generator().manual_seed(424242)
    data = [labelled(g, batch) for _ in range(n_batches)]
    return lambda: iter(data)


def base_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(d=48)


def classifier(base_seed: int = 0, seed: int = 1) -> TinyClassifier:
    backbone = base_model(base_seed)
    torch.manual_seed(seed)
    return TinyClassifier(backbone)


def main(argv=None):
    """One rank of a classification run (or a single process): writes OUT/metrics.jsonl and checkpoints."""
    import argparse

    import torch.distributed as dist

    from scratchllm.configs import TrainConfig
    from scratchllm.train import stage
    from scratchllm.train.core import Trainer, init_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--max-steps", type=int, default=6)
    a = ap.parse_args(argv)
    cfg = TrainConfig(max_steps=a.max_steps, lr=3e-2, warmup_steps=0, schedule="constant", eval_every=2,
                      checkpoint_every=0, best_metric="accuracy", best_mode="max", precision="fp32",
                      device="cpu", compile="off")
    init_distributed("cpu")  # under torchrun: the process group, so the batches know their rank
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    t = Trainer(classifier(), cfg, classification_objective, Batches(a.global_batch, rank=rank, world=world),
                out_dir=a.out, val_batches=val_set(), save="trainable")
    stage.finish(t.fit())


if __name__ == "__main__":
    main()
