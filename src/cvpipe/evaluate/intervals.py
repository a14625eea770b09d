"""Confidence intervals of evaluate's test metrics.

* **Accuracy and top-k accuracy** are binomial proportions (images right out of images tested), so they
  get an analytic interval: Wilson's score interval from ``scipy.stats.binomtest(k, n).proportion_ci``.
  Wilson was picked over Clopper-Pearson ("exact") by measured coverage (tests/test_intervals.py):
  at a true accuracy of 0.8 on 300 images, 2,000 seeded draws cover it in 94.0 % at a nominal 95 %
  (exactly, summed over the binomial: 94.9 %; Clopper-Pearson: 95.7 %, conservative by construction).
  Known limitation: Wilson's coverage oscillates with n and p, and it **under-covers for a true accuracy
  very near 0 or 1** on few images (exact coverage at a nominal 95 %: 92.1 % at p = 0.99 and 91.0 % at
  p = 0.995 on 100 images, 93.7 % at p = 0.97 on 50): read a 0.99 accuracy on 100 images with that in mind.
* **Macro-F1, ROC-AUC (one-vs-rest, macro) and ECE** have no analytic interval: a seeded percentile
  bootstrap over test images, stratified by class (each resample keeps every class's image count, as
  the test split itself is stratified; ROC-AUC stays defined in every resample). scipy.stats.bootstrap
  cannot stratify (it resamples all observations together), so the resampling is written here; it
  stays linear in the test-set size: a resample is a row of image multiplicities ``W`` (B x n), and each
  metric is a weighted sum ``W @ features`` over images, chunks of resamples at a time. ROC-AUC uses
  the Mann-Whitney form with the scores sorted once (the number of negatives below each positive is a
  cumulative sum of negative weights in score order), ties counted one half as scikit-learn does.
  The percentile method is used rather than BCa (whose jackknife would need n more metric
  evaluations); ECE's bootstrap distribution sits slightly above the point estimate (ECE is biased
  upward on resampled data), so its interval is a range of plausible values, not centred on the estimate.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

CHUNK_ELEMENTS = 4_000_000  # resamples x images held at once (32 MB of float64)


def wilson_interval(successes: int, n: int, level: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (scipy); (nan, nan) when n is 0."""
    from scipy.stats import binomtest

    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def stratified_weights(targets: np.ndarray, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Yield chunks of bootstrap resamples as (B, n) image-multiplicity matrices: within each class, its
    images are drawn with replacement as many times as the class has images (seeded, numpy Generator)."""
    targets = np.asarray(targets)
    n = len(targets)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(targets == c) for c in np.unique(targets)]
    chunk = max(1, CHUNK_ELEMENTS // max(1, n))
    done = 0
    while done < resamples:
        b = min(chunk, resamples - done)
        w = np.zeros((b, n), dtype=np.float64)
        for pos in groups:
            k = len(pos)
            draws = rng.integers(0, k, size=(b, k))
            counts = np.bincount((draws + np.arange(b)[:, None] * k).ravel(), minlength=b * k).reshape(b, k)
            w[:, pos] = counts
        done += b
        yield w


def _onehot(classes: np.ndarray, n_classes: int, keep: Optional[np.ndarray] = None):
    """The (n, n_classes) indicator matrix of *classes* (rows where *keep* is False left empty), sparse: one
    stored value per image, where a dense one was n x C float64 (1.6 GB for 200k images of 1,000 classes)."""
    from scipy.sparse import csr_matrix

    n = len(classes)
    data = np.ones(n) if keep is None else np.asarray(keep, dtype=np.float64)
    return csr_matrix((data, (np.arange(n), classes)), shape=(n, n_classes))


def weighted_macro_f1(w: np.ndarray, targets: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 over all *n_classes* labels (zero where a class has neither support nor predictions, as
    scikit-learn's ``zero_division=0``) of each weighted resample (rows of *w*).

    Each count is ``w @`` a sparse indicator matrix: O(resamples x images), whatever the number of classes
    (the sums are of integer multiplicities, so they are exact in any order)."""
    tp = np.asarray(w @ _onehot(targets, n_classes, keep=preds == targets))
    denom = np.asarray(w @ _onehot(preds, n_classes)) + np.asarray(w @ _onehot(targets, n_classes))  # 2TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=1)


def weighted_ece(w: np.ndarray, conf: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE (equal-width top-1 confidence bins, as :func:`cvpipe.evaluate.metrics.calibration`) of each
    weighted resample: sum over bins of |sum of (correct - confidence)| / images."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    gap = np.eye(n_bins)[ids] * (correct - conf)[:, None]
    return np.abs(w @ gap).sum(axis=1) / w.sum(axis=1)


def _weighted_auc(w: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of *scores* for *positive* vs the rest, per weighted resample, ties counted 1/2."""
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = positive[order].astype(np.float64)
    ws = w[:, order]
    cum_neg = np.cumsum(ws * (1.0 - pos), axis=1)
    cum_neg = np.concatenate([np.zeros((len(w), 1)), cum_neg], axis=1)
    # for each sorted image: first and one-past-last index of its group of equal scores
    start = np.searchsorted(s, s, side="left")
    end = np.searchsorted(s, s, side="right")
    below = cum_neg[:, start]
    tied = cum_neg[:, end] - below
    wp = ws * pos
    n_pos = wp.sum(axis=1)
    n_neg = ws.sum(axis=1) - n_pos
    return (wp * (below + 0.5 * tied)).sum(axis=1) / (n_pos * n_neg)


def weighted_roc_auc(w: np.ndarray, targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest macro ROC-AUC (binary: of class 1), as :func:`cvpipe.evaluate.metrics.classification_metrics`."""
    n_classes = probs.shape[1]
    if n_classes == 2:
        return _weighted_auc(w, probs[:, 1], targets == 1)
    return np.mean([_weighted_auc(w, probs[:, c], targets == c) for c in range(n_classes)], axis=0)


def bootstrap_metrics(targets: np.ndarray, probs: np.ndarray, n_bins: int, resamples: int, seed: int,
                      with_auc: bool) -> dict[str, np.ndarray]:
    """The bootstrap distribution (one value per resample) of macro-F1, ECE and (with *with_auc*) ROC-AUC."""
    targets = np.asarray(targets, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    preds = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    correct = (preds == targets).astype(np.float64)
    out: dict[str, list] = {"macro_f1": [], "ece": [], "roc_auc": []}
    for w in stratified_weights(targets, resamples, seed):
        out["macro_f1"].append(weighted_macro_f1(w, targets, preds, probs.shape[1]))
        out["ece"].append(weighted_ece(w, conf, correct, n_bins))
        if with_auc:
            out["roc_auc"].append(weighted_roc_auc(w, targets, probs))
    return {k: np.concatenate(v) for k, v in out.items() if v}


def _entry(estimate: Optional[float], low: float, high: float, method: str) -> dict[str, Any]:
    r6 = lambda v: None if v is None or not np.isfinite(v) else round(float(v), 6)  # noqa: E731
    return {"estimate": r6(estimate), "low": r6(low), "high": r6(high), "method": method}


def metric_intervals(targets: np.ndarray, probs: np.ndarray, m: dict[str, Any], ece: float, n_bins: int,
                     level: float, resamples: int, seed: int) -> dict[str, Any]:
    """evaluate.json's ``intervals``: {metric: {estimate, low, high, method}} plus the level and resample count.

    *m* is :func:`cvpipe.evaluate.metrics.classification_metrics`' output on the same *probs*; *ece* the ECE
    of *probs*. Accuracy and top-k accuracy: Wilson; macro-F1, ROC-AUC, ECE: stratified percentile bootstrap
    (none with ``resamples`` 0; ROC-AUC none where it is undefined)."""
    n = int(m["n"])
    out: dict[str, Any] = {"level": level, "bootstrap_resamples": resamples, "bootstrap_seed": seed}
    k = int(round(m["accuracy"] * n))
    out["accuracy"] = _entry(m["accuracy"], *wilson_interval(k, n, level), "wilson")
    if m.get("top_k_accuracy") is not None:
        out["top_k_accuracy"] = _entry(m["top_k_accuracy"], *wilson_interval(int(round(m["top_k_accuracy"] * n)), n, level), "wilson")
    if resamples <= 0:
        return out
    dist = bootstrap_metrics(targets, probs, n_bins, resamples, seed, with_auc=m.get("roc_auc") is not None)
    tail = (1 - level) / 2 * 100
    for key, estimate in (("macro_f1", m["macro_f1"]), ("roc_auc", m.get("roc_auc")), ("ece", ece)):
        if key in dist:
            low, high = np.percentile(dist[key], [tail, 100 - tail])
            out[key] = _entry(estimate, low, high, "stratified percentile bootstrap")
    return out
