"""Compare stage: leaderboard of the bake-off, Pareto plots, and promotion of the winner.

Reads ``<paths.exports>/<arch>/seed<seed>/`` (written by evaluate: evaluate.json, predictions.csv, model.pt,
model.onnx, model.ts, preprocess.json, classes.json, confusion_matrix.png) for every cell of the bake-off
(``bakeoff.archs`` x ``bakeoff.seeds``, :func:`gather`). Writes::

    <paths.reports>/leaderboard.md, leaderboard.csv   one row per architecture (mean over seeds, interval,
                                                      tie group, p-value vs the best), then one per run
    <paths.reports>/pareto.png                        metric vs batch-1 latency and vs size, intervals as error bars
    <paths.reports>/compare.json                      headline (DVC metrics): winner, value, interval, p, counts
    <paths.reports>/selection.json                    the rule, every test and p-value, the tie group and why
    <paths.models>/best/                              the winner (compare.promote), written atomically:
        model.pt model.onnx model.ts preprocess.json classes.json card.json
        confusion_matrix.png leaderboard.md leaderboard.csv model.safetensors config.json

and to W&B the leaderboard, the use of every run's ``model-<arch>-seed<seed>`` artifact, and the promoted
folder as ``model-promoted``, linked into the registry (``wandb.registry``) under the alias ``best``.

The winner (:mod:`cvpipe.compare.rule`): the eligible architectures (``compare.max_latency_ms``,
``compare.max_size_mb``) not significantly worse than the best by ``compare.metric`` on the same test images
(paired tests, :mod:`cvpipe.compare.stats`) form the tie group; its cheapest by ``compare.cost`` is promoted.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from cvpipe.compare import rule
from cvpipe.compare.leaderboard import COLUMNS, leaderboard_md, leaderboard_table, plot_pareto
from cvpipe.core import storage, tracking
from cvpipe.core.config import Params, run_name
from cvpipe.core.console import info, print_table
from cvpipe.core.errors import StageError

__all__ = ["BUNDLE", "COLUMNS", "gather", "headline", "leaderboard_table", "model_card", "run"]

BUNDLE = ("model.pt", "model.onnx", "model.ts", "preprocess.json", "classes.json", "confusion_matrix.png",
          "model.safetensors", "config.json")


def gather(params: Params) -> list[dict[str, Any]]:
    """One row per bake-off cell (``params.bakeoff.cells()``: every architecture x seed), read from the cell's
    bundle ``<paths.exports>/<arch>/seed<seed>/evaluate.json``. Each row carries ``arch``, ``seed``, ``run``
    (``run_name``), the headline metrics and costs, ``_eval`` (the full evaluate.json) and ``_dir`` (the bundle
    folder, which promotion copies from)."""
    rows = []
    for arch, seed in params.bakeoff.cells():
        run = run_name(arch, seed)
        folder = storage.join(params.paths.exports, run)
        path = storage.join(folder, "evaluate.json")
        if not storage.exists(path):
            raise StageError(
                f"no evaluation of {run} at {path}: run `cvpipe evaluate --arch {arch} --seed {seed}` (export on) "
                "first, or `dvc repro` (bakeoff.archs x bakeoff.seeds)"
            )
        ev = storage.read_json(path)
        cost = ev["cost"]
        rows.append({
            "arch": arch, "seed": seed, "run": run,
            "accuracy": ev["accuracy"], "top_k_accuracy": ev.get("top_k_accuracy"), "macro_f1": ev["macro_f1"],
            "weighted_f1": ev["weighted_f1"], "roc_auc": ev.get("roc_auc"), "ece": ev["ece"], "params_m": cost["params_m"],
            "gflops": cost["gflops"], "size_mb": cost["size_mb"], "latency_ms": cost["latency_ms"],
            "throughput_img_s": cost["throughput_img_s"], "image_size": ev["image_size"], "trained_epochs": ev["trained_epochs"],
            "_eval": ev, "_dir": folder,
        })
    return rows


def model_card(cell: dict[str, Any], params: Params, ckpt: dict[str, Any], sel: Any) -> dict[str, Any]:
    """card.json of the promoted run: its test metrics and cost, the data version, a params summary, and
    ``selection``: the rule, the tests and p-values per contender, the tie group and why the winner won."""
    ev = cell["_eval"]
    tp = (ckpt.get("params") or {}).get("train", {})
    return {
        "arch": cell["arch"],
        "seed": cell.get("seed"),
        "run": cell.get("run"),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "selection": sel.record,
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
            "bakeoff_overrides": params.bakeoff.archs.get(cell["arch"], {}),
        },
        "train_wandb_run_id": ckpt.get("wandb_run_id"),
        "files": {"weights": "model.pt", "onnx": "model.onnx", "torchscript": "model.ts", "preprocess": "preprocess.json",
                  "classes": "classes.json", "safetensors": "model.safetensors", "timm_config": "config.json"},
        # the same weights in W&B: the artifact compare used, and the registry collection it links them into
        "wandb": {"model_artifact": tracking.model_artifact(cell["arch"], cell["seed"]),
                  "registry": params.wandb.registry, "alias": tracking.PROMOTED_ALIAS},
    }


def headline(sel: Any, params: Params) -> dict[str, Any]:
    """compare.json, a DVC metrics file: the winner's name and six numbers (convention I3: `dvc metrics show` of
    the whole pipeline fits 25 columns): the winner's mean metric and its interval, the adjusted p-value of the best
    against the runner-up (second by mean metric; null with one eligible model), the candidates and the tie group's size."""
    win = next(r for r in sel.archs if r["arch"] == sel.winner)
    elig = [r for r in sel.archs if r["eligible"]]
    runner = max((r for r in elig if r["arch"] != sel.best), key=lambda r: r[params.compare.metric], default=None)
    return {
        "winner": sel.winner, "value": win[params.compare.metric], "ci_low": win["ci_low"], "ci_high": win["ci_high"],
        "p_value": runner["p_adjusted"] if runner else None, "candidates": len(sel.archs),
        "tied": sum(1 for r in elig if r["tie_group"] == "A"),
    }


