"""compare's promotion rule (issue #18): paired tests on per-image outcomes, tie groups, promotion by cost.

The two statistical checks of the issue run the whole rule (:func:`cvpipe.compare.rule.select`) on 200 seeded draws
of synthetic per-image predictions of two models, a slow one and a 5x faster one, on the same test images:

* equal true accuracy (0.8 each, errors independent, 500 images, one seed): the rule must declare a tie, and so
  promote the faster model, in at least 90 % of the draws. Measured: 189/200 = 94.5 % (McNemar's exact test at
  alpha 0.05; every tie promoted the faster model).
* a true gap of 10 points (0.85 vs 0.75, 500 images, one seed): the rule must find the difference, and keep the
  better model, in at least 90 %. Measured: 192/200 = 96.0 % (about 160 discordant images, 2:1 for the better one).

The same two checks with two seeds per model whose errors are correlated (each image has a difficulty shared by
every seed and model, so the seeds of one model miss the same images; sign-flip test, 1,000 resamples): measured
194/200 ties (97.0 %) with equal accuracy and 200/200 detections (100 %) with the 10-point gap.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from sklearn.metrics import f1_score

from cvpipe.compare import leaderboard, rule, stats
from cvpipe.core.config import Params
from cvpipe.core.errors import StageError

CLASSES = [str(i) for i in range(10)]


def _params(**compare) -> Params:
    return Params.model_validate({"compare": {"resamples": 200, **compare},
                                  "bakeoff": {"archs": {"big": {}, "small": {}}, "seeds": [42]}})


def _outcomes(correct: np.ndarray, actual: np.ndarray, seeds=(42,)) -> stats.Outcomes:
    """Per-image outcomes from a (seeds, images) 0/1 matrix: a wrong image predicts the next class."""
    correct = np.atleast_2d(correct).astype(bool)
    predicted = np.where(correct, actual, (actual + 1) % len(CLASSES))
    return stats.Outcomes(seeds=tuple(seeds), actual=actual, predicted=predicted, correct=correct, topk=None,
                          n_classes=len(CLASSES))


def _cells(per_image: dict[str, stats.Outcomes], costs: dict[str, dict]) -> list[dict]:
    """gather()'s rows for synthetic runs: the metrics computed from the per-image outcomes."""
    rows = []
    for arch, out in per_image.items():
        for i, seed in enumerate(out.seeds):
            one = stats.Outcomes(seeds=(seed,), actual=out.actual, predicted=out.predicted[i:i + 1],
                                 correct=out.correct[i:i + 1], topk=None, n_classes=out.n_classes)
            full = np.arange(out.actual.size)
            m = {k: float(stats.resampled_metric(one, k, full)) for k in ("accuracy", "macro_f1", "weighted_f1")}
            rows.append({"arch": arch, "seed": seed, "run": f"{arch}/seed{seed}", "_dir": f"/nowhere/{arch}/seed{seed}",
                         "_eval": {}, **m, "top_k_accuracy": None, "roc_auc": None, "ece": 0.05, "params_m": 1.0,
                         "throughput_img_s": 100.0, "image_size": 32, "trained_epochs": 2,
                         **{"latency_ms": 1.0, "size_mb": 1.0, "gflops": 1.0, **costs[arch]}})
    return rows


COSTS = {"big": {"latency_ms": 10.0, "size_mb": 40.0, "gflops": 2.0}, "small": {"latency_ms": 2.0, "size_mb": 8.0, "gflops": 0.3}}


