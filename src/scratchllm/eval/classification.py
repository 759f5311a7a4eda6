"""Classification metrics from predicted and true class ids: what a classifier's eval reports.

What it does: `confusion_matrix` and `classification_metrics` (n, accuracy, per-class precision /
recall / F1 / support, macro F1; 0.0 where a ratio is undefined, like sklearn's zero_division=0);
`confusion_table` and `metrics_table` render them as text (the latter a Markdown pipe table, so it
also goes into report.md); `plot_confusion` writes a PNG; `most_confident_errors` picks the wrong
predictions the model was surest of, the first rows to read when debugging data or labels.
What it does not do: run a model, choose a threshold, or average other than macro (micro F1 is the
accuracy for single-label classes). Inputs are plain ids 0..K-1; label names only name them.

    m = classification_metrics([0, 1, 1], [0, 1, 0], ["neg", "pos"])
    print(metrics_table(m)); print(confusion_table(m["confusion"], m["labels"]))
    plot_confusion(m["confusion"], m["labels"], run / "confusion.png", title="val")
"""

from __future__ import annotations

import operator
from pathlib import Path

from scratchllm.common import ScratchError


def _ids(values, num_classes: int, name: str) -> list[int]:
    """Class ids as python ints, checked to lie in 0..num_classes-1: `_ids([1, 0], 2, "y_true") -> [1, 0]`."""
    values = values.tolist() if hasattr(values, "tolist") else list(values)  # numpy / torch -> list
    out = []
    for i, v in enumerate(values):
        try:
            v = operator.index(v)  # int, numpy int; not float, not str
        except TypeError:
            raise ScratchError(f"{name}[{i}] = {v!r} is not an integer class id") from None
        if not 0 <= v < num_classes:
            raise ScratchError(f"{name}[{i}] = {v} is out of range: class ids are 0..{num_classes - 1}")
        out.append(v)
    return out


def confusion_matrix(y_true, y_pred, num_classes: int) -> list[list[int]]:
    """Counts with rows = true class, columns = predicted class.

        confusion_matrix([0, 0, 1], [0, 1, 1], 2)  # -> [[1, 1], [0, 1]]
    """
    if num_classes < 1:
        raise ScratchError(f"num_classes must be >= 1, got {num_classes}")
    t, p = _ids(y_true, num_classes, "y_true"), _ids(y_pred, num_classes, "y_pred")
    if not t:
        raise ScratchError("no items to evaluate: y_true and y_pred are empty")
    if len(t) != len(p):
        raise ScratchError(f"y_true has {len(t)} items but y_pred has {len(p)}")
    cm = [[0] * num_classes for _ in range(num_classes)]
    for a, b in zip(t, p):
        cm[a][b] += 1
    return cm


