"""Compare stage: leaderboard of the bake-off, Pareto plots, and promotion of the winner.

Reads ``<paths.exports>/<arch>/`` (written by evaluate: evaluate.json, model.pt, model.onnx,
model.ts, preprocess.json, classes.json, confusion_matrix.png) for every architecture in
``bakeoff.archs``. Writes::

    <paths.reports>/leaderboard.md, leaderboard.csv   one row per architecture, best first
    <paths.reports>/pareto.png                        accuracy vs batch-1 latency and vs model size
    <paths.reports>/compare.json                      winner and why (DVC metrics)
    <paths.models>/best/                              the winner (compare.promote), written atomically:
        model.pt model.onnx model.ts preprocess.json classes.json card.json
        confusion_matrix.png leaderboard.md leaderboard.csv

The winner is the highest ``compare.metric`` among the models within ``compare.max_latency_ms``
and ``compare.max_size_mb``; ties go to the lower latency.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.core.console import info, print_table
from cvpipe.core.errors import StageError

BUNDLE = ("model.pt", "model.onnx", "model.ts", "preprocess.json", "classes.json", "confusion_matrix.png")
COLUMNS = [
    "rank", "arch", "accuracy", "top_k_accuracy", "macro_f1", "weighted_f1", "roc_auc", "ece", "params_m", "gflops",
    "size_mb", "latency_ms", "throughput_img_s", "image_size", "trained_epochs", "eligible", "pareto",
]


def gather(params: Params) -> list[dict[str, Any]]:
    rows = []
    for arch in params.bakeoff.archs:
        path = storage.join(params.paths.exports, arch, "evaluate.json")
        if not storage.exists(path):
            raise StageError(f"no evaluation of {arch} at {path}: run `cvpipe evaluate --arch {arch}` (export on) first")
        ev = storage.read_json(path)
        cost = ev["cost"]
        rows.append({
            "arch": arch, "accuracy": ev["accuracy"], "top_k_accuracy": ev.get("top_k_accuracy"), "macro_f1": ev["macro_f1"],
            "weighted_f1": ev["weighted_f1"], "roc_auc": ev.get("roc_auc"), "ece": ev["ece"], "params_m": cost["params_m"],
            "gflops": cost["gflops"], "size_mb": cost["size_mb"], "latency_ms": cost["latency_ms"],
            "throughput_img_s": cost["throughput_img_s"], "image_size": ev["image_size"], "trained_epochs": ev["trained_epochs"],
            "_eval": ev,
        })
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """True where no other point has cost <= and score >= with one strictly better (cost lower is better)."""
    out = []
    for i, (c, s) in enumerate(points):
        dominated = any((c2 <= c and s2 >= s and (c2 < c or s2 > s)) for j, (c2, s2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def rank(rows: list[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    cp = params.compare
    metric = cp.metric
    for r in rows:
        if r[metric] is None:
            raise StageError(f"compare.metric: {metric} is undefined for {r['arch']} (see its evaluate.json)")
        r["eligible"] = (cp.max_latency_ms is None or r["latency_ms"] <= cp.max_latency_ms) and (
            cp.max_size_mb is None or r["size_mb"] <= cp.max_size_mb
        )
    front = pareto_front([(r["latency_ms"], r[metric]) for r in rows])
    for r, f in zip(rows, front):
        r["pareto"] = f
    rows = sorted(rows, key=lambda r: (not r["eligible"], -r[metric], r["latency_ms"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def leaderboard_md(rows: list[dict[str, Any]], params: Params, winner: str) -> str:
    cp = params.compare
    limits = ", ".join(x for x in (f"latency <= {cp.max_latency_ms} ms" if cp.max_latency_ms else "",
                                   f"size <= {cp.max_size_mb} MB" if cp.max_size_mb else "") if x) or "none"
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    body = "".join("| " + " | ".join(("**" + _fmt(r[c]) + "**") if c == "arch" and r["arch"] == winner else _fmt(r[c])
                                     for c in COLUMNS) + " |\n" for r in rows)
    return (
        f"# Leaderboard\n\nRanked by `{cp.metric}` (test split); limits: {limits}. Winner: **{winner}**.\n"
        "latency_ms: median batch-1 fp32 eager forward on this machine; throughput at evaluate.throughput_batch; "
        "size_mb: ONNX file; gflops: FlopCounterMode at batch 1; pareto: on the accuracy-vs-latency front.\n\n"
        + head + body
    )


TABLE_COLUMNS = ("rank", "arch", "accuracy", "macro_f1", "ece", "params_m", "size_mb", "latency_ms", "throughput_img_s",
                 "eligible", "pareto")


def leaderboard_table(rows: list[dict[str, Any]], metric: str, winner: str):
    """The leaderboard as a rich table for the terminal (leaderboard.md has every column): the ranking
    metric, quality, cost and eligibility, the winner's row in bold."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    cols = list(TABLE_COLUMNS) if metric in TABLE_COLUMNS else [*TABLE_COLUMNS[:3], metric, *TABLE_COLUMNS[3:]]
    table = Table(title=f"leaderboard by {metric}", title_justify="left", box=box.SIMPLE_HEAD)
    for c in cols:
        table.add_column(c, justify="left" if c == "arch" else "right", style="bold" if c == metric else None)
    for r in rows:
        table.add_row(*(Text(_fmt(r[c])) for c in cols), style="bold green" if r["arch"] == winner else None)
    return table