def _draws(acc_big: float, acc_small: float, seeds: int, n: int = 500, draws: int = 200, resamples: int = 200):
    """Run the rule on ``draws`` seeded synthetic bake-offs. Returns (ties: tie group of both models, ties that
    promoted the faster model, separations: tie group of one, separations that kept the truly better model)."""
    rng = np.random.default_rng(2026)
    params = _params(resamples=resamples)
    ties = ties_small = separated = separated_right = 0
    for _ in range(draws):
        actual = rng.integers(0, len(CLASSES), n)
        difficulty = rng.beta(8, 2, n) - 0.8  # shared by every seed and model: the seeds' errors correlate
        if seeds == 1:
            cb, cs = rng.random((1, n)) < acc_big, rng.random((1, n)) < acc_small
        else:
            cb = rng.random((seeds, n)) < np.clip(acc_big + difficulty, 0, 1)
            cs = rng.random((seeds, n)) < np.clip(acc_small + difficulty, 0, 1)
        ids = tuple(range(42, 42 + seeds))
        per_image = {"big": _outcomes(cb, actual, ids), "small": _outcomes(cs, actual, ids)}
        sel = rule.select(_cells(per_image, COSTS), params, per_image)
        if len(sel.record["tie_group"]) == 2:
            ties += 1
            ties_small += sel.winner == "small"
        else:
            separated += 1
            separated_right += sel.winner == ("big" if acc_big > acc_small else "small")
    return ties, ties_small, separated, separated_right


def test_equal_accuracy_is_a_tie_promoted_by_cost_in_90_percent_of_draws():
    ties, ties_small, _, _ = _draws(0.8, 0.8, seeds=1)
    assert ties >= 180, f"tie declared in {ties}/200 draws"  # measured 189/200
    assert ties_small == ties  # every tie promotes the faster model


def test_a_10_point_gap_on_500_images_is_detected_in_90_percent_of_draws():
    _, _, separated, right = _draws(0.85, 0.75, seeds=1)
    assert separated >= 180, f"difference detected in {separated}/200 draws"  # measured 192/200
    assert right == separated


@pytest.mark.slow
def test_with_two_correlated_seeds_the_rule_keeps_its_size_and_power():
    ties, ties_small, _, _ = _draws(0.8, 0.8, seeds=2, resamples=1000)
    assert ties >= 180 and ties_small == ties, f"tie declared in {ties}/200 draws"  # measured 194/200
    _, _, separated, right = _draws(0.85, 0.75, seeds=2, resamples=1000)
    assert separated >= 180 and right == separated, f"difference detected in {separated}/200 draws"  # measured 200/200


# ---------------------------------------------------------------------------- the tests themselves


def test_mcnemar_exact_p_value_and_test_name():
    """10 images only the best gets right, 2 only the other: two-sided binomial p = 2 P(X <= 2 | 12, 1/2)."""
    actual = np.zeros(40, dtype=int)
    best = np.ones(40, bool)
    other = best.copy()
    other[:10] = False
    best[10:12] = False
    res = stats.paired_test(_outcomes(best, actual), _outcomes(other, actual), "accuracy", 0.05, 500, 0)
    assert res.test == "McNemar exact"
    assert res.p_value == pytest.approx(2 * (1 + 12 + 66) / 2**12)
    assert res.diff == pytest.approx(8 / 40) and res.ci_low <= res.diff <= res.ci_high
    same = stats.paired_test(_outcomes(best, actual), _outcomes(best, actual), "accuracy", 0.05, 500, 0)
    assert same.p_value == 1.0 and same.diff == 0


def test_sign_flip_test_over_seeds_reduces_to_mcnemar_exact():
    """Two seeds that agree image by image carry the evidence of one: the same p as McNemar's exact test (12
    discordant images: scipy enumerates all 2**12 sign flips, so the p-value is exact, not sampled)."""
    actual = np.zeros(40, dtype=int)
    best, other = np.ones(40, bool), np.ones(40, bool)
    other[:10], best[10:12] = False, False
    one = stats.paired_test(_outcomes(best, actual), _outcomes(other, actual), "accuracy", 0.05, 5000, 0)
    two = stats.paired_test(_outcomes(np.stack([best, best]), actual, (1, 2)),
                            _outcomes(np.stack([other, other]), actual, (1, 2)), "accuracy", 0.05, 5000, 0)
    assert two.test.startswith("sign-flip permutation") and two.seed_pairs == 2
    assert two.p_value == pytest.approx(one.p_value) and two.diff == pytest.approx(one.diff)


