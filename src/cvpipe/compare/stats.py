"""Paired significance tests between bake-off models on the same test images, and aggregation over seeds.

Every model of one bake-off is scored on the same test images (same rows, same order: checked by id), so the
comparisons are *paired*: two models that both miss the same hard images differ less than their two accuracies
suggest. The tests, per ``compare.metric``:

* accuracy (and top-k accuracy when the bundle's predictions.csv has a ``top<k>`` column) are per-image 0/1
  outcomes. One seed: McNemar's exact test, i.e. a two-sided binomial test of the discordant pairs (images one model
  gets right and the other wrong) at p = 0.5, via :func:`scipy.stats.binomtest` (the same p-value as
  ``statsmodels...mcnemar(table, exact=True)``; statsmodels is not a dependency of this project).
  Several seeds: seed *i* of model A is paired with seed *i* of model B, the per-image difference of the two 0/1
  outcomes is averaged over the seed pairs, and a sign-flip permutation test (:func:`scipy.stats.permutation_test`,
  ``permutation_type="samples"`` on one sample) tests that its mean is 0. The image is the unit that is exchanged,
  so the test stays valid when the seeds of one architecture miss the same images (they do: hard images are hard
  for every seed). McNemar on the discordant counts pooled over seeds, or Cochran-Mantel-Haenszel with the
  (image, seed) pairs as strata, would count one image once per seed as if those were independent observations
  and be anti-conservative; CMH with the seeds as strata of the A-correct x B-correct table tests conditional
  independence, not equal accuracy. With one seed the sign-flip test is McNemar's exact test again (the signs of
  the discordant images are fair coin flips under the null): scipy enumerates every sign pattern when there are
  at most ``compare.resamples`` of them, else samples that many.
* macro/weighted F1: a paired bootstrap over test images (:func:`scipy.stats.bootstrap`, percentile method): each
  resample draws the same images for both models and every seed, the statistic is the seed-averaged metric of the
  best minus that of the other. The two-sided p-value inverts the percentile interval: p is the smallest alpha at
  which the (1 - alpha) interval of the difference excludes 0.
* ROC-AUC needs each image's full probability vector, which predictions.csv does not carry: no paired test is run
  (the result says so) and the rule keeps the best point estimate.

The difference (best - other) and its (1 - alpha) paired-bootstrap interval are reported for every metric.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats

from cvpipe.core import storage
from cvpipe.core.errors import StageError

BINARY = ("accuracy", "top_k_accuracy")
SET_METRICS = ("macro_f1", "weighted_f1")
REQUIRED = ("row", "id", "actual", "predicted", "correct")
MAX_RESAMPLE_CELLS = 4_000_000  # resampled index entries held at once (batch x images): bounds the bootstrap's memory


@dataclass(frozen=True)
class Predictions:
    """One run's per-image outcome on the test split, from its bundle's predictions.csv."""

    run: str
    ids: np.ndarray  # str, test row order
    actual: np.ndarray  # str class names
    predicted: np.ndarray  # str class names
    correct: np.ndarray  # bool
    topk: Optional[np.ndarray] = None  # bool: actual among the top k; None without a top<k> column


def read_predictions(folder: str, run: str) -> Predictions:
    """Read ``<folder>/predictions.csv`` (columns row,id,actual,predicted,correct[,top<k>]); a clear error when
    the file or a column is missing."""
    path = storage.join(folder, "predictions.csv")
    if not storage.exists(path):
        raise StageError(f"{run}: no {path}; the paired tests of compare need each run's per-image predictions: "
                         f"rerun its evaluate (`cvpipe evaluate --arch ... --seed ...`)")
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(path).decode("utf-8"))))
    header = rows[0].keys() if rows else []
    missing = [c for c in REQUIRED if c not in header]
    if missing or not rows:
        raise StageError(f"{path}: " + (f"missing column(s) {', '.join(missing)}" if rows else "no rows")
                         + f" (expected {','.join(REQUIRED)})")
    order = np.argsort(np.array([int(r["row"]) for r in rows]), kind="stable")
    rows = [rows[i] for i in order]
    topcol = next((c for c in header if c.startswith("top") and c[3:].isdigit()), None)
    actual = np.array([r["actual"] for r in rows])
    topk = None
    if topcol:
        topk = np.array([a in r[topcol].split("|") for a, r in zip(actual, rows)])
    return Predictions(run=run, ids=np.array([r["id"] for r in rows]), actual=actual,
                       predicted=np.array([r["predicted"] for r in rows]),
                       correct=np.array([r["correct"].strip().lower() in ("1", "true", "yes") for r in rows]), topk=topk)


def check_aligned(preds: Sequence[Predictions]) -> None:
    """Every run must have scored the same test images in the same order with the same labels: the tests pair
    them image by image. Raises naming the first run that differs and how."""
    ref = preds[0]
    for p in preds[1:]:
        if len(p.ids) != len(ref.ids):
            raise StageError(f"{p.run} has {len(p.ids)} test predictions, {ref.run} has {len(ref.ids)}: the runs were "
                             "evaluated on different test splits; rerun evaluate for every run on the same prepared data")
        bad = np.flatnonzero((p.ids != ref.ids) | (p.actual != ref.actual))
        if bad.size:
            i = int(bad[0])
            raise StageError(f"{p.run} and {ref.run} differ at {bad.size} test row(s), first row {i} "
                             f"(id {p.ids[i]} label {p.actual[i]} vs id {ref.ids[i]} label {ref.actual[i]}): "
                             "they were evaluated on different test data; rerun evaluate for every run")


@dataclass(frozen=True)
class Outcomes:
    """One architecture's seeds stacked: ``predicted``/``correct``/``topk`` are (seeds, images), class codes int."""

    seeds: tuple[int, ...]
    actual: np.ndarray
    predicted: np.ndarray
    correct: np.ndarray
    topk: Optional[np.ndarray]
    n_classes: int


