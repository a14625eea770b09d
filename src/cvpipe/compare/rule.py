"""The promotion rule: aggregate each architecture over its seeds, test the best against the others on the same
test images, and promote the cheapest model among those tied with the best within noise.

1. Each architecture's row is the mean over its seeds (``bakeoff.seeds``) of every metric and cost, with the
   standard deviation (ddof=1) and a Student-t interval over seeds of ``compare.metric`` (>= 2 seeds; truncated to
   [0, 1], where every compare.metric lies: with 2 seeds t(0.975, 1) = 12.7 makes it wide), and the mean
   of evaluate's per-run test interval (``evaluate.json["intervals"][metric]``) where evaluate wrote one.
2. Eligible = mean batch-1 latency <= ``compare.max_latency_ms`` and ONNX size <= ``compare.max_size_mb``.
3. The best eligible architecture by mean ``compare.metric`` is tested against every other eligible one
   (:mod:`cvpipe.compare.stats`: paired, per test image, seed i against seed i), p-values Holm-adjusted
   (``compare.correction``). The tie group (group A) is the best plus every model with adjusted p >= ``compare.alpha``;
   the rest are partitioned the same way into groups B, C, ... for the leaderboard.
4. The winner is the tie group's cheapest model by ``compare.cost`` (latency_ms, size_mb or gflops; equal cost goes
   to the higher metric). Its promoted bundle is the winner's seed with the best ``compare.metric``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from cvpipe.compare import stats
from cvpipe.core.config import Params
from cvpipe.core.errors import StageError

METRICS = ("accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece")
COSTS = ("params_m", "gflops", "size_mb", "latency_ms", "throughput_img_s", "image_size", "trained_epochs")
CHEAPEST = {"latency_ms": "fastest", "size_mb": "smallest", "gflops": "fewest FLOPs"}


@dataclass
class Selection:
    archs: list[dict[str, Any]]  # one aggregated row per architecture, leaderboard order
    cells: list[dict[str, Any]]  # one row per (arch, seed) run, leaderboard order
    winner: Optional[str] = None
    best: Optional[str] = None
    win_cell: Optional[dict[str, Any]] = None
    record: dict[str, Any] = field(default_factory=dict)  # the model card's `selection`


def _interval(ev: dict[str, Any], metric: str) -> tuple[Optional[float], Optional[float]]:
    iv = (ev.get("intervals") or {}).get(metric) or {}
    return iv.get("low"), iv.get("high")


def aggregate_archs(cells: list[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """One row per architecture (params order): means over its seeds, and std / intervals of compare.metric."""
    cp, level = params.compare, 1 - params.compare.alpha
    rows = []
    for arch in dict.fromkeys(c["arch"] for c in cells):
        mine = [c for c in cells if c["arch"] == arch]
        for c in mine:
            c["kind"] = "seed"
            c["ci_low"], c["ci_high"] = _interval(c["_eval"], cp.metric)
            c["ci"] = "evaluate" if c["ci_low"] is not None else ""
        row: dict[str, Any] = {"kind": "arch", "arch": arch, "seed": " ".join(str(c["seed"]) for c in mine),
                               "seeds": len(mine)}
        for k in (*METRICS, *COSTS):
            vals = [c.get(k) for c in mine if c.get(k) is not None]
            row[k] = sum(vals) / len(vals) if vals else None
        if row[cp.metric] is None or any(c.get(cp.metric) is None for c in mine):
            raise StageError(f"compare.metric: {cp.metric} is undefined for {arch} (see its runs' evaluate.json)")
        if row[cp.cost] is None:
            raise StageError(f"compare.cost: {cp.cost} is unknown for {arch} (see the cost in its runs' evaluate.json)")
        agg = stats.aggregate([c[cp.metric] for c in mine], level)
        if agg["ci_low"] is not None:  # every compare.metric lies in [0, 1]: truncating keeps the coverage
            agg["ci_low"], agg["ci_high"] = max(0.0, agg["ci_low"]), min(1.0, agg["ci_high"])
        lows = [c["ci_low"] for c in mine if c["ci_low"] is not None]
        highs = [c["ci_high"] for c in mine if c["ci_high"] is not None]
        row["test_ci_low"] = sum(lows) / len(lows) if lows else None
        row["test_ci_high"] = sum(highs) / len(highs) if highs else None
        row["std"] = agg["std"]
        if agg["ci_low"] is not None:
            row["ci_low"], row["ci_high"], row["ci"] = agg["ci_low"], agg["ci_high"], f"t, {len(mine)} seeds"
        else:
            row["ci_low"], row["ci_high"] = row["test_ci_low"], row["test_ci_high"]
            row["ci"] = "evaluate" if row["ci_low"] is not None else ""
        row["eligible"] = (cp.max_latency_ms is None or row["latency_ms"] <= cp.max_latency_ms) and (
            cp.max_size_mb is None or row["size_mb"] <= cp.max_size_mb)
        rows.append(row)
    return rows


def outcomes(cells: list[dict[str, Any]]) -> dict[str, stats.Outcomes]:
    """Each architecture's per-image outcomes, stacked over its seeds, after checking every run scored the same
    test images in the same order."""
    preds = [stats.read_predictions(c["_dir"], c.get("run") or f"{c['arch']}/seed{c['seed']}") for c in cells]
    stats.check_aligned(preds)
    classes = sorted(set().union(*(set(p.actual) | set(p.predicted) for p in preds)))
    out = {}
    for arch in dict.fromkeys(c["arch"] for c in cells):
        mine = [(c, p) for c, p in zip(cells, preds) if c["arch"] == arch]
        out[arch] = stats.stack([p for _, p in mine], [c["seed"] for c, _ in mine], classes)
    return out


def select(cells: list[dict[str, Any]], params: Params, per_image: dict[str, stats.Outcomes]) -> Selection:
    """Apply the rule (module docstring) to the bake-off's runs; ``per_image`` from :func:`outcomes`."""
    cp = params.compare
    archs = aggregate_archs(cells, params)
    eligible = sorted((r for r in archs if r["eligible"]), key=lambda r: (-r[cp.metric], r[cp.cost]))
    by_arch = {r["arch"]: r for r in archs}

    def test(a: str, b: str) -> stats.TestResult:
        return stats.paired_test(per_image[a], per_image[b], cp.metric, cp.alpha, cp.resamples, cp.seed)

    groups = stats.tie_groups([r["arch"] for r in eligible], test, cp.alpha, cp.correction)
    for r in archs:
        res = groups.vs_best.get(r["arch"])
        r["tie_group"] = groups.letter.get(r["arch"], "")
        r.update({"p_value": res.p_value, "p_adjusted": res.p_adjusted, "test": res.test, "diff": res.diff} if res else
                 {"p_value": None, "p_adjusted": None, "test": "", "diff": None})
    archs.sort(key=lambda r: (not r["eligible"], r["tie_group"] or "~", -r[cp.metric], r[cp.cost]))
    front = pareto_front([(r["latency_ms"], r[cp.metric]) for r in archs])
    for i, (r, f) in enumerate(zip(archs, front), 1):
        r["rank"], r["pareto"], r["promoted"] = i, f, False
    rank = {r["arch"]: r["rank"] for r in archs}
    cells = sorted(cells, key=lambda c: (rank[c["arch"]], -c[cp.metric], c["seed"]))
    for c in cells:
        a = by_arch[c["arch"]]
        c.update(rank=a["rank"], eligible=a["eligible"], tie_group=a["tie_group"], pareto=a["pareto"], promoted=False)
    sel = Selection(archs=archs, cells=cells)
    if not eligible:
        return sel
    sel.best = eligible[0]["arch"]
    tied = [r for r in eligible if r["tie_group"] == "A"]
    win = min(tied, key=lambda r: (r[cp.cost], -r[cp.metric]))
    sel.winner = win["arch"]
    win["promoted"] = True
    sel.win_cell = next(c for c in cells if c["arch"] == sel.winner)  # its best seed (cells sorted by metric)
    sel.win_cell["promoted"] = True
    sel.record = _record(sel, eligible, groups, params)
    return sel


