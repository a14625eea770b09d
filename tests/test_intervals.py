"""Intervals of evaluate's metrics: measured coverage of the accuracy interval, and the vectorised bootstrap
metrics against scikit-learn on explicit resamples."""

from __future__ import annotations

import numpy as np
import pytest

from cvpipe.evaluate import intervals
from cvpipe.evaluate.metrics import calibration, classification_metrics


def test_accuracy_interval_covers_the_true_accuracy_at_the_nominal_rate():
    """A synthetic classifier with true accuracy 0.8 scored on 300 test images, 2,000 seeded draws: the 95 %
    Wilson interval covers 0.8 in 94.0 % of them (the issue asks for 93-97 %). Its exact coverage there, summed
    over the binomial distribution, is 94.9 % (Clopper-Pearson's: 95.7 %, conservative as it is built to be)."""
    rng = np.random.default_rng(18)
    draws, n, p = 2000, 300, 0.8
    covered = 0
    for _ in range(draws):
        correct = rng.random(n) < p  # per-image correctness of the synthetic classifier
        low, high = intervals.wilson_interval(int(correct.sum()), n, 0.95)
        covered += low <= p <= high
    coverage = covered / draws
    assert 0.93 <= coverage <= 0.97, coverage
    from scipy.stats import binom

    exact = sum(binom.pmf(k, n, p) for k in range(n + 1) if intervals.wilson_interval(k, n, 0.95)[0] <= p <= intervals.wilson_interval(k, n, 0.95)[1])
    assert exact == pytest.approx(0.949, abs=0.001)


def test_wilson_matches_scipy_and_handles_extremes():
    from scipy.stats import binomtest

    ci = binomtest(240, 300).proportion_ci(0.95, method="wilson")
    assert intervals.wilson_interval(240, 300, 0.95) == pytest.approx((ci.low, ci.high))
    low, high = intervals.wilson_interval(300, 300, 0.95)
    assert high == pytest.approx(1.0) and 0.98 < low < 1.0  # a perfect score still gets a lower bound below 1
    assert np.isnan(intervals.wilson_interval(0, 0, 0.95)[0])


def _synthetic(n=120, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(classes), n // classes)
    logits = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[targets]
    logits[:5] = np.round(logits[:5])  # a few tied scores for the AUC tie rule
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return targets, probs


@pytest.mark.parametrize("classes", [2, 4])
def test_weighted_metrics_equal_sklearn_on_the_explicit_resample(classes):
    """Each bootstrap value is the metric of the resampled test set: recompute three resamples by
    materialising them and scoring with scikit-learn / the stage's own metric functions."""
    targets, probs = _synthetic(classes=classes)
    (w,) = list(intervals.stratified_weights(targets, 3, seed=7))
    assert w.shape == (3, len(targets))
    for c in range(classes):  # stratified: every class keeps its count in every resample
        assert (w[:, targets == c].sum(1) == (targets == c).sum()).all()
    preds, conf = probs.argmax(1), probs.max(1)
    correct = (preds == targets).astype(float)
    f1 = intervals.weighted_macro_f1(w, targets, preds, classes)
    ece = intervals.weighted_ece(w, conf, correct, 15)
    auc = intervals.weighted_roc_auc(w, targets, probs)
    for b in range(3):
        idx = np.repeat(np.arange(len(targets)), w[b].astype(int))
        m = classification_metrics(targets[idx], probs[idx], [str(c) for c in range(classes)])
        assert f1[b] == pytest.approx(m["macro_f1"])
        assert auc[b] == pytest.approx(m["roc_auc"])
        assert ece[b] == pytest.approx(calibration(targets[idx], probs[idx], 15)["ece"])


def test_metric_intervals_are_seeded_and_bracket_the_estimates():
    targets, probs = _synthetic(n=200, classes=4, seed=3)
    m = classification_metrics(targets, probs, list("abcd"), top_k=2)
    ece = calibration(targets, probs, 15)["ece"]
    a = intervals.metric_intervals(targets, probs, m, ece, 15, 0.95, 500, seed=1)
    b = intervals.metric_intervals(targets, probs, m, ece, 15, 0.95, 500, seed=1)
    assert a == b
    for key in ("accuracy", "top_k_accuracy", "macro_f1", "roc_auc"):
        e = a[key]
        assert e["low"] < e["estimate"] < e["high"], (key, e)
    assert a["accuracy"]["method"] == "wilson" and a["macro_f1"]["method"].startswith("stratified")
    assert 0 <= a["ece"]["low"] < a["ece"]["high"]
    # a wider level gives a wider interval; no resamples, no bootstrap entries
    wide = intervals.metric_intervals(targets, probs, m, ece, 15, 0.99, 500, seed=1)
    assert wide["macro_f1"]["low"] <= a["macro_f1"]["low"] and wide["macro_f1"]["high"] >= a["macro_f1"]["high"]
    none = intervals.metric_intervals(targets, probs, m, ece, 15, 0.95, 0, seed=1)
    assert "macro_f1" not in none and "accuracy" in none


def test_bootstrap_chunks_do_not_change_the_result(monkeypatch):
    targets, probs = _synthetic(n=80, classes=2)
    full = intervals.bootstrap_metrics(targets, probs, 10, 50, seed=5, with_auc=True)
    monkeypatch.setattr(intervals, "CHUNK_ELEMENTS", 80 * 7)  # 7 resamples per chunk
    chunked = intervals.bootstrap_metrics(targets, probs, 10, 50, seed=5, with_auc=True)
    assert all(len(v) == 50 for v in chunked.values())
    # chunking changes the draw order, not the distribution: same size, values of the same metric
    assert np.mean(chunked["macro_f1"]) == pytest.approx(np.mean(full["macro_f1"]), abs=0.03)


def test_weighted_macro_f1_with_many_classes_equals_sklearn_and_the_dense_counts():
    """Sparse indicator counts: 200 classes, some never predicted, some absent from a resample."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(11)
    n_classes = 200
    targets = np.repeat(np.arange(n_classes), 3)
    preds = np.where(rng.random(len(targets)) < 0.6, targets, rng.integers(0, n_classes // 2, len(targets)))
    (w,) = list(intervals.stratified_weights(targets, 4, seed=2))
    f1 = intervals.weighted_macro_f1(w, targets, preds, n_classes)
    eye = np.eye(n_classes)  # the dense counts it replaced
    tp = w @ (eye[preds] * eye[targets])
    denom = w @ eye[preds] + w @ eye[targets]
    dense = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0).mean(axis=1)
    np.testing.assert_allclose(f1, dense, rtol=1e-12)  # the same counts; the class mean may sum in another order
    for b in range(4):
        idx = np.repeat(np.arange(len(targets)), w[b].astype(int))
        assert f1[b] == pytest.approx(f1_score(targets[idx], preds[idx], labels=range(n_classes), average="macro",
                                               zero_division=0))
