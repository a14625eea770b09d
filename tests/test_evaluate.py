"""Evaluate: metrics against scikit-learn and hand-checked values, calibration, and a planted mislabel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import cvpipe, write_params
from PIL import Image

from cvpipe.evaluate.metrics import calibration, classification_metrics

CLASSES = ["a", "b", "c"]
# 6 test images; rows are softmax outputs. argmax: a, b, b, c, c, a
TARGETS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([
    [0.7, 0.2, 0.1],   # a -> a  correct
    [0.3, 0.6, 0.1],   # a -> b  wrong, true class 2nd
    [0.1, 0.8, 0.1],   # b -> b  correct
    [0.1, 0.3, 0.6],   # b -> c  wrong, true class 2nd
    [0.2, 0.1, 0.7],   # c -> c  correct
    [0.5, 0.1, 0.4],   # c -> a  wrong, true class 2nd
])


def test_metrics_match_sklearn_and_hand_checked_values():
    m = classification_metrics(TARGETS, PROBS, CLASSES, top_k=2)
    # by hand: 3 of 6 right; every wrong row has the true class second -> top-2 = 6/6
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(1.0)
    # per class by hand: a: P=1/2 (pred a: rows 0,5), R=1/2 -> F1 .5; b: P=1/2, R=1/2; c: P=1/2, R=1/2
    for c in CLASSES:
        assert m["per_class"][c]["precision"] == pytest.approx(0.5)
        assert m["per_class"][c]["recall"] == pytest.approx(0.5)
        assert m["per_class"][c]["support"] == 2
    assert m["macro_f1"] == pytest.approx(0.5) and m["weighted_f1"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]

    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    preds = PROBS.argmax(1)
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_precision"] == pytest.approx(precision_score(TARGETS, preds, average=avg))
        assert m[f"{avg}_recall"] == pytest.approx(recall_score(TARGETS, preds, average=avg))
        assert m[f"{avg}_f1"] == pytest.approx(f1_score(TARGETS, preds, average=avg))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(TARGETS, PROBS, multi_class="ovr"))
    # hand: one-vs-rest AUC of class a: positives (.7,.3) vs negatives (.1,.1,.2,.5): 4/8 + 3/8 -> 7/8
    from sklearn.metrics import roc_auc_score as auc

    assert auc(TARGETS == 0, PROBS[:, 0]) == pytest.approx(7 / 8)


def test_metrics_with_an_absent_class_and_binary():
    m = classification_metrics(np.array([0, 0, 1]), PROBS[:3], CLASSES, top_k=5)
    assert m["roc_auc"] is None and "absent" in m["roc_auc_note"]
    assert m["top_k_accuracy"] is None  # k >= classes: always 1, not reported
    b = classification_metrics(np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.35, 0.65]]), ["x", "y"])
    # by hand: positives (.6, .7) vs negatives (.1, .65): 3 of 4 pairs ranked right
    assert b["roc_auc"] == pytest.approx(0.75) and b["accuracy"] == pytest.approx(0.75)


def test_ece_hand_checked():
    # 10 bins. Confidence .95: one right, one wrong -> |0.5 - 0.95| = .45 on half the data;
    # confidence .65: both right -> |1 - .65| = .35 on the other half. ECE = .225 + .175 = .4
    targets = np.array([0, 1, 0, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    cal = calibration(targets, probs, n_bins=10)
    assert cal["ece"] == pytest.approx(0.4)
    assert [(b["bin"], b["count"]) for b in cal["bins"]] == [(6, 2), (9, 2)]
    assert cal["bins"][1]["accuracy"] == pytest.approx(0.5) and cal["bins"][1]["confidence"] == pytest.approx(0.95)
    perfect = calibration(np.array([0, 0]), np.array([[1.0, 0.0], [1.0, 0.0]]), n_bins=10)
    assert perfect["ece"] == pytest.approx(0.0)


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """4 digit classes x 30 images at 32 px, timm's test_resnet trained for 8 epochs (AdamW, no EMA)."""
    from sklearn.datasets import load_digits

    monkeypatch.chdir(tmp_path)
    pp = os.environ.get("PYTHONPATH")
    if pp:
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(str(Path(p).resolve()) for p in pp.split(os.pathsep) if p))
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    digits = load_digits()
    for c in range(4):
        (tmp_path / "src" / str(c)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == c)[:30]:
            img = (255 - digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(tmp_path / "src" / str(c) / f"{i}.png")
    write_params(tmp_path, {"ingest.source": str(tmp_path / "src"), "ingest.workers": 1, "preprocess.workers": 1,
                            "train.arch": "test_resnet", "train.epochs": 8, "train.batch_size": 16, "train.lr": 0.005,
                            "train.optimizer": "adamw", "train.weight_decay": 0.05,
                            # no EMA: the test below asks for EMA weights of a checkpoint without them
                            "train.ema": False, "train.monitor": "val_acc", "evaluate.weights": "model",
                            "evaluate.latency_runs": 3, "evaluate.gallery_size": 4, "wandb.mode": "disabled"})
    for stage in ("ingest", "preprocess", "train"):
        cvpipe(stage, "-q", cwd=tmp_path)
    return tmp_path


@pytest.mark.slow
def test_planted_mislabel_shows_in_confusion_matrix_and_gallery(tiny_project):
    root = tiny_project
    cvpipe("evaluate", "-q", cwd=root)
    before = json.loads((root / "metrics/test_resnet/evaluate.json").read_text())
    # plant: the most confidently *right* test image gets the wrong label (its class + 1)
    import csv

    with open(root / "plots/test_resnet/predictions.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["correct"] == "1"]
    victim = max(rows, key=lambda r: float(r["confidence"]))
    row, true = int(victim["row"]), int(victim["actual"])
    labels_path = root / "data/prepared/test/labels.npy"
    labels = np.load(labels_path)
    assert labels[row] == true
    labels[row] = (true + 1) % 4
    np.save(labels_path, labels)

    cvpipe("evaluate", "-q", cwd=root)
    after = json.loads((root / "metrics/test_resnet/evaluate.json").read_text())
    cm0, cm1 = np.array(before["confusion_matrix"]), np.array(after["confusion_matrix"])
    diff = cm1 - cm0
    planted = (true + 1) % 4
    expected = np.zeros_like(diff)
    expected[true, true], expected[planted, true] = -1, 1  # one image moved from the diagonal to (planted, true)
    assert (diff == expected).all(), diff
    assert after["errors"] == before["errors"] + 1
    # it is the most confident mistake there is (it was the most confident right answer): first in the gallery
    first = after["most_confident_mistakes"][0]
    assert (first["row"], first["actual"], first["predicted"]) == (row, str(planted), str(true))
    png = Image.open(root / "plots/test_resnet/mistakes.png")
    assert png.format == "PNG" and png.size[0] >= 150
    # the rest of the report is there
    for key in ("top_k_accuracy", "macro_precision", "weighted_recall", "roc_auc", "ece"):
        assert after[key] is not None or key == "top_k_accuracy"
    assert after["cost"]["params"] > 0 and after["cost"]["flops"] > 0 and after["cost"]["latency_ms"] > 0
    assert max(after["export_parity"]["onnx_max_abs_diff"], after["export_parity"]["torchscript_max_abs_diff"]) <= 1e-4
    assert (root / "plots/test_resnet/reliability.png").exists() and (root / "plots/test_resnet/reliability.csv").exists()

    # EMA weights asked of a checkpoint without them: one line, exit 1
    proc = cvpipe("evaluate", "-q", "-S", "evaluate.weights=ema", cwd=root, check=False)
    assert proc.returncode == 1 and "no EMA weights" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    # flip TTA runs and is recorded
    cvpipe("evaluate", "-q", "-S", "evaluate.tta_flip=true", "-S", "evaluate.export=false", cwd=root)
    assert json.loads((root / "metrics/test_resnet/evaluate.json").read_text())["tta_flip"] is True