def _no_winner(sel: Any, params: Params) -> StageError:
    cp = params.compare
    return StageError(
        f"no model meets the limits (compare.max_latency_ms={cp.max_latency_ms}, compare.max_size_mb={cp.max_size_mb}): "
        + ", ".join(f"{r['arch']} {r['latency_ms']:.2f} ms {r['size_mb']:.1f} MB" for r in sel.archs)
    )


def _promote(sel: Any, params: Params, card: dict[str, Any], md: str) -> None:
    """Copy the winning run's bundle, the card and the leaderboard to <paths.models>/best/, atomically."""
    src = sel.win_cell["_dir"]
    with storage.staged_dir(storage.join(params.paths.models, "best")) as folder:
        for name in BUNDLE:
            with open(folder / name, "wb") as fh:
                fh.write(storage.read_bytes(storage.join(src, name)))
        (folder / "card.json").write_text(json.dumps(card, indent=2, default=storage._json_default) + "\n")
        (folder / "leaderboard.md").write_text(md)
        storage.write_csv(folder / "leaderboard.csv", COLUMNS, [*sel.archs, *sel.cells], durable=False)


def run(params: Params) -> dict[str, Any]:
    from cvpipe.torchkit.models import load_checkpoint

    cp, rep = params.compare, params.paths.reports
    cells = gather(params)
    sel = rule.select(cells, params, rule.outcomes(cells))
    if sel.winner is None:
        raise _no_winner(sel, params)
    md = leaderboard_md(sel, params)
    storage.write_text(storage.join(rep, "leaderboard.md"), md)
    storage.write_csv(storage.join(rep, "leaderboard.csv"), COLUMNS, [*sel.archs, *sel.cells])
    storage.write_json(storage.join(rep, "selection.json"), sel.record)
    plot_pareto(sel.archs, cp.metric, storage.join(rep, "pareto.png"), sel.winner)
    summary = headline(sel, params)
    storage.write_json(storage.join(rep, "compare.json"), summary)
    print_table(leaderboard_table(sel.archs, cp.metric, sel.winner))

    ckpt = load_checkpoint(storage.join(sel.win_cell["_dir"], "model.pt"))
    card = model_card(sel.win_cell, params, ckpt, sel)
    if cp.promote:
        _promote(sel, params, card, md)
    _log(params, sel, summary, ckpt)
    info(f"compared {len(sel.archs)} architectures x {len(params.bakeoff.seeds)} seed(s) by {cp.metric}: winner "
         f"{sel.win_cell.get('run') or sel.winner} ({sel.record['why']})"
         + (f"; promoted to {storage.join(params.paths.models, 'best')}" if cp.promote else ""))
    return summary