def plot_pareto(rows: list[dict[str, Any]], metric: str, path: str, winner: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    for ax, cost, label in ((axes[0], "latency_ms", "batch-1 latency (ms)"), (axes[1], "size_mb", "ONNX size (MB)")):
        pts = [(r[cost], r[metric]) for r in rows]
        front = pareto_front(pts)
        for r, (x, y), f in zip(rows, pts, front):
            ax.scatter([x], [y], s=60, color="tab:red" if r["arch"] == winner else ("tab:blue" if f else "tab:gray"),
                       marker="*" if r["arch"] == winner else "o", zorder=3)
            ax.annotate(r["arch"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        fp = sorted(p for p, f in zip(pts, front) if f)
        if len(fp) > 1:
            ax.plot([p[0] for p in fp], [p[1] for p in fp], "--", color="tab:blue", alpha=0.6, label="Pareto front")
            ax.legend(loc="lower right", fontsize=8)
        ax.set(xlabel=label, ylabel=f"test {metric}", title=f"{metric} vs {label.split(' (')[0]}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    storage.save_png(fig, path)


def model_card(win: dict[str, Any], params: Params, ckpt: dict[str, Any]) -> dict[str, Any]:
    ev = win["_eval"]
    tp = (ckpt.get("params") or {}).get("train", {})
    return {
        "arch": win["arch"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "selected_by": {"metric": params.compare.metric, "max_latency_ms": params.compare.max_latency_ms,
                        "max_size_mb": params.compare.max_size_mb, "candidates": list(params.bakeoff.archs)},
        "classes": ev["classes"],
        "data_version": {"prepared_fingerprint": ev.get("data_version"), "checkpoint_dataset_hash": ckpt.get("dataset_hash"),
                         "label_review": ev.get("label_review")},  # labels corrected in review since the previous version
        "metrics": {k: v for k, v in ev.items() if k not in ("cost", "export_parity")},
        "cost": ev["cost"],
        "export_parity": ev["export_parity"],
        "params": {
            "train": {k: tp.get(k) for k in ("arch", "pretrained", "finetune", "epochs", "batch_size", "lr", "optimizer",
                                              "scheduler", "weight_decay", "label_smoothing", "ema", "seed", "amp")},
            "preprocess": (ckpt.get("params") or {}).get("preprocess"),
            "evaluate": {"checkpoint": ev["checkpoint"], "weights": ev["weights"], "tta_flip": ev["tta_flip"]},
            "bakeoff_overrides": params.bakeoff.archs.get(win["arch"], {}),
        },
        "train_wandb_run_id": ckpt.get("wandb_run_id"),
        "files": {"weights": "model.pt", "onnx": "model.onnx", "torchscript": "model.ts", "preprocess": "preprocess.json",
                  "classes": "classes.json"},
    }


def run(params: Params) -> dict[str, Any]:
    from cvpipe.torchkit.models import load_checkpoint

    rows = rank(gather(params), params)
    eligible = [r for r in rows if r["eligible"]]
    if not eligible:
        cp = params.compare
        raise StageError(
            f"no model meets the limits (compare.max_latency_ms={cp.max_latency_ms}, compare.max_size_mb={cp.max_size_mb}): "
            + ", ".join(f"{r['arch']} {r['latency_ms']:.2f} ms {r['size_mb']:.1f} MB" for r in rows)
        )
    win = eligible[0]
    rep = params.paths.reports
    md = leaderboard_md(rows, params, win["arch"])
    storage.write_text(storage.join(rep, "leaderboard.md"), md)
    storage.write_csv(storage.join(rep, "leaderboard.csv"), COLUMNS, rows)
    plot_pareto(rows, params.compare.metric, storage.join(rep, "pareto.png"), win["arch"])
    summary = {
        "winner": win["arch"], "metric": params.compare.metric, "value": win[params.compare.metric],
        "latency_ms": win["latency_ms"], "size_mb": win["size_mb"], "candidates": len(rows), "eligible": len(eligible),
        "promoted": bool(params.compare.promote),
    }
    storage.write_json(storage.join(rep, "compare.json"), summary)
    print_table(leaderboard_table(rows, params.compare.metric, win["arch"]))

    src = storage.join(params.paths.exports, win["arch"])
    ckpt = load_checkpoint(storage.join(src, "model.pt"))
    card = model_card(win, params, ckpt)
    if params.compare.promote:
        with storage.staged_dir(storage.join(params.paths.models, "best")) as folder:
            for name in BUNDLE:
                with open(folder / name, "wb") as fh:
                    fh.write(storage.read_bytes(storage.join(src, name)))
            (folder / "card.json").write_text(json.dumps(card, indent=2, default=storage._json_default) + "\n")
            (folder / "leaderboard.md").write_text(md)
            storage.write_csv(folder / "leaderboard.csv", COLUMNS, rows, durable=False)

    tracker = tracking.start(
        params, job_type="compare", name="compare",
        config={"compare": params.compare.model_dump(), "bakeoff": params.bakeoff.model_dump()},
        group=params.wandb.group or params.bakeoff.group or tracking.group_name(params, ckpt.get("dataset_hash")), tags=["compare", *params.bakeoff.archs],
    )
    with tracker:
        tracker.summary({f"compare/{k}": v for k, v in summary.items()})
        try:
            import wandb

            tracker.log({
                "compare/leaderboard": wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows]),
                "compare/pareto": tracker.image(storage.join(rep, "pareto.png")),
            })
        except Exception as exc:  # tracking never fails the stage
            info(f"W&B tables skipped: {exc}")
    info(
        f"compared {len(rows)} models by {params.compare.metric}: winner {win['arch']} ({win[params.compare.metric]:.4f}, "
        f"{win['latency_ms']:.2f} ms, {win['size_mb']:.1f} MB)" + (f"; promoted to {storage.join(params.paths.models, 'best')}" if params.compare.promote else "")
    )
    return summary
