"""evaluate's figures (matplotlib, Agg): confusion matrix, reliability diagrams before/after temperature
scaling, the risk-coverage curve, and the gallery of the most confident mistakes."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from cvpipe.core import storage


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


def plot_reliability(panels: list[tuple[str, dict[str, Any]]], path: str, title: str) -> None:
    """One reliability diagram per (subtitle, :func:`cvpipe.evaluate.metrics.calibration` output), side by side
    (evaluate draws the uncalibrated and the temperature-scaled probabilities)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.3), dpi=110, squeeze=False)
    for ax, (subtitle, cal) in zip(axes.flat, panels):
        bins = cal["bins"]
        centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
        width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
        ax.bar(centers, [b["accuracy"] for b in bins], width=width * 0.9, color="tab:blue", alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:red", label="bin mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
               title=f"{subtitle}: ECE {cal['ece']:.4f}")
        ax.legend(loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    storage.save_png(fig, path)


def plot_risk_coverage(curve: dict[str, np.ndarray], at: dict[str, Any], path: str, title: str) -> None:
    """Error rate of the answered images against the fraction answered, the configured threshold marked."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    ax.step(curve["coverage"], curve["risk"], where="post", color="tab:blue", label="risk-coverage")
    if at.get("error") is not None:
        ax.plot([at["coverage"]], [at["error"]], "o", color="tab:red",
                label=f"abstain below {at['threshold']:g}: coverage {at['coverage']:.3f}, error {at['error']:.3f}")
    top = max(0.05, float(np.max(curve["risk"])) * 1.1) if len(curve["risk"]) else 1.0
    ax.set(xlim=(0, 1.02), ylim=(0, top), xlabel="coverage (fraction of test images answered)",
           ylabel="error rate of the answered images", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    storage.save_png(fig, path)


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


def curve_rows(curve: dict[str, np.ndarray], limit: Optional[int] = None) -> list[list[float]]:
    """risk_coverage.csv's rows (threshold, coverage, risk), evenly thinned to *limit* points (last kept)."""
    n = len(curve["coverage"])
    keep = np.arange(n) if not limit or n <= limit else np.unique(np.r_[np.linspace(0, n - 1, limit).astype(int), n - 1])
    return [[round(float(curve["threshold"][i]), 6), round(float(curve["coverage"][i]), 6), round(float(curve["risk"][i]), 6)]
            for i in keep]