def _log(params: Params, sel: Any, summary: dict[str, Any], ckpt: dict[str, Any]) -> None:
    """The W&B compare run: the headline, the leaderboard table (every row) and the Pareto plot."""
    rep = params.paths.reports
    tracker = tracking.start(
        params, job_type="compare", name="compare",
        config={"compare": params.compare.model_dump(), "bakeoff": params.bakeoff.model_dump()},
        group=params.wandb.group or params.bakeoff.group or tracking.group_name(params, ckpt.get("dataset_hash")),
        tags=["compare", *params.bakeoff.archs],
    )
    with tracker:
        tracker.summary({f"compare/{k}": v for k, v in summary.items()} | {"compare/why": sel.record["why"]})
        _log_lineage(tracker, params, sel)
        try:
            import wandb

            tracker.log({
                "compare/leaderboard": wandb.Table(columns=COLUMNS, data=[[r.get(c) for c in COLUMNS]
                                                                          for r in [*sel.archs, *sel.cells]],
                                                   allow_mixed_types=True),  # seed: "42 43" for an arch, 42 for a run
                "compare/pareto": tracker.image(storage.join(rep, "pareto.png")),
            })
        except Exception as exc:  # tracking never fails the stage
            info(f"W&B tables skipped: {exc}")


def _log_lineage(tracker: tracking.Tracker, params: Params, sel: Any) -> None:
    """W&B lineage: record using every run's ``model-<arch>-seed<seed>`` artifact (its bundle's model.safetensors +
    config.json, the files evaluate logged), log the promoted folder as ``model-promoted`` (type ``model``) and link
    it into the registry collection ``wandb.registry`` under the alias ``best``."""
    from cvpipe.torchkit import hub

    for cell in sel.cells:
        if not storage.is_remote(cell["_dir"]):
            files = {name: storage.join(cell["_dir"], name) for name in hub.FILES}
            tracker.use_artifact(files, name=tracking.model_artifact(cell["arch"], cell["seed"]), type="model")
    best = storage.join(params.paths.models, "best")
    if not params.compare.promote or storage.is_remote(best):
        return
    win = sel.win_cell
    metadata = {"arch": win["arch"], "seed": win["seed"], "run": win.get("run"), "metric": params.compare.metric,
                "value": win.get(params.compare.metric), "why": sel.record.get("why"),
                "source_artifact": tracking.model_artifact(win["arch"], win["seed"]),
                "sha256": hub.sha256(storage.join(best, hub.WEIGHTS))}
    promoted = tracker.log_artifact(best, name=tracking.PROMOTED_ARTIFACT, type="model", metadata=metadata,
                                    aliases=["latest", tracking.PROMOTED_ALIAS])
    if params.wandb.registry:
        tracker.link_artifact(promoted, params.wandb.registry, [tracking.PROMOTED_ALIAS])