def test_sign_flip_test_in_batches_gives_the_same_p_value(monkeypatch):
    """The sampled sign-flip test runs its resamples in batches of at most MAX_RESAMPLE_CELLS index cells (scipy
    would hold every resample at once: gigabytes at a million images); the p-value does not depend on the batch."""
    rng = np.random.default_rng(3)
    actual = rng.integers(0, 10, 300)
    best, other = rng.random((2, 300)) < 0.8, rng.random((2, 300)) < 0.75
    args = (_outcomes(best, actual, (1, 2)), _outcomes(other, actual, (1, 2)), "accuracy", 0.05, 999, 7)
    whole = stats.paired_test(*args)
    monkeypatch.setattr(stats, "MAX_RESAMPLE_CELLS", 1000)  # ~100 discordant images x 2: a few resamples a batch
    batched = stats.paired_test(*args)
    assert whole.test.startswith("sign-flip permutation") and 0 < whole.p_value < 1
    assert batched.p_value == whole.p_value


def test_bootstrap_test_of_macro_f1_is_seeded_and_separates_a_clear_gap():
    rng = np.random.default_rng(0)
    actual = rng.integers(0, 10, 400)
    good, bad = _outcomes(rng.random(400) < 0.9, actual), _outcomes(rng.random(400) < 0.6, actual)
    r1 = stats.paired_test(good, bad, "macro_f1", 0.05, 1000, seed=7)
    r2 = stats.paired_test(good, bad, "macro_f1", 0.05, 1000, seed=7)
    assert r1 == r2 and r1.test.startswith("paired bootstrap")
    assert r1.p_value < 0.01 and r1.ci_low > 0
    tie = stats.paired_test(good, good, "macro_f1", 0.05, 1000, seed=7)
    assert tie.p_value == 1.0


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "weighted_f1"])
def test_resampled_metric_matches_scikit_learn(metric):
    rng = np.random.default_rng(3)
    actual = rng.integers(0, 10, 120)
    out = _outcomes(rng.random((2, 120)) < 0.7, actual, seeds=(1, 2))
    idx = rng.integers(0, 120, (5, 120))
    idx[0] = np.where(actual[idx[0]] == 3, 0, idx[0])  # a resample without class 3 in y_true
    got = stats.resampled_metric(out, metric, idx)
    for b in range(5):
        want = []
        for s in range(2):
            y, p = actual[idx[b]], out.predicted[s, idx[b]]
            want.append((y == p).mean() if metric == "accuracy" else
                        f1_score(y, p, average=metric.split("_")[0], zero_division=0))
        assert got[b] == pytest.approx(np.mean(want))


def test_holm_adjustment():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.5]) == [0.5]
    assert stats.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_aggregate_over_seeds():
    agg = stats.aggregate([0.90, 0.92], 0.95)
    assert agg["mean"] == pytest.approx(0.91) and agg["std"] == pytest.approx(0.0141421, rel=1e-5)
    assert agg["ci_high"] - agg["mean"] == pytest.approx(12.7062 * 0.01, rel=1e-4)  # t(0.975, df=1) x sd/sqrt(2)
    assert stats.aggregate([0.9], 0.95) == {"mean": 0.9, "std": None, "ci_low": None, "ci_high": None, "n": 1}
    flat = stats.aggregate([0.8, 0.8, 0.8], 0.95)
    assert flat["ci_low"] == flat["ci_high"] == flat["mean"] == pytest.approx(0.8)


def test_arch_rows_aggregate_seeds_and_average_evaluate_intervals():
    actual = np.arange(100) % 10
    per_image = {"big": _outcomes(np.ones((2, 100)), actual, (42, 43)), "small": _outcomes(np.ones((2, 100)), actual, (42, 43))}
    cells = _cells(per_image, COSTS)
    for c, (lo, hi) in zip(cells, [(0.9, 1.0), (0.8, 1.0), (0.95, 1.0), (0.85, 1.0)]):
        c["_eval"] = {"intervals": {"accuracy": {"low": lo, "high": hi}}}
    cells[1]["accuracy"] = 0.98
    rows = {r["arch"]: r for r in rule.aggregate_archs(cells, _params())}
    assert rows["big"]["accuracy"] == pytest.approx(0.99) and rows["big"]["seeds"] == 2
    assert rows["big"]["std"] == pytest.approx(np.std([1.0, 0.98], ddof=1))
    assert rows["big"]["ci"] == "t, 2 seeds" and rows["big"]["ci_low"] < 0.99 < rows["big"]["ci_high"]
    assert rows["big"]["test_ci_low"] == pytest.approx(0.85) and rows["small"]["test_ci_low"] == pytest.approx(0.9)
    assert rows["small"]["ci_low"] == rows["small"]["ci_high"] == 1.0  # both seeds agree