def _ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is 0 (sklearn's zero_division=0): `_ratio(1, 0) -> 0.0`."""
    return num / den if den else 0.0


def classification_metrics(y_true, y_pred, labels: list[str]) -> dict:
    """n, accuracy, macro F1 (the mean over all K labels, absent ones included), per-class
    precision / recall / F1 / support, the confusion matrix and the labels.

    Worked example, 10 items, labels ["neg", "pos"]: 6 neg (4 predicted neg, 2 pos) and 4 pos
    (1 predicted neg, 3 pos) -> confusion [[4, 2], [1, 3]], accuracy (4+3)/10 = 0.7;
    neg: precision 4/(4+1) = 0.8, recall 4/6 = 0.667, F1 = 2*4/(2*4+1+2) = 8/11 = 0.727;
    pos: precision 3/(3+2) = 0.6, recall 3/4 = 0.75, F1 = 2*3/(2*3+2+1) = 2/3;
    macro F1 = (8/11 + 2/3) / 2 = 23/33 = 0.697.
    """
    labels = [str(x) for x in labels]
    if len(set(labels)) != len(labels):
        raise ScratchError(f"label names must be unique, got {labels}")
    cm = confusion_matrix(y_true, y_pred, len(labels))
    n = sum(map(sum, cm))
    per_class = {}
    for k, name in enumerate(labels):
        tp, support, predicted = cm[k][k], sum(cm[k]), sum(row[k] for row in cm)
        per_class[name] = {"precision": _ratio(tp, predicted), "recall": _ratio(tp, support),
                           "f1": _ratio(2 * tp, predicted + support), "support": support}
    return {"n": n, "accuracy": sum(cm[k][k] for k in range(len(labels))) / n,
            "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
            "per_class": per_class, "confusion": cm, "labels": labels}


def _check_square(confusion, labels) -> list[list[int]]:
    """The confusion matrix as lists of ints, checked to be K x K for K labels."""
    cm = [[int(v) for v in row] for row in confusion]
    if len(cm) != len(labels) or any(len(row) != len(labels) for row in cm):
        raise ScratchError(f"confusion must be {len(labels)} x {len(labels)} for labels {list(labels)}, "
                           f"got rows of lengths {[len(row) for row in cm]}")
    return cm


def confusion_table(confusion, labels) -> str:
    """Plain-text confusion matrix with row and column totals:

        confusion_table([[4, 2], [1, 3]], ["neg", "pos"]) ->
        true \\ pred | neg pos | total
        ------------+---------+------
        neg         |   4   2 |     6
        pos         |   1   3 |     4
        ------------+---------+------
        total       |   5   5 |    10
    """
    cm = _check_square(confusion, labels)
    labels = [str(x) for x in labels]
    col_tot = [sum(row[j] for row in cm) for j in range(len(labels))]
    grand = sum(col_tot)
    w0 = max(len("true \\ pred"), len("total"), *map(len, labels))
    ws = [max(len(name), len(str(t))) for name, t in zip(labels, col_tot)]
    wt = max(len("total"), len(str(grand)))

    def line(head: str, cells: list[str], total: str) -> str:
        return f"{head:<{w0}} | " + " ".join(f"{c:>{w}}" for c, w in zip(cells, ws)) + f" | {total:>{wt}}"

    rule = "-" * (w0 + 1) + "+" + "-" * (sum(ws) + len(ws) + 1) + "+" + "-" * (wt + 1)
    rows = [line(name, [str(v) for v in row], str(sum(row))) for name, row in zip(labels, cm)]
    return "\n".join([line("true \\ pred", labels, "total"), rule, *rows, rule,
                      line("total", [str(t) for t in col_tot], str(grand))])


def metrics_table(metrics: dict) -> str:
    """Per-class precision / recall / F1 / support as a Markdown pipe table, then accuracy and macro F1:

        | label | precision | recall |     f1 | support |
        |:------|----------:|-------:|-------:|--------:|
        | neg   |    0.8000 | 0.6667 | 0.7273 |       6 |
        ...
        - accuracy: 0.7000 (n = 10)
        - macro F1: 0.6970
    """
    head = ["label", "precision", "recall", "f1", "support"]
    rows = [[name.replace("|", "\\|"), f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}",
             str(c["support"])] for name, c in metrics["per_class"].items()]
    ws = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(f"{c:<{w}}" if j == 0 else f"{c:>{w}}"
                                 for j, (c, w) in enumerate(zip(cells, ws))) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if j == 0 else ("-" * (w + 1) + ":") for j, w in enumerate(ws)) + "|"
    return "\n".join([line(head), rule, *map(line, rows), "",
                      f"- accuracy: {metrics['accuracy']:.4f} (n = {metrics['n']})",
                      f"- macro F1: {metrics['macro_f1']:.4f}"])


def plot_confusion(confusion, labels, png_path: str | Path, title: str = "") -> None:
    """A PNG heat map: each cell shows its count, coloured by its share of the true row (so a rare
    class's errors are as visible as a frequent one's); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scratchllm.train.runlog import save_png

    cm = _check_square(confusion, labels)
    labels = [str(x) for x in labels]
    frac = [[_ratio(v, sum(row)) for v in row] for row in cm]  # (K, K) row-normalised, 0 for empty rows
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.2, size), dpi=110)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if frac[i][j] > 0.5 else "black")
    slant = len(labels) > 4  # long rows of names overlap unless slanted
    ax.set_xticks(range(len(labels)), labels, rotation=45 if slant else 0, ha="right" if slant else "center")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true row")
    save_png(fig, png_path)


def most_confident_errors(probs, y_true, k: int) -> list[tuple[int, int, float]]:
    """(row, predicted class, its probability) of the k wrong rows with the highest predicted
    probability, highest first; ties keep row order. The prediction is the argmax (lowest id on ties).

        most_confident_errors([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]], [1, 1, 0], k=5)
        # -> [(0, 0, 0.9), (2, 1, 0.7)]
    """
    import numpy as np

    if hasattr(probs, "detach"):  # torch tensor on any device / dtype
        probs = probs.detach().float().cpu().numpy()
    p = np.asarray(probs, dtype=np.float64)  # (N, K)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ScratchError(f"probs must be a non-empty (N, K) array, got shape {p.shape}")
    if k < 0:
        raise ScratchError(f"k must be >= 0, got {k}")
    t = _ids(y_true, p.shape[1], "y_true")
    if len(t) != p.shape[0]:
        raise ScratchError(f"probs has {p.shape[0]} rows but y_true has {len(t)} items")
    pred = p.argmax(axis=1)  # (N,)
    conf = p[np.arange(len(t)), pred]  # (N,)
    wrong = [i for i in range(len(t)) if pred[i] != t[i]]
    wrong.sort(key=lambda i: -conf[i])  # stable: equal probabilities keep row order
    return [(i, int(pred[i]), float(conf[i])) for i in wrong[:k]]
