"""Evaluate stage: honest test-split metrics, plots, model cost and exports for one trained model.

Reads ``evaluate.*``, the checkpoint ``<paths.models>/<arch>/<evaluate.checkpoint>.pt``
(its EMA weights when ``evaluate.weights`` says so) and the prepared test split. Writes::

    <paths.metrics>/<arch>/evaluate.json     top-1/top-k accuracy, macro/weighted P/R/F1, ROC-AUC (one-vs-rest),
                                             ECE, per-class report, confusion matrix, model cost, export parity
    <paths.plots>/<arch>/confusion.csv       actual,predicted per test image (DVC confusion plot)
    <paths.plots>/<arch>/confusion_matrix.png
    <paths.plots>/<arch>/reliability.csv     reliability diagram bins (DVC plot)
    <paths.plots>/<arch>/reliability.png
    <paths.plots>/<arch>/mistakes.png        gallery of the most confident mistakes
    <paths.plots>/<arch>/predictions.csv     per-image prediction, confidence and top-k
    <paths.exports>/<arch>/                  model.pt, model.ts, model.onnx, preprocess.json, classes.json,
                                             evaluate.json, confusion_matrix.png (see cvpipe.evaluate.export)

and logs the summary, a confusion-matrix plot, a per-class table and a predictions
table with images to W&B (same group as the training runs of this data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.core.console import info
from cvpipe.core.errors import StageError
from cvpipe.data.prepared import PreparedDataset
from cvpipe.evaluate.metrics import calibration, classification_metrics, model_cost
from cvpipe.torchkit import evaluation
from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint
from cvpipe.torchkit.runtime import resolve_runtime

SUMMARY_KEYS = (
    "accuracy", "top_k_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision",
    "weighted_recall", "weighted_f1", "roc_auc", "ece", "n_test",
)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: np.ndarray, classes: list[str], path: str, title: str) -> None:
    plt = _plt()
    from sklearn.metrics import ConfusionMatrixDisplay

    n = len(classes)
    size = max(4.0, min(16.0, 0.6 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size), dpi=110)
    ConfusionMatrixDisplay(cm, display_labels=classes).plot(ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    storage.save_png(fig, path)


def plot_reliability(cal: dict[str, Any], path: str, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    bins = cal["bins"]
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    ax.bar(centers, [b["accuracy"] for b in bins], width=width * 0.9, color="tab:blue", alpha=0.7, label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:red", label="bin mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    storage.save_png(fig, path)


def confident_mistakes(targets: np.ndarray, probs: np.ndarray, limit: int) -> list[int]:
    """Test rows predicted wrongly, most confident first."""
    preds = probs.argmax(axis=1)
    wrong = np.flatnonzero(preds != targets)
    order = np.argsort(-probs[wrong, preds[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:limit]]


def plot_mistakes(images, rows: list[int], targets, probs, classes: list[str], path: str, title: str) -> None:
    plt = _plt()
    n = max(1, len(rows))
    cols = min(8, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(1.9 * cols, 2.2 * nrows + 0.4), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, rows):
        p = int(probs[i].argmax())
        ax.imshow(np.asarray(images[i]), interpolation="nearest")
        ax.set_title(f"#{i} true {classes[int(targets[i])]}\npred {classes[p]} {probs[i, p]:.2f}", fontsize=7)
    if not rows:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    storage.save_png(fig, path)


def output_paths(params: Params, name: Optional[str] = None) -> dict[str, str]:
    name = name or params.train.arch
    plots = storage.join(params.paths.plots, name)
    return {
        "metrics": storage.join(params.paths.metrics, name, "evaluate.json"),
        "confusion_csv": storage.join(plots, "confusion.csv"),
        "confusion_png": storage.join(plots, "confusion_matrix.png"),
        "reliability_csv": storage.join(plots, "reliability.csv"),
        "reliability_png": storage.join(plots, "reliability.png"),
        "mistakes_png": storage.join(plots, "mistakes.png"),
        "predictions": storage.join(plots, "predictions.csv"),
        "export_dir": storage.join(params.paths.exports, name),
    }


def choose_weights(ckpt: dict[str, Any], which: str, monitor: str, path: str) -> tuple[str, dict[str, Any]]:
    if which == "auto":
        which = "ema" if (monitor.startswith("ema_") and ckpt.get("ema") is not None) else "model"
    if which == "ema":
        if ckpt.get("ema") is None:
            raise StageError(f"evaluate.weights: ema, but {path} has no EMA weights (train with train.ema: true)")
        return "ema", ckpt["ema"]
    return "model", ckpt["model"]


def predict(model, images: np.ndarray, normalize, rt, batch_size: int, tta_flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (float64; with *tta_flip* averaged with the horizontally flipped image's) and the
    logits of the plain pass over uint8 HWC images: the evaluation pass train's validation runs too."""
    result = evaluation.evaluate(model, evaluation.array_batches(images, batch_size), normalize, rt,
                                 outputs=True, tta_flip=tta_flip)
    return result.probs, result.logits


