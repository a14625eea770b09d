"""Temperature scaling and the risk-coverage curve.

**Temperature scaling** (Guo et al. 2017): one scalar ``T > 0`` divides the logits, fitted on the
validation split by minimising the negative log-likelihood (``scipy.optimize.minimize_scalar`` on
``log T``, bounded to ``[1/20, 20]``). ``T`` never changes the argmax, so accuracy and the confusion
matrix are the same before and after; confidences (and with them ECE, NLL, ROC-AUC, the risk-coverage
curve) change. With flip TTA the probabilities are the mean of the softmax of each pass's ``logits / T``,
the same quantity evaluate reports, so ``T`` is fitted for what is scored. Without a validation split
(or with ``evaluate.calibrate: false``) ``T = 1`` and the report says why; so does a val split with no
mistake, where the NLL falls without end as ``T -> 0`` and no temperature can be fitted.

**Risk-coverage** (selective classification): answering only the images whose top-1 probability is
``>= t``, coverage is the fraction answered and risk the error rate among them; the curve sweeps ``t``
over the test confidences. AURC is the area under it (the mean risk over coverage, a step integral).
No pinned library computes either (torchmetrics is not a dependency), so both are a few lines here.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import numpy as np

from cvpipe.evaluate.metrics import row_chunks

T_BOUNDS = (1 / 20, 20.0)


def prob_chunks(logits: Sequence[np.ndarray], temperature: float = 1.0) -> Iterator[tuple[slice, np.ndarray]]:
    """``(rows' slice, probabilities)`` over :func:`~cvpipe.evaluate.metrics.row_chunks`: the mean over passes
    (one, or two with flip TTA) of ``softmax(logits / T)`` in float64 (scipy's softmax, row by row, so a chunk's
    rows are bit-identical to the whole array's)."""
    from scipy.special import softmax

    for r in row_chunks(*np.shape(logits[0])):
        part = [softmax(np.asarray(lg[r], dtype=np.float64) / temperature, axis=1) for lg in logits]
        yield r, (part[0] if len(part) == 1 else np.mean(part, axis=0))


def softmax_probs(logits: Sequence[np.ndarray], temperature: float = 1.0, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The (n, C) float64 probabilities of :func:`prob_chunks`, written into *out* (evaluate gives a
    disk-backed array) or a new array. Chunked: the whole-array form held each pass's float64 copy, its
    softmax and their mean at once, five n x C float64 arrays with TTA (8 GB at 200k images of 1,000 classes)."""
    out = np.empty(np.shape(logits[0]), dtype=np.float64) if out is None else out
    for rows, p in prob_chunks(logits, temperature):
        out[rows] = p
    return out


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes: scikit-learn's log_loss over every class, over
    :func:`~cvpipe.evaluate.metrics.row_chunks` weighted by their image count (log_loss copies, clips and
    renormalises the whole n x C array it is given)."""
    from sklearn.metrics import log_loss

    targets, labels = np.asarray(targets), list(range(probs.shape[1]))
    total = sum(log_loss(targets[r], probs[r], labels=labels) * (r.stop - r.start)
                for r in row_chunks(len(targets), probs.shape[1]))
    return float(total / len(targets))


def fit_temperature(logits: Sequence[np.ndarray], targets: np.ndarray) -> float:
    """The T minimising the NLL of :func:`softmax_probs` on (*logits*, *targets*): bounded search on log T,
    each step over :func:`prob_chunks` (only the true class's probability of each image is kept)."""
    from scipy.optimize import minimize_scalar

    targets = np.asarray(targets, dtype=np.int64)

    def objective(log_t: float) -> float:
        p = np.empty(len(targets))
        for rows, chunk in prob_chunks(logits, float(np.exp(log_t))):
            p[rows] = chunk[np.arange(len(chunk)), targets[rows]]
        return float(-np.log(np.clip(p, 1e-300, None)).mean())

    res = minimize_scalar(objective, bounds=(np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])), method="bounded",
                          options={"xatol": 1e-4})
    return float(np.exp(res.x))


def calibration_report(temperature: float, fitted_on: Optional[str], n_val: int, note: Optional[str],
                       test: dict[str, float], val: Optional[dict[str, float]]) -> dict[str, Any]:
    """evaluate.json's ``calibration``: T, where it came from, test ECE/NLL before and after (and val NLL)."""
    r6 = lambda v: None if v is None else round(float(v), 6)  # noqa: E731
    out: dict[str, Any] = {"method": "temperature scaling (NLL on val)", "temperature": r6(temperature),
                           "fitted_on": fitted_on, "n_val": n_val}
    if note:
        out["note"] = note
    out.update({f"test_{k}": r6(v) for k, v in test.items()})
    if val:
        out.update({f"val_{k}": r6(v) for k, v in val.items()})
    return out


def risk_coverage_curve(conf: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """One point per distinct confidence t (descending): coverage = P(conf >= t), risk = error rate of those."""
    conf = np.asarray(conf, dtype=np.float64)
    wrong = 1.0 - np.asarray(correct, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    c, e = conf[order], np.cumsum(wrong[order])
    last = np.r_[np.flatnonzero(np.diff(c) != 0), len(c) - 1]  # last image of each group of equal confidence
    answered = last + 1
    return {"threshold": c[last], "coverage": answered / len(c), "risk": e[last] / answered}


def aurc(curve: dict[str, np.ndarray]) -> float:
    """Area under the risk-coverage step curve: sum of each point's risk times the coverage it adds."""
    cov = curve["coverage"]
    return float(np.sum(curve["risk"] * np.diff(np.r_[0.0, cov])))


def at_threshold(conf: np.ndarray, correct: np.ndarray, threshold: float) -> dict[str, Any]:
    """Coverage and error when images with top-1 probability below *threshold* are not answered
    (``serve.abstain_below``'s rule); error is None when nothing is answered."""
    conf = np.asarray(conf, dtype=np.float64)
    answered = conf >= threshold
    k = int(answered.sum())
    err = None if k == 0 else float(1.0 - np.asarray(correct, dtype=np.float64)[answered].mean())
    return {"threshold": float(threshold), "coverage": round(k / len(conf), 6), "answered": k,
            "error": None if err is None else round(err, 6)}
