"""scratchllm.eval.classification: confusion matrix, per-class precision / recall / F1, accuracy and
macro F1 equal sklearn's (zero_division=0) on seeded random cases and edge cases (a class never
predicted, a class absent from y_true, perfect predictions) and match a hand-worked 10-item example;
the text tables put counts and totals in the right rows; the PNG is a PNG; most_confident_errors picks
the surest wrong rows in order, ties by row; bad inputs raise ScratchError."""

import random

import numpy as np
import pytest
import torch

from scratchllm.common import ScratchError
from scratchllm.eval.classification import (
    classification_metrics,
    confusion_matrix,
    confusion_table,
    metrics_table,
    most_confident_errors,
    plot_confusion,
)


@pytest.fixture(scope="module")
def skm():
    return pytest.importorskip("sklearn.metrics")  # test-only reference


def assert_equals_sklearn(skm, y_true, y_pred, K):
    labels = [f"c{k}" for k in range(K)]
    m = classification_metrics(y_true, y_pred, labels)
    ks = list(range(K))
    assert m["confusion"] == skm.confusion_matrix(y_true, y_pred, labels=ks).tolist()
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y_true, y_pred, labels=ks, zero_division=0)
    for k, name in enumerate(labels):
        c = m["per_class"][name]
        assert c["precision"] == pytest.approx(prec[k]) and c["recall"] == pytest.approx(rec[k])
        assert c["f1"] == pytest.approx(f1[k]) and c["support"] == sup[k]
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    macro = skm.f1_score(y_true, y_pred, labels=ks, average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(macro)
    assert m["n"] == len(y_true) and m["labels"] == labels
    assert set(m) == {"n", "accuracy", "macro_f1", "per_class", "confusion", "labels"}
    return m


@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_equal_sklearn(skm, K, seed):
    rng = random.Random(seed)
    y_true = [rng.randrange(K) for _ in range(200)]
    y_pred = [t if rng.random() < 0.6 else rng.randrange(K) for t in y_true]  # better than chance
    assert_equals_sklearn(skm, y_true, y_pred, K)


def test_edge_cases_equal_sklearn(skm):
    # class 2 is never predicted (precision undefined -> 0)
    assert_equals_sklearn(skm, [0, 1, 2, 2, 1], [0, 1, 0, 1, 1], 3)
    # class 3 is absent from y_true but predicted once; class 4 neither occurs nor is predicted
    m = assert_equals_sklearn(skm, [0, 1, 2, 0, 1], [0, 1, 2, 3, 1], 5)
    assert m["per_class"]["c4"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 1 + 0 + 0) / 5)  # absent labels count as 0
    # perfect predictions
    m = assert_equals_sklearn(skm, [0, 1, 2, 1], [0, 1, 2, 1], 3)
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0


def test_hand_worked_example():
    # the docstring example: 6 neg (4 right, 2 -> pos), 4 pos (1 -> neg, 3 right)
    y_true = [0] * 6 + [1] * 4
    y_pred = [0, 0, 0, 0, 1, 1] + [0, 1, 1, 1]
    m = classification_metrics(y_true, y_pred, ["neg", "pos"])
    assert m["confusion"] == [[4, 2], [1, 3]] and m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["per_class"]["neg"] == pytest.approx({"precision": 0.8, "recall": 4 / 6, "f1": 8 / 11, "support": 6})
    assert m["per_class"]["pos"] == pytest.approx({"precision": 0.6, "recall": 0.75, "f1": 2 / 3, "support": 4})
    assert m["macro_f1"] == pytest.approx(23 / 33)


def test_accepts_numpy_and_torch_ids():
    ref = confusion_matrix([0, 1, 1], [0, 1, 0], 2)
    assert confusion_matrix(np.array([0, 1, 1]), torch.tensor([0, 1, 0]), 2) == ref == [[1, 0], [1, 1]]


@pytest.mark.parametrize("y_true, y_pred, match", [
    ([], [], "empty"),
    ([0, 1], [0], "2 items but y_pred has 1"),
    ([0, 3], [0, 1], r"y_true\[1\] = 3 is out of range"),
    ([0, 1], [0, -1], r"y_pred\[1\] = -1 is out of range"),
    ([0, 1.0], [0, 1], "not an integer"),
])
def test_bad_inputs_raise(y_true, y_pred, match):
    with pytest.raises(ScratchError, match=match):
        classification_metrics(y_true, y_pred, ["a", "b", "c"])