@dataclass
class _Evaluated:
    """The checkpoint under evaluation and the test split it is scored on."""

    name: str
    ckpt_path: str
    ckpt: dict[str, Any]
    weights: str  # "model" or "ema"
    state_dict: dict[str, Any]
    ds: PreparedDataset
    test: Any  # the test Split


def run(params: Params) -> dict[str, Any]:
    """Score the checkpoint on the test split; write metrics, plots and exports; log them to W&B."""
    ep = params.evaluate
    src = _load(params)
    name, ds, test = src.name, src.ds, src.test
    rt = resolve_runtime(params.train.device, params.train.amp, params.train.channels_last, key="train")
    images = np.asarray(test.images)
    targets = np.asarray(test.labels, dtype=np.int64)
    probs = _test_probabilities(src, rt, images, ep)

    m = classification_metrics(targets, probs, ds.classes, ep.top_k)
    cal = calibration(targets, probs, ep.ece_bins)
    out = output_paths(params, name)
    preds = probs.argmax(axis=1)
    mistakes = confident_mistakes(targets, probs, ep.gallery_size)
    m["mistakes"] = _mistake_rows(mistakes, test, ds.classes, targets, preds, probs)
    cost, parity, metrics = _cost_and_exports(src, rt, images, m, cal, out, ep)
    storage.write_json(out["metrics"], metrics)
    _write_plots(name, ep, ds, test, out, images, targets, preds, probs, m, cal, mistakes)

    _log_wandb(params, name, src.ckpt, src.ckpt_path, metrics, m, targets, preds, probs, images, test, ds.classes, out, mistakes)
    info(
        f"evaluated {name} ({src.weights} weights) on {m['n']} test images: accuracy {m['accuracy']:.4f}, macro-F1 "
        f"{m['macro_f1']:.4f}, ECE {cal['ece']:.4f}, {cost['latency_ms']:.2f} ms/img"
        + (f", export parity {max(parity['torchscript_max_abs_diff'], parity['onnx_max_abs_diff']):.2g}" if parity else "")
    )
    return metrics


def _load(params: Params) -> _Evaluated:
    """The checkpoint ``evaluate.checkpoint`` names, the weights ``evaluate.weights`` picks, and the test split."""
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
    monitor = (ckpt.get("params") or {}).get("train", {}).get("monitor", params.train.monitor)
    weights, state_dict = choose_weights(ckpt, ep.weights, monitor, ckpt_path)
    return _Evaluated(name, ckpt_path, ckpt, weights, state_dict, ds, test)


def _test_probabilities(src: _Evaluated, rt, images: np.ndarray, ep) -> np.ndarray:
    """Softmax probabilities of the chosen weights on the test images, at the train runtime's device and precision."""
    import torch

    from cvpipe.torchkit.loaders import BatchNormalizer

    ckpt = src.ckpt
    model = model_from_checkpoint({**ckpt, "model": src.state_dict}).to(rt.device).eval()
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    normalize = BatchNormalizer(ckpt["normalize"]["mean"], ckpt["normalize"]["std"], rt)
    probs, _ = predict(model, images, normalize, rt, ep.batch_size, ep.tta_flip)
    return probs


def _mistake_rows(mistakes: list[int], test, classes: list[str], targets, preds, probs) -> list[dict[str, Any]]:
    """evaluate.json's most confident mistakes: test row, image id and source, actual, predicted, confidence."""
    return [
        {"row": i, "id": test.index[i]["id"], "source_uri": test.index[i]["source_uri"], "actual": classes[int(targets[i])],
         "predicted": classes[int(preds[i])], "confidence": round(float(probs[i, preds[i]]), 6)} for i in mistakes
    ]