def _three(acc: dict[str, float], n: int = 600, seed: int = 1):
    rng = np.random.default_rng(seed)
    actual = rng.integers(0, 10, n)
    u = rng.random(n)  # the same draw for every model: equal accuracies give identical outcomes, gaps nest
    return {a: _outcomes(u < p, actual) for a, p in acc.items()}


def test_tie_groups_and_promotion_by_each_cost_key():
    per_image = _three({"big": 0.9, "mid": 0.9, "weak": 0.5})
    costs = {"big": {"latency_ms": 5.0, "size_mb": 10.0, "gflops": 0.5}, "mid": {"latency_ms": 3.0, "size_mb": 30.0, "gflops": 4.0},
             "weak": {"latency_ms": 1.0, "size_mb": 1.0, "gflops": 0.1}}
    cells = _cells(per_image, costs)
    winners = {}
    for cost in ("latency_ms", "size_mb", "gflops"):
        sel = rule.select([dict(c) for c in cells], _params(cost=cost), per_image)
        groups = {r["arch"]: r["tie_group"] for r in sel.archs}
        assert groups == {"big": "A", "mid": "A", "weak": "B"}, groups
        winners[cost] = sel.winner
        assert "tied within noise" in sel.record["why"] and sel.record["contenders"]["weak"]["p_adjusted"] < 0.05
    assert winners == {"latency_ms": "mid", "size_mb": "big", "gflops": "big"}


def test_a_clear_winner_is_promoted_even_when_slower_and_the_why_says_so():
    per_image = _three({"big": 0.95, "small": 0.6})
    sel = rule.select(_cells(per_image, COSTS), _params(), per_image)
    assert sel.winner == "big" and sel.record["tie_group"] == ["big"]
    assert "significantly worse" in sel.record["why"] and sel.archs[0]["arch"] == "big" and sel.archs[0]["promoted"]
    assert sel.win_cell["run"] == "big/seed42"


def test_max_latency_and_max_size_still_decide_eligibility():
    per_image = _three({"big": 0.95, "small": 0.6})
    sel = rule.select(_cells(per_image, COSTS), _params(max_latency_ms=5.0), per_image)
    assert sel.winner == "small" and [r["eligible"] for r in sel.archs] == [True, False]
    assert sel.record["why"].startswith("small: the only eligible model")
    sel = rule.select(_cells(per_image, COSTS), _params(max_size_mb=20.0), per_image)
    assert sel.winner == "small"
    none = rule.select(_cells(per_image, COSTS), _params(max_latency_ms=1.0), per_image)
    assert none.winner is None
    from cvpipe.compare.stage import _no_winner

    assert "compare.max_latency_ms=1.0" in str(_no_winner(none, _params(max_latency_ms=1.0)))


def test_roc_auc_cannot_be_tested_pairwise_so_the_best_point_estimate_wins():
    per_image = _three({"big": 0.9, "small": 0.9})
    cells = _cells(per_image, COSTS)
    for c, auc in zip(cells, (0.99, 0.98)):
        c["roc_auc"] = auc
    sel = rule.select(cells, _params(metric="roc_auc"), per_image)
    assert sel.winner == "big" and sel.record["contenders"]["small"]["test"] == "none"
    assert "could not be tested pairwise" in sel.record["why"]


# ---------------------------------------------------------------------------- predictions.csv


def _write_predictions(folder, ids, actual, predicted, columns=("row", "id", "actual", "predicted", "confidence", "correct")):
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for i, (d, a, p) in enumerate(zip(ids, actual, predicted)):
        row = {"row": i, "id": d, "actual": a, "predicted": p, "confidence": 0.9, "correct": int(a == p)}
        w.writerow([row[c] for c in columns])
    (folder / "predictions.csv").write_text(buf.getvalue())


