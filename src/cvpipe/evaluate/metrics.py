"""Test-set metrics and model cost, computed with scikit-learn and torch.

* Classification metrics: scikit-learn (accuracy, top-k, precision/recall/F1,
  per-class report, confusion matrix, one-vs-rest ROC-AUC).
* Calibration: the expected calibration error (ECE) over equal-width confidence
  bins. Neither scikit-learn nor the pinned dependencies have a multiclass ECE
  (torchmetrics is not in the lock), so the per-bin accuracy and confidence come
  from scikit-learn's ``calibration_curve`` applied to "top-1 prediction correct"
  vs "top-1 confidence" (that reduction *is* the multiclass ECE), and only the
  bin-count weighting is done here.
* Cost: parameters, FLOPs from ``torch.utils.flop_counter.FlopCounterMode``
  (MACs = FLOPs / 2), batch-1 latency (median) and batch throughput.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterator, Optional

import numpy as np

CHUNK_VALUES = 2**18  # per chunk where a computation would otherwise copy or sort the whole n x C array: 2 MB of float64


def row_chunks(n: int, n_classes: int, rows: Optional[int] = None) -> Iterator[slice]:
    """The row slices of an *n* x *n_classes* computation taken a chunk at a time: *rows* images each, by
    default as many as hold :data:`CHUNK_VALUES` values (at least one)."""
    rows = rows or max(1, CHUNK_VALUES // max(1, n_classes))
    return (slice(s, min(s + rows, n)) for s in range(0, n, rows))


def classification_metrics(targets: np.ndarray, probs: np.ndarray, classes: list[str], top_k: int = 5) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

    targets = np.asarray(targets)
    probs = np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    labels = list(range(n_classes))
    preds = probs.argmax(axis=1)
    out: dict[str, Any] = {"n": int(len(targets)), "accuracy": float(accuracy_score(targets, preds))}
    out["top_k"] = top_k if top_k < n_classes else None
    out["top_k_accuracy"] = top_k_accuracy(targets, probs, top_k) if top_k < n_classes else None
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(targets, preds, labels=labels, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(p), float(r), float(f)
    out["roc_auc"], note = roc_auc(targets, probs)
    if note:
        out["roc_auc_note"] = note
    report = classification_report(targets, preds, labels=labels, target_names=classes, output_dict=True, zero_division=0)
    out["per_class"] = {c: {k: round(float(v), 6) for k, v in report[c].items()} for c in classes}
    out["confusion_matrix"] = confusion_matrix(targets, preds, labels=labels).tolist()
    return out


def roc_auc(targets: np.ndarray, probs: np.ndarray) -> tuple[Optional[float], Optional[str]]:
    """One-vs-rest macro ROC-AUC (binary: of class 1) of (n, C) *probs*, scikit-learn's; ``(None, why)`` when a
    class is absent from *targets* (its one-vs-rest curve is undefined).

    Multiclass, each class's binary ``roc_auc_score`` of its renormalised column, then their mean: what
    ``roc_auc_score(multi_class="ovr", average="macro")`` computes, without the n x C copies it makes of the
    whole array (the renormalised scores and an n x C one-hot of the labels)."""
    from sklearn.metrics import roc_auc_score

    targets = np.asarray(targets)
    n_classes = probs.shape[1]
    present = np.unique(targets)
    if len(present) < n_classes:
        return None, f"undefined: {n_classes - len(present)} class(es) absent from the test split"
    if n_classes == 2:
        return float(roc_auc_score(targets, probs[:, 1])), None
    total = probs.sum(axis=1)  # rows renormalised as sklearn's ovr requires them, so the figure is the one it gives
    return float(np.average([roc_auc_score(targets == c, probs[:, c] / total) for c in range(n_classes)])), None


def top_k_accuracy(targets: np.ndarray, probs: np.ndarray, k: int) -> float:
    """scikit-learn's ``top_k_accuracy_score`` (its tie order), over :func:`row_chunks`: it argsorts the whole
    n x C array it is given."""
    from sklearn.metrics import top_k_accuracy_score

    targets, labels = np.asarray(targets), list(range(probs.shape[1]))
    hits = sum(top_k_accuracy_score(targets[r], probs[r], k=k, labels=labels, normalize=False)
               for r in row_chunks(len(targets), probs.shape[1]))
    return float(hits / len(targets))


def top_k_indices(probs: np.ndarray, k: int, rows: Optional[int] = None) -> np.ndarray:
    """Each row's *k* most probable classes, most probable first (equal probabilities: the lower class index
    first, a stable sort). Sorted *rows* (default: :func:`row_chunks`') at a time: the full ``argsort`` held an
    n x C int64 array (1.6 GB for 200k images of 1,000 classes) to keep n x k of it."""
    probs = np.asarray(probs)
    k = min(k, probs.shape[1])
    out = np.empty((len(probs), k), dtype=np.int64)
    for r in row_chunks(len(probs), probs.shape[1], rows):
        out[r] = np.argsort(-probs[r], axis=1, kind="stable")[:, :k]
    return out


def calibration(targets: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """ECE and the reliability-diagram bins (top-1 confidence, equal-width bins on [0, 1])."""
    from sklearn.calibration import calibration_curve

    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == np.asarray(targets)).astype(int)
    # the same binning calibration_curve uses (strategy="uniform"), for the counts
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], conf)
    counts = np.bincount(ids, minlength=n_bins)
    if correct.min() == correct.max():  # calibration_curve needs both outcomes present
        acc_b = np.array([float(correct[0])] * int((counts > 0).sum()))
        conf_b = np.array([conf[ids == b].mean() for b in range(n_bins) if counts[b]])
    else:
        acc_b, conf_b = calibration_curve(correct, conf, n_bins=n_bins, strategy="uniform")
    nonzero = np.flatnonzero(counts)
    weights = counts[nonzero] / counts.sum()
    ece = float(np.sum(weights * np.abs(acc_b - conf_b)))
    bins = [
        {"bin": int(b), "lower": round(float(edges[b]), 6), "upper": round(float(edges[b + 1]), 6), "count": int(counts[b]),
         "accuracy": round(float(a), 6), "confidence": round(float(c), 6)}
        for b, a, c in zip(nonzero, acc_b, conf_b)
    ]
    return {"ece": ece, "mean_confidence": float(conf.mean()), "bins": bins}


def count_flops(model, example) -> int:
    """Forward FLOPs of ``model(example)`` counted by torch's FlopCounterMode (matmul/conv; elementwise ops are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(example)
    return int(counter.get_total_flops())


def time_forward(model, example, runs: int, warmup: int = 3) -> list[float]:
    import torch

    times = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(example)
            if example.device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def model_cost(model, image_size: int, device, latency_runs: int = 30, throughput_batch: int = 32,
               file_bytes: Optional[int] = None) -> dict[str, Any]:
    """Parameters, FLOPs/MACs at batch 1, batch-1 latency (median ms) and throughput (img/s) in fp32 eager mode."""
    import torch

    model.eval()
    x1 = torch.randn(1, 3, image_size, image_size, device=device)
    flops = count_flops(model, x1)
    lat = time_forward(model, x1, latency_runs)
    xb = torch.randn(throughput_batch, 3, image_size, image_size, device=device)
    reps = max(3, min(10, latency_runs // 3))
    tb = time_forward(model, xb, reps, warmup=1)
    out = {
        "params": int(sum(p.numel() for p in model.parameters())),
        "flops": flops,
        "macs": flops // 2,
        "gflops": round(flops / 1e9, 6),
        "latency_ms": round(1000 * statistics.median(lat), 4),
        "latency_p90_ms": round(1000 * float(np.percentile(lat, 90)), 4),
        "throughput_batch": throughput_batch,
        "throughput_img_s": round(throughput_batch / statistics.median(tb), 2),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    out["params_m"] = round(out["params"] / 1e6, 4)
    if file_bytes is not None:
        out["file_bytes"] = int(file_bytes)
        out["size_mb"] = round(file_bytes / 2**20, 4)
    return out