def _cost_and_exports(src: _Evaluated, rt, images: np.ndarray, m: dict[str, Any], cal: dict[str, Any], out: dict[str, str],
                      ep) -> tuple[dict[str, Any], Optional[dict[str, Any]], dict[str, Any]]:
    """(model cost, export parity or None, evaluate.json's metrics): the cost is fp32 eager on this machine;
    with ``evaluate.export``, the TorchScript + ONNX bundle is written and must match the eager logits:
    ONNX Runtime from the raw uint8 test pixels (its input), eager from the normalized tensors."""
    import torch

    from cvpipe.torchkit.loaders import BatchNormalizer

    name, ckpt, weights, ds = src.name, src.ckpt, src.weights, src.ds
    fp32_model = model_from_checkpoint({**ckpt, "model": src.state_dict}).to(rt.device).eval()
    cost = model_cost(fp32_model, ds.image_size, rt.device, ep.latency_runs, ep.throughput_batch,
                      file_bytes=len(storage.read_bytes(src.ckpt_path)))
    cost["checkpoint_bytes"] = cost.pop("file_bytes")
    parity: Optional[dict[str, Any]] = None
    if not ep.export:
        cost["file_bytes"] = cost["checkpoint_bytes"]
        cost["size_mb"] = round(cost["checkpoint_bytes"] / 2**20, 4)
        return cost, parity, _metrics_json(name, ckpt, ep, weights, m, cal, cost, parity, ds)
    from cvpipe.evaluate import export

    cpu_norm = BatchNormalizer(ckpt["normalize"]["mean"], ckpt["normalize"]["std"], _cpu_runtime())
    pixels = np.array(images[: ep.parity_images])  # the uint8 NHWC test pixels: model.onnx's input
    x = cpu_norm(torch.from_numpy(pixels))  # eager's input, normalized as evaluate does
    with storage.staged_dir(out["export_dir"]) as folder:
        sizes = export.write_bundle(folder, ckpt, fp32_model, weights, x[:1])
        parity = export.parity(fp32_model, folder, x, pixels)
        parity["tolerance"] = ep.parity_tolerance
        worst = max(parity["torchscript_max_abs_diff"], parity["onnx_max_abs_diff"])
        if worst > ep.parity_tolerance:
            raise StageError(
                f"export parity failed for {name}: max abs logit difference {worst:.3g} > evaluate.parity_tolerance "
                f"{ep.parity_tolerance:g} (TorchScript {parity['torchscript_max_abs_diff']:.3g}, ONNX {parity['onnx_max_abs_diff']:.3g})"
            )
        cost["onnx_bytes"] = sizes["model.onnx"]
        cost["torchscript_bytes"] = sizes["model.ts"]
        cost["file_bytes"] = sizes["model.onnx"]
        cost["size_mb"] = round(sizes["model.onnx"] / 2**20, 4)
        metrics = _metrics_json(name, ckpt, ep, weights, m, cal, cost, parity, ds)
        (folder / "evaluate.json").write_text(_dumps(metrics))
        plot_confusion(np.asarray(m["confusion_matrix"]), ds.classes, str(folder / "confusion_matrix.png"),
                       f"{name}: test accuracy {m['accuracy']:.3f} (n={m['n']})")
    return cost, parity, metrics


def _write_plots(name, ep, ds, test, out, images, targets, preds, probs, m, cal, mistakes) -> None:
    """The DVC plots: confusion and per-image prediction CSVs, the reliability bins, and their figures."""
    storage.write_csv(out["confusion_csv"], ["actual", "predicted"], ((ds.classes[t], ds.classes[p]) for t, p in zip(targets, preds)))
    k = min(ep.top_k, len(ds.classes))
    topk = np.argsort(-probs, axis=1)[:, :k]
    storage.write_csv(
        out["predictions"], ["row", "id", "source_uri", "actual", "predicted", "confidence", "correct", f"top{k}"],
        ([i, test.index[i]["id"], test.index[i]["source_uri"], ds.classes[t], ds.classes[p], f"{probs[i, p]:.6f}", int(t == p),
          "|".join(ds.classes[j] for j in topk[i])] for i, (t, p) in enumerate(zip(targets, preds))),
    )
    storage.write_csv(out["reliability_csv"], ["bin", "lower", "upper", "count", "confidence", "accuracy"],
                      ([b[c] for c in ("bin", "lower", "upper", "count", "confidence", "accuracy")] for b in cal["bins"]))
    title = f"{name}: test accuracy {m['accuracy']:.3f} (n={m['n']})"
    plot_confusion(np.asarray(m["confusion_matrix"]), ds.classes, out["confusion_png"], title)
    plot_reliability(cal, out["reliability_png"], f"{name}: ECE {cal['ece']:.4f} ({ep.ece_bins} bins)")
    if ep.gallery_size:
        plot_mistakes(images, mistakes, targets, probs, ds.classes, out["mistakes_png"],
                      f"{name}: {int((preds != targets).sum())} mistakes, most confident first")