def _record(sel: Selection, eligible: list[dict[str, Any]], groups: stats.Groups, params: Params) -> dict[str, Any]:
    """The model card's ``selection``: the rule, the tests and p-values per contender, the tie group and why."""
    cp = params.compare
    tied = [r["arch"] for r in eligible if r["tie_group"] == "A"]
    return {
        "rule": (f"the best eligible architecture by mean {cp.metric} over seeds is tested against each other one on "
                 f"the same test images; among those not significantly worse ({cp.correction}-adjusted p >= {cp.alpha}),"
                 f" the one with the lowest {cp.cost} is promoted"),
        "metric": cp.metric, "alpha": cp.alpha, "correction": cp.correction, "cost": cp.cost,
        "max_latency_ms": cp.max_latency_ms, "max_size_mb": cp.max_size_mb, "resamples": cp.resamples, "seed": cp.seed,
        "seeds": list(params.bakeoff.seeds), "candidates": [r["arch"] for r in sel.archs],
        "eligible": [r["arch"] for r in eligible], "best": sel.best, "tie_group": tied, "winner": sel.winner,
        "promoted_run": sel.win_cell.get("run") if sel.win_cell else None,
        "contenders": {a: {**res.as_dict(), "tied": a in tied} for a, res in groups.vs_best.items()},
        "aggregate": {r["arch"]: {k: r[k] for k in (cp.metric, "std", "ci_low", "ci_high", "ci", "seeds", cp.cost)}
                      for r in sel.archs},
        "why": why(sel, eligible, groups, params),
    }