def stack(preds: Sequence[Predictions], seeds: Sequence[int], classes: Sequence[str]) -> Outcomes:
    """Stack one architecture's runs (aligned, one per seed) into integer-coded arrays over ``classes``."""
    code = {c: i for i, c in enumerate(classes)}
    enc = np.vectorize(code.__getitem__, otypes=[np.int64])
    topk = None if any(p.topk is None for p in preds) else np.stack([p.topk for p in preds])
    return Outcomes(seeds=tuple(seeds), actual=enc(preds[0].actual), predicted=np.stack([enc(p.predicted) for p in preds]),
                    correct=np.stack([p.correct for p in preds]), topk=topk, n_classes=len(classes))


def testable(out: Outcomes, metric: str) -> bool:
    """Whether per-image data supports a paired test of ``metric``."""
    return metric in ("accuracy", *SET_METRICS) or (metric == "top_k_accuracy" and out.topk is not None)


def _binary(out: Outcomes, metric: str) -> np.ndarray:
    return out.topk if metric == "top_k_accuracy" else out.correct


def resampled_metric(out: Outcomes, metric: str, idx: np.ndarray) -> np.ndarray:
    """The seed-averaged ``metric`` on each resample of test images (``idx``: (..., images) indices).

    Hand-written because scikit-learn scores one sample per call and a bootstrap needs thousands per model and
    seed; F1 uses 2 TP / (support + predicted) per class with the label set of each resample (y_true u y_pred),
    which is scikit-learn's f1_score(average="macro"|"weighted") (checked against it in the tests)."""
    idx = np.asarray(idx)
    flat = idx.reshape(-1, idx.shape[-1])
    if metric in BINARY:
        vals = _binary(out, metric)[:, flat].mean(axis=-1)
    else:
        b, c = flat.shape[0], out.n_classes
        off = (np.arange(b) * c)[:, None]
        act = out.actual[flat] + off
        counts = lambda x: np.bincount(x.ravel(), minlength=b * c).reshape(b, c)  # noqa: E731
        support = counts(act)
        vals = []
        for pred in out.predicted:
            p = pred[flat] + off
            n_pred, tp = counts(p), counts(act[p == act])
            denom = support + n_pred
            f1 = np.divide(2 * tp, denom, out=np.zeros(denom.shape), where=denom > 0)
            if metric == "weighted_f1":
                vals.append((f1 * support).sum(1) / support.sum(1))
            else:
                vals.append(f1.sum(1) / (denom > 0).sum(1))
        vals = np.stack(vals)
    return vals.mean(axis=0).reshape(idx.shape[:-1])