def test_bad_labels_and_shapes_raise():
    with pytest.raises(ScratchError, match="unique"):
        classification_metrics([0], [0], ["a", "a"])
    with pytest.raises(ScratchError, match="num_classes"):
        classification_metrics([0], [0], [])
    with pytest.raises(ScratchError, match="2 x 2"):
        confusion_table([[1, 2, 3], [4, 5, 6]], ["a", "b"])


def test_confusion_table_rows_and_totals():
    text = confusion_table([[4, 2], [1, 3]], ["neg", "pos"])
    lines = text.splitlines()
    assert lines[0].split() == ["true", "\\", "pred", "|", "neg", "pos", "|", "total"]
    rows = {ln.split()[0]: ln.replace("|", " ").split()[1:] for ln in lines if not ln.startswith("-")}
    assert rows["neg"] == ["4", "2", "6"] and rows["pos"] == ["1", "3", "4"]
    assert rows["total"] == ["5", "5", "10"]
    assert len({len(ln) for ln in lines}) == 1  # every line equally wide: columns line up
    assert lines[2].index("4") < lines[2].index("2")  # right-aligned under the headers
    assert lines[2].rindex("6") == lines[0].rindex("l")  # totals end under "total"


def test_metrics_table_content():
    m = classification_metrics([0] * 6 + [1] * 4, [0, 0, 0, 0, 1, 1, 0, 1, 1, 1], ["neg", "pos"])
    text = metrics_table(m)
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["label", "precision", "recall", "f1", "support"]
    assert set(lines[1]) <= set("|:-")  # the Markdown separator row
    assert [c.strip() for c in lines[2].strip("|").split("|")] == ["neg", "0.8000", "0.6667", "0.7273", "6"]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["pos", "0.6000", "0.7500", "0.6667", "4"]
    assert "accuracy: 0.7000 (n = 10)" in text and "macro F1: 0.6970" in text


def test_plot_confusion_writes_png(tmp_path):
    png = tmp_path / "sub" / "confusion.png"
    plot_confusion([[4, 2], [0, 0]], ["neg", "pos"], png, title="val")  # an empty row must not divide by 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # the figure was closed


def test_most_confident_errors_order_and_ties():
    probs = [
        [0.9, 0.1, 0.0],  # row 0: predicts 0, true 0 -> right, skipped however confident
        [0.2, 0.7, 0.1],  # row 1: predicts 1 (0.7), true 0 -> error
        [0.1, 0.1, 0.8],  # row 2: predicts 2 (0.8), true 1 -> error
        [0.3, 0.0, 0.7],  # row 3: predicts 2 (0.7), true 0 -> error, ties with row 1
        [0.5, 0.4, 0.1],  # row 4: predicts 0 (0.5), true 2 -> error
    ]
    y_true = [0, 0, 1, 0, 2]
    expected = [(2, 2, 0.8), (1, 1, 0.7), (3, 2, 0.7), (4, 0, 0.5)]
    got = most_confident_errors(probs, y_true, k=10)  # k above the number of errors: all of them
    assert [(i, c) for i, c, _ in got] == [(i, c) for i, c, _ in expected]
    assert [p for *_, p in got] == pytest.approx([p for *_, p in expected])
    assert all(type(i) is int and type(c) is int and type(p) is float for i, c, p in got)
    assert most_confident_errors(np.array(probs), y_true, k=2) == got[:2]
    from_torch = most_confident_errors(torch.tensor(probs), torch.tensor(y_true), k=3)  # float32
    assert [(i, c) for i, c, _ in from_torch] == [(i, c) for i, c, _ in got[:3]]
    assert [p for *_, p in from_torch] == pytest.approx([p for *_, p in got[:3]])
    assert most_confident_errors(probs, y_true, k=0) == []
    assert most_confident_errors(probs, [0, 1, 2, 2, 0], k=5) == []  # every row right


def test_most_confident_errors_bad_inputs():
    with pytest.raises(ScratchError, match="3 rows but y_true has 2"):
        most_confident_errors([[1.0, 0.0]] * 3, [0, 1], k=1)
    with pytest.raises(ScratchError, match=r"\(N, K\)"):
        most_confident_errors([0.5, 0.5], [0], k=1)
    with pytest.raises(ScratchError, match="k must be"):
        most_confident_errors([[1.0, 0.0]], [0], k=-1)