def why(sel: Selection, eligible: list[dict[str, Any]], groups: stats.Groups, params: Params) -> str:
    """One sentence: why the winner won."""
    cp = params.compare
    win = next(r for r in eligible if r["arch"] == sel.winner)
    tied = [r for r in eligible if r["tie_group"] == "A"]
    val = f"mean {cp.metric} {win[cp.metric]:.4f} over {win['seeds']} seed{'s' if win['seeds'] > 1 else ''}"
    if len(eligible) == 1:
        return f"{sel.winner}: the only eligible model ({val})"
    untested = [a for a, res in groups.vs_best.items() if res.p_value is None]
    if sel.winner != sel.best:
        p = groups.vs_best[sel.winner].p_adjusted
        return (f"{sel.winner}: not significantly worse than the best, {sel.best} (p={p:.3g}), and the "
                f"{CHEAPEST[cp.cost]} ({cp.cost} {win[cp.cost]:.4g}) of the {len(tied)} models tied within noise ({val})")
    if len(tied) > 1:
        return (f"{sel.winner}: the best ({val}) and the {CHEAPEST[cp.cost]} ({cp.cost} {win[cp.cost]:.4g}) of the "
                f"{len(tied)} models tied within noise")
    if untested:
        return (f"{sel.winner}: the best ({val}); {cp.metric} could not be tested pairwise "
                f"({groups.vs_best[untested[0]].note}), so no cheaper model was promoted")
    p = max(res.p_adjusted for res in groups.vs_best.values())
    return f"{sel.winner}: the best ({val}) and every other eligible model is significantly worse (largest p={p:.3g})"


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """True where no other point has cost <= and score >= with one strictly better (cost lower is better)."""
    out = []
    for i, (c, s) in enumerate(points):
        dominated = any((c2 <= c and s2 >= s and (c2 < c or s2 > s)) for j, (c2, s2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out