def _cpu_runtime():
    import torch

    from cvpipe.torchkit.runtime import Runtime

    rt = resolve_runtime("cpu", "off", False, key="train")
    assert isinstance(rt, Runtime) and rt.device == torch.device("cpu")
    return rt


def _dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, default=storage._json_default) + "\n"


def _metrics_json(name, ckpt, ep, weights, m, cal, cost, parity, ds) -> dict[str, Any]:
    r6 = lambda v: None if v is None else round(float(v), 6)  # noqa: E731
    return {
        "arch": name,
        "checkpoint": ep.checkpoint,
        "weights": weights,
        "tta_flip": ep.tta_flip,
        "trained_epochs": int(ckpt["epoch"]),
        "image_size": int(ckpt["image_size"]),
        "data_version": ds.meta.get("fingerprint"),
        # ingest's label review summary (labels corrected since the previous data version), via the prepared meta.json
        "label_review": ds.meta.get("label_review"),
        "accuracy": r6(m["accuracy"]),
        "top_k": m["top_k"],
        "top_k_accuracy": r6(m["top_k_accuracy"]),
        **{k: r6(m[k]) for k in ("macro_precision", "macro_recall", "macro_f1", "weighted_precision", "weighted_recall", "weighted_f1")},
        "roc_auc": r6(m["roc_auc"]),
        **({"roc_auc_note": m["roc_auc_note"]} if "roc_auc_note" in m else {}),
        "ece": r6(cal["ece"]),
        "ece_bins": ep.ece_bins,
        "mean_confidence": r6(cal["mean_confidence"]),
        "n_test": m["n"],
        "errors": int(m["n"] - round(m["accuracy"] * m["n"])),
        "cost": cost,
        "export_parity": parity,
        "per_class": m["per_class"],
        "confusion_matrix": m["confusion_matrix"],
        "classes": ds.classes,
        "most_confident_mistakes": m["mistakes"],
    }


def _log_wandb(params, name, ckpt, ckpt_path, metrics, m, targets, preds, probs, images, test, classes, out, mistakes) -> None:
    tracker = tracking.start(
        params,
        job_type="evaluate",
        name=f"evaluate-{name}",
        config={**params.resolved(), "arch": name, "checkpoint": ckpt_path, "train_run_id": ckpt.get("wandb_run_id")},
        group=tracking.group_name(params, ckpt.get("dataset_hash")),
        tags=[name],
    )
    with tracker:
        summary = {f"test/{k}": metrics[k] for k in SUMMARY_KEYS if metrics.get(k) is not None}
        summary.update({f"cost/{k}": v for k, v in metrics["cost"].items() if isinstance(v, (int, float))})
        if metrics["export_parity"]:
            summary.update({f"export/{k}": v for k, v in metrics["export_parity"].items()})
        summary["arch"] = name
        review = metrics.get("label_review") or {}
        summary.update({f"data/{k}": v for k, v in review.items() if isinstance(v, (int, float))})
        tracker.summary(summary)
        try:
            import wandb

            n = min(len(targets), params.evaluate.table_images)
            order = list(mistakes) + [i for i in range(len(targets)) if i not in set(mistakes)]
            table = wandb.Table(columns=["row", "id", "image", "actual", "predicted", "confidence", "correct"])
            for i in order[:n]:
                p = int(preds[i])
                table.add_data(i, test.index[i]["id"], wandb.Image(np.asarray(images[i])), classes[int(targets[i])],
                               classes[p], float(probs[i, p]), bool(p == targets[i]))
            log = {
                "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=targets.tolist(), preds=preds.tolist(), class_names=classes),
                "test/confusion_matrix_png": tracker.image(out["confusion_png"]),
                "test/reliability": tracker.image(out["reliability_png"]),
                "test/per_class": wandb.Table(
                    columns=["class", "precision", "recall", "f1", "support"],
                    data=[[c, v["precision"], v["recall"], v["f1-score"], v["support"]] for c, v in m["per_class"].items()],
                ),
                "test/predictions": table,
            }
            if params.evaluate.gallery_size and Path(out["mistakes_png"]).exists():
                log["test/mistakes"] = tracker.image(out["mistakes_png"])
            tracker.log(log)
        except Exception as exc:  # tracking never fails the stage
            info(f"W&B tables skipped: {exc}")


