"""Evaluate stage: test-split metrics and plots for a trained model.

Reads ``evaluate.*``, the checkpoint ``<paths.models>/<arch>/<evaluate.checkpoint>.pt``
and the prepared test split. Writes::

    <paths.metrics>/<arch>/evaluate.json     accuracy, macro-F1, per-class report (DVC metrics)
    <paths.plots>/<arch>/confusion.csv       actual,predicted per test image (DVC confusion plot)
    <paths.plots>/<arch>/confusion_matrix.png
    <paths.plots>/<arch>/predictions.csv     per-image prediction and confidence

and logs the summary, a confusion-matrix plot and a predictions table to W&B.
Metrics come from scikit-learn.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Optional

import numpy as np

from cvpipe import storage, tracking
from cvpipe.config import Params
from cvpipe.console import info
from cvpipe.dataset import PreparedDataset
from cvpipe.errors import StageError
from cvpipe.models import load_checkpoint, model_from_checkpoint
from cvpipe.runtime import resolve_runtime


def classification_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    preds = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    report = classification_report(
        targets, preds, labels=labels, target_names=classes, output_dict=True, zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(targets, preds)),
        "macro_f1": float(f1_score(targets, preds, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(targets, preds, labels=labels, average="weighted", zero_division=0)),
        "n": int(len(targets)),
        "per_class": {
            c: {k: round(float(v), 6) for k, v in report[c].items()} for c in classes
        },
        "confusion_matrix": confusion_matrix(targets, preds, labels=labels).tolist(),
    }


def plot_confusion(cm: np.ndarray, classes: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(classes)
    size = max(4.0, min(16.0, 0.6 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def output_paths(params: Params, name: Optional[str] = None) -> dict[str, str]:
    name = name or params.train.arch
    return {
        "metrics": storage.join(params.paths.metrics, name, "evaluate.json"),
        "confusion_csv": storage.join(params.paths.plots, name, "confusion.csv"),
        "confusion_png": storage.join(params.paths.plots, name, "confusion_matrix.png"),
        "predictions": storage.join(params.paths.plots, name, "predictions.csv"),
    }


def run(params: Params) -> dict[str, Any]:
    import torch

    from cvpipe.train import ArrayDataset, BatchNormalizer, evaluate_loader, make_loader

    ep = params.evaluate
    name = params.train.arch
    ckpt_path = storage.join(params.paths.models, name, f"{ep.checkpoint}.pt")
    ckpt = load_checkpoint(ckpt_path)
    ds = PreparedDataset(params.paths.prepared)
    if list(ckpt["classes"]) != ds.classes:
        raise StageError(f"{ckpt_path} was trained on classes {ckpt['classes']}, the dataset has {ds.classes}")
    test = ds.split("test")
    if len(test) == 0:
        raise StageError("the test split is empty: give split.test a fraction > 0")

    rt = resolve_runtime(params.train.device, params.train.amp, params.train.channels_last, key="train")
    model = model_from_checkpoint(ckpt).to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    normalize = BatchNormalizer(ckpt["normalize"]["mean"], ckpt["normalize"]["std"], rt)
    loader = make_loader(ArrayDataset(test), ep.batch_size, False, 0, 0, pin=False)
    res = evaluate_loader(model, loader, normalize, rt)
    probs, targets = res["probs"], res["targets"]

    m = classification_metrics(targets, probs, ds.classes)
    out = output_paths(params, name)
    metrics = {
        "arch": name,
        "checkpoint": ep.checkpoint,
        "trained_epochs": int(ckpt["epoch"]),
        "accuracy": round(m["accuracy"], 6),
        "macro_f1": round(m["macro_f1"], 6),
        "weighted_f1": round(m["weighted_f1"], 6),
        "n_test": m["n"],
        "per_class": m["per_class"],
    }
    storage.write_json(out["metrics"], metrics)

    preds = probs.argmax(axis=1)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["actual", "predicted"])
    w.writerows((ds.classes[t], ds.classes[p]) for t, p in zip(targets, preds))
    storage.write_text(out["confusion_csv"], buf.getvalue())

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "id", "source_uri", "actual", "predicted", "confidence"])
    for i, (t, p) in enumerate(zip(targets, preds)):
        row = test.index[i]
        w.writerow([i, row["id"], row["source_uri"], ds.classes[t], ds.classes[p], f"{probs[i, p]:.6f}"])
    storage.write_text(out["predictions"], buf.getvalue())

    cm = np.asarray(m["confusion_matrix"])
    plot_confusion(cm, ds.classes, out["confusion_png"], f"{name}: test accuracy {m['accuracy']:.3f} (n={m['n']})")

    tracker = tracking.start(
        params,
        job_type="evaluate",
        name=f"evaluate-{name}",
        config={**params.resolved(), "arch": name, "checkpoint": ckpt_path, "train_run_id": ckpt.get("wandb_run_id")},
        tags=[name],
    )
    with tracker:
        tracker.summary({f"test/{k}": metrics[k] for k in ("accuracy", "macro_f1", "weighted_f1", "n_test")})
        try:
            import wandb

            tracker.log(
                {
                    "test/confusion_matrix": wandb.plot.confusion_matrix(
                        y_true=targets.tolist(), preds=preds.tolist(), class_names=ds.classes
                    ),
                    "test/confusion_matrix_png": tracker.image(out["confusion_png"]),
                    "test/per_class": wandb.Table(
                        columns=["class", "precision", "recall", "f1", "support"],
                        data=[[c, v["precision"], v["recall"], v["f1-score"], v["support"]] for c, v in m["per_class"].items()],
                    ),
                }
            )
        except Exception as exc:  # tracking never fails the stage
            info(f"W&B tables skipped: {exc}")
    info(f"evaluated {name} on {m['n']} test images: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    return metrics