@dataclass
class TestResult:
    """Best vs one contender: the test, its p-value (raw and multiplicity-adjusted), best - contender and its
    paired-bootstrap interval."""

    test: str
    p_value: Optional[float]
    diff: float
    ci_low: Optional[float] = None
    ci_high: Optional[float] = None
    seed_pairs: int = 1
    images: int = 0
    p_adjusted: Optional[float] = None
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def paired_test(best: Outcomes, other: Outcomes, metric: str, alpha: float, resamples: int, seed: int) -> TestResult:
    """Test ``best`` against ``other`` on the same test images (see the module docstring for which test)."""
    common = [s for s in best.seeds if s in other.seeds]
    if not common:
        raise StageError(f"no seed in common between the runs compared ({best.seeds} vs {other.seeds})")
    a, b = (_select(o, common) for o in (best, other))
    n = a.actual.size
    diff = float(resampled_metric(a, metric, np.arange(n)) - resampled_metric(b, metric, np.arange(n)))
    if not (testable(a, metric) and testable(b, metric)):
        why = ("ROC-AUC needs per-image probabilities, which predictions.csv does not carry" if metric == "roc_auc"
               else "predictions.csv has no top-k column")
        return TestResult(test="none", p_value=None, diff=diff, seed_pairs=len(common), images=n, note=why)
    rng = np.random.default_rng(seed)
    dist = _bootstrap_diff(a, b, metric, alpha, resamples, rng)
    lo, hi = (float(x) for x in np.quantile(dist, [alpha / 2, 1 - alpha / 2]))
    if metric in BINARY and len(common) == 1:
        ya, yb = _binary(a, metric)[0], _binary(b, metric)[0]
        n10, n01 = int((ya & ~yb).sum()), int((~ya & yb).sum())
        p = 1.0 if n10 + n01 == 0 else float(stats.binomtest(n10, n10 + n01, 0.5).pvalue)
        test = "McNemar exact"
    elif metric in BINARY:
        d = (_binary(a, metric).astype(float) - _binary(b, metric)).mean(axis=0)
        d = d[d != 0]
        p = 1.0 if d.size == 0 else float(stats.permutation_test(
            (d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples", vectorized=True,
            n_resamples=resamples, alternative="two-sided", random_state=rng,
            # scipy's default batch is every resample at once: (resamples, images, 2) int64 indices, twice,
            # about 5-10 GB for 5,000 resamples over 20k discordant images; below the cap it is unchanged
            batch=max(1, MAX_RESAMPLE_CELLS // (2 * d.size))).pvalue)
        test = f"sign-flip permutation over images ({len(common)} seed pairs)"
    else:
        tail = min((dist <= 0).sum(), (dist >= 0).sum())
        p = float(min(1.0, 2 * (tail + 1) / (dist.size + 1)))
        test = f"paired bootstrap over images ({len(common)} seed pair{'s' if len(common) > 1 else ''})"
    return TestResult(test=test, p_value=p, diff=diff, ci_low=lo, ci_high=hi, seed_pairs=len(common), images=n)


def _select(out: Outcomes, seeds: Sequence[int]) -> Outcomes:
    rows = [out.seeds.index(s) for s in seeds]
    return Outcomes(seeds=tuple(seeds), actual=out.actual, predicted=out.predicted[rows], correct=out.correct[rows],
                    topk=None if out.topk is None else out.topk[rows], n_classes=out.n_classes)


def _bootstrap_diff(a: Outcomes, b: Outcomes, metric: str, alpha: float, resamples: int,
                    rng: np.random.Generator) -> np.ndarray:
    """The bootstrap distribution of metric(a) - metric(b), images resampled jointly for both models and all seeds."""
    n = a.actual.size

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        return resampled_metric(a, metric, idx) - resampled_metric(b, metric, idx)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate distribution (identical models) is a valid answer here
        res = stats.bootstrap((np.arange(n),), statistic, vectorized=True, n_resamples=resamples, method="percentile",
                              confidence_level=1 - alpha, batch=max(1, MAX_RESAMPLE_CELLS // max(n, 1)), random_state=rng)
    return np.asarray(res.bootstrap_distribution)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (reject where adjusted < alpha; controls the family-wise error rate).

    Hand-written (five lines) because the field's implementation, statsmodels.stats.multitest.multipletests, would
    add statsmodels to every lock file and container image for this one function; checked against hand-computed
    values in the tests."""
    p = np.asarray(pvalues, dtype=float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out.tolist()


def aggregate(values: Sequence[float], level: float) -> dict[str, Optional[float]]:
    """Mean, standard deviation (ddof=1) and Student-t interval of the mean over seeds (``level``, e.g. 0.95);
    std and interval are None with one seed, the interval collapses to the mean when every seed agrees."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    if v.size == 0:
        return {"mean": None, "std": None, "ci_low": None, "ci_high": None, "n": 0}
    mean = float(v.mean())
    if v.size < 2:
        return {"mean": mean, "std": None, "ci_low": None, "ci_high": None, "n": 1}
    std = float(v.std(ddof=1))
    lo, hi = (mean, mean) if np.ptp(v) == 0 else stats.t.interval(level, v.size - 1, loc=mean, scale=std / np.sqrt(v.size))
    return {"mean": mean, "std": std, "ci_low": float(lo), "ci_high": float(hi), "n": int(v.size)}


@dataclass
class Groups:
    """Tie groups: ``letter[arch]`` ("A" = tied with the best), and the best-vs-each results of group A's step."""

    letter: dict[str, str] = field(default_factory=dict)
    vs_best: dict[str, TestResult] = field(default_factory=dict)


def tie_groups(order: Sequence[str], test: Callable[[str, str], TestResult], alpha: float, correction: str) -> Groups:
    """Partition ``order`` (best first) into groups tied within noise.

    The leader (first remaining) is tested against every other remaining model; p-values are Holm-adjusted within
    that step (``correction="holm"``) and the models with adjusted p >= alpha join its group; repeat on the rest.
    Group A is the promotion's tie group. Why Holm: a model as good as the best should stay in the tie group; with k
    contenders, k uncorrected tests drop at least one of several equal models far more often than alpha (and the
    best is picked as the maximum of noisy estimates, which biases every comparison towards "worse"). Holm keeps all
    equal models with probability >= 1 - alpha, at some power cost when there are many contenders. A contender that
    cannot be tested (no per-image data for the metric) is not tied: the rule keeps the best point estimate."""
    out = Groups()
    remaining = list(order)
    step = 0
    while remaining:
        lead, rest = remaining[0], remaining[1:]
        results = {o: test(lead, o) for o in rest}
        tested = [o for o in rest if results[o].p_value is not None]
        adjusted = holm([results[o].p_value for o in tested]) if correction == "holm" else [results[o].p_value for o in tested]
        for o, pa in zip(tested, adjusted):
            results[o].p_adjusted = float(pa)
        members = [lead] + [o for o in tested if results[o].p_adjusted >= alpha]
        if step == 0:
            out.vs_best = results
        name = chr(ord("A") + step) if step < 26 else f"G{step + 1}"
        out.letter.update({m: name for m in members})
        remaining = [o for o in rest if o not in members]
        step += 1
    return out
