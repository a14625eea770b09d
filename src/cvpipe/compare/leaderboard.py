"""compare's outputs for people: leaderboard.csv / .md, the terminal table and the Pareto plot.

leaderboard.csv holds one ``kind=arch`` row per architecture (means over seeds, the interval of compare.metric, the
tie group, the test and p-value against the best, ``promoted``) followed by one ``kind=seed`` row per run; the
markdown and the terminal table show the aggregated rows, the markdown then the per-seed rows.
"""

from __future__ import annotations

from typing import Any, Optional

from cvpipe.compare.rule import CHEAPEST, Selection, pareto_front
from cvpipe.core import storage
from cvpipe.core.config import Params

COLUMNS = [
    "kind", "rank", "arch", "seed", "run", "tie_group", "promoted", "accuracy", "top_k_accuracy", "macro_f1",
    "weighted_f1", "roc_auc", "ece", "std", "ci_low", "ci_high", "ci", "test_ci_low", "test_ci_high", "diff", "p_value",
    "p_adjusted", "test", "params_m", "gflops", "size_mb", "latency_ms", "throughput_img_s", "image_size",
    "trained_epochs", "eligible", "pareto",
]
MD_ARCH = ["rank", "arch", "tie_group", "promoted", "{metric}", "std", "interval", "seeds", "p_adjusted", "diff",
           "accuracy", "macro_f1", "ece", "gflops", "size_mb", "latency_ms", "throughput_img_s", "eligible", "pareto"]
MD_SEED = ["arch", "seed", "run", "{metric}", "interval", "accuracy", "macro_f1", "ece", "latency_ms", "promoted"]
TABLE_COLUMNS = ("rank", "arch", "accuracy", "ci", "tie", "p", "macro_f1", "size_mb", "latency_ms", "throughput_img_s",
                 "eligible", "pareto")  # fits a 160-column log; leaderboard.md has every column


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def interval(r: dict[str, Any]) -> str:
    """``[low, high]`` of compare.metric, or empty when there is none."""
    if r.get("ci_low") is None or r.get("ci_high") is None:
        return ""
    return f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"


def _cell(r: dict[str, Any], col: str) -> str:
    if col == "interval":
        return interval(r) + (f" ({r['ci']})" if r.get("ci") and interval(r) else "")
    if col in ("p_adjusted", "p_value") and r.get(col) is not None:
        return f"{r[col]:.3g}"
    return _fmt(r.get(col))


def _table(rows: list[dict[str, Any]], cols: list[str], bold: Optional[str] = None) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    return head + "".join(
        "| " + " | ".join(f"**{_cell(r, c)}**" if c == "arch" and bold and r.get("promoted") else _cell(r, c)
                          for c in cols) + " |\n" for r in rows)


def leaderboard_md(sel: Selection, params: Params) -> str:
    cp = params.compare
    metric = cp.metric
    limits = ", ".join(x for x in (f"latency <= {cp.max_latency_ms} ms" if cp.max_latency_ms else "",
                                   f"size <= {cp.max_size_mb} MB" if cp.max_size_mb else "") if x) or "none"
    arch_cols = list(dict.fromkeys(c.format(metric=metric) for c in MD_ARCH))  # the metric once, where it is accuracy
    seed_cols = list(dict.fromkeys(c.format(metric=metric) for c in MD_SEED))
    why = sel.record.get("why", "no eligible model")
    return (
        f"# Leaderboard\n\nRanked by mean `{metric}` over the seeds {list(params.bakeoff.seeds)} (test split); "
        f"limits: {limits}. Winner: **{sel.winner}**. Why: {why}.\n\n"
        f"Rule: the best eligible architecture is tested against each other one on the same test images "
        f"({_tests(sel)}); `p_adjusted` is {cp.correction}-adjusted, `diff` = best - this one. Tie group A = not "
        f"significantly worse than the best (p_adjusted >= {cp.alpha}); B, C, ... are tied among themselves the same "
        f"way. The {CHEAPEST[cp.cost]} of group A by `{cp.cost}` is promoted. `interval`: {1 - cp.alpha:.0%} "
        "Student-t interval of the mean over seeds (t, 2+ seeds; within [0, 1]), else evaluate's test-set interval "
        "(evaluate).\n"
        "latency_ms: median batch-1 fp32 eager forward on this machine; throughput at evaluate.throughput_batch; "
        "size_mb: ONNX file; gflops: FlopCounterMode at batch 1; pareto: on the accuracy-vs-latency front.\n\n"
        + _table(sel.archs, arch_cols, bold="promoted")
        + "\n## Runs (one per seed)\n\n`interval`: evaluate's test-set interval of the run.\n\n"
        + _table(sel.cells, seed_cols, bold="promoted")
    )


def _tests(sel: Selection) -> str:
    names = sorted({r["test"] for r in sel.archs if r.get("test")})
    return "; ".join(names) or "no contender"


def leaderboard_table(rows: list[dict[str, Any]], metric: str, winner: Optional[str]):
    """The aggregated leaderboard as a rich table for the terminal: the ranking metric with its interval, the tie
    group and the p-value against the best, quality, cost and eligibility; the promoted row in bold."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    cols = list(TABLE_COLUMNS) if metric in TABLE_COLUMNS else [*TABLE_COLUMNS[:3], metric, *TABLE_COLUMNS[3:]]
    table = Table(title=f"leaderboard by {metric} (ci: its interval; tie: group tied within noise, A = with the best; "
                        "p: adjusted p-value against the best)",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for c in cols:
        table.add_column(c, justify="left" if c in ("arch", "tie") else "right", style="bold" if c == metric else None)
    for r in rows:
        vals = {"ci": interval(r), "tie": r.get("tie_group", ""),
                "p": "" if r.get("p_adjusted") is None else f"{r['p_adjusted']:.3g}"}
        table.add_row(*(Text(vals[c] if c in vals else _fmt(r.get(c))) for c in cols),
                      style="bold green" if r["arch"] == winner else None)
    return table


def plot_pareto(rows: list[dict[str, Any]], metric: str, path: str, winner: Optional[str]) -> None:
    """Mean metric vs batch-1 latency and vs ONNX size, one point per architecture, with the interval of the
    metric as a vertical error bar; the Pareto front dashed, the winner a red star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for ax, cost, label in ((axes[0], "latency_ms", "batch-1 latency (ms)"), (axes[1], "size_mb", "ONNX size (MB)")):
        pts = [(r[cost], r[metric]) for r in rows]
        front = pareto_front(pts)
        for r, (x, y), f in zip(rows, pts, front):
            color = "tab:red" if r["arch"] == winner else ("tab:blue" if f else "tab:gray")
            err = None
            if r.get("ci_low") is not None and r.get("ci_high") is not None:
                err = [[max(0.0, y - r["ci_low"])], [max(0.0, r["ci_high"] - y)]]
            ax.errorbar([x], [y], yerr=err, fmt="*" if r["arch"] == winner else "o", color=color, ms=9 if r["arch"] == winner else 7,
                        capsize=4, elinewidth=1.2, zorder=3)
            ax.annotate(f"{r['arch']} ({r.get('tie_group') or '-'})", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        fp = sorted(p for p, f in zip(pts, front) if f)
        if len(fp) > 1:
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="tab:blue", alpha=0.6, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set(xlabel=label, ylabel=f"test {metric} (mean over seeds)", title=f"{metric} vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
    fig.suptitle("error bars: interval of the mean; (A) = tied with the best within noise", fontsize=9)
    fig.tight_layout()
    storage.save_png(fig, path)