def test_outcomes_read_every_runs_predictions_and_check_ids(tmp_path):
    ids = [f"img{i}" for i in range(6)]
    actual = ["ants", "bees"] * 3
    _write_predictions(tmp_path / "a/seed1", ids, actual, actual)
    _write_predictions(tmp_path / "b/seed1", ids, actual, ["ants"] * 6)
    cells = [{"arch": a, "seed": 1, "run": f"{a}/seed1", "_dir": str(tmp_path / a / "seed1")} for a in "ab"]
    out = rule.outcomes(cells)
    assert out["a"].correct.all() and out["b"].correct.sum() == 3 and out["a"].n_classes == 2

    _write_predictions(tmp_path / "b/seed1", ids[::-1], actual, actual)
    with pytest.raises(StageError, match=r"b/seed1 and a/seed1 differ at .* first row 0 .*id img5"):
        rule.outcomes(cells)
    _write_predictions(tmp_path / "b/seed1", ids[:5], actual[:5], actual[:5])
    with pytest.raises(StageError, match="different test splits"):
        rule.outcomes(cells)
    (tmp_path / "b/seed1/predictions.csv").unlink()
    with pytest.raises(StageError, match=r"b/seed1: no .*predictions.csv"):
        rule.outcomes(cells)
    _write_predictions(tmp_path / "b/seed1", ids, actual, actual, columns=("row", "id", "actual", "predicted"))
    with pytest.raises(StageError, match="missing column.*correct"):
        rule.outcomes(cells)


# ---------------------------------------------------------------------------- outputs


def test_leaderboard_csv_md_table_and_headline(tmp_path):
    from rich.console import Console

    from cvpipe.compare.stage import headline

    per_image = _three({"big": 0.9, "small": 0.9, "weak": 0.5})
    costs = {**COSTS, "weak": {"latency_ms": 1.0, "size_mb": 1.0, "gflops": 0.1}}
    params = _params()
    sel = rule.select(_cells(per_image, costs), params, per_image)
    md = leaderboard.leaderboard_md(sel, params)
    assert "Winner: **small**" in md and "## Runs (one per seed)" in md and "McNemar exact" in md
    buf = io.StringIO()
    w = csv.DictWriter(buf, leaderboard.COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows([*sel.archs, *sel.cells])
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["kind"] for r in rows] == ["arch"] * 3 + ["seed"] * 3
    assert [(r["arch"], r["tie_group"], r["promoted"]) for r in rows if r["kind"] == "arch"] == [
        ("small", "A", "True"), ("big", "A", "False"), ("weak", "B", "False")]  # equal accuracy: the cheaper first
    head = headline(sel, params)
    assert head["winner"] == "small" and head["tied"] == 2 and head["candidates"] == 3 and head["p_value"] == 1.0
    assert len([v for v in head.values() if not isinstance(v, str)]) <= 6
    con = Console(file=io.StringIO(), width=200)
    con.print(leaderboard.leaderboard_table(sel.archs, "accuracy", sel.winner))
    out = con.file.getvalue()
    assert "tie" in out and out.index("big") < out.index("weak")
    leaderboard.plot_pareto(sel.archs, "accuracy", str(tmp_path / "pareto.png"), sel.winner)
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_one_architecture_one_seed_wins_alone_with_evaluates_interval():
    """The sample pipeline's bake-off (resnet18, seed 42): no test to run, the interval is evaluate's."""
    from cvpipe.compare.stage import headline

    per_image = {"big": _three({"big": 0.9})["big"]}
    cells = _cells(per_image, COSTS)
    cells[0]["_eval"] = {"intervals": {"accuracy": {"estimate": 0.9, "low": 0.87, "high": 0.92, "method": "wilson"}}}
    params = Params.model_validate({"bakeoff": {"archs": {"big": {}}, "seeds": [42]}})
    sel = rule.select(cells, params, per_image)
    assert sel.winner == "big" and sel.record["why"].startswith("big: the only eligible model")
    assert sel.archs[0]["ci"] == "evaluate" and sel.archs[0]["std"] is None
    head = headline(sel, params)
    assert head == {"winner": "big", "value": pytest.approx(cells[0]["accuracy"]), "ci_low": 0.87, "ci_high": 0.92,
                    "p_value": None, "candidates": 1, "tied": 1}
