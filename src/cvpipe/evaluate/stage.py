"""Evaluate stage: honest test-split metrics, plots, model cost and exports for one trained model.

Reads ``evaluate.*``, ``serve.abstain_below``, the checkpoint ``<paths.models>/<run>/<evaluate.checkpoint>.pt``
(its EMA weights when ``evaluate.weights`` says so) and the prepared val and test splits. Fits temperature
scaling on val (:mod:`cvpipe.evaluate.calibration`); every probability reported after that (ECE, NLL,
ROC-AUC, confidences, the risk-coverage curve) is the calibrated one, with the uncalibrated ECE/NLL/ROC-AUC
beside it in ``calibration`` (accuracy and the confusion matrix do not depend on T). Writes::

    <paths.metrics>/<run>/evaluate.json      the headline (DVC metrics, few columns): accuracy and its interval,
                                             macro-F1, ROC-AUC, ECE, latency, size, throughput, test images
    <paths.reports>/<run>/evaluate.json      the full detail: top-1/top-k accuracy, macro/weighted P/R/F1, ROC-AUC,
                                             ECE, ``intervals``, ``calibration``, ``risk_coverage``, per-class report,
                                             confusion matrix, most confident mistakes, model cost, export parity
    <paths.plots>/<run>/confusion.csv        actual,predicted per test image (DVC confusion plot)
    <paths.plots>/<run>/confusion_matrix.png
    <paths.plots>/<run>/reliability.csv      reliability diagram bins, calibrated (DVC plot);
                     reliability_uncalibrated.csv  the same before temperature scaling
    <paths.plots>/<run>/reliability.png      both diagrams, before | after
    <paths.plots>/<run>/risk_coverage.csv    threshold, coverage, risk (DVC plot) + risk_coverage.png
    <paths.plots>/<run>/mistakes.png         gallery of the most confident mistakes
    <paths.plots>/<run>/predictions.csv      per-image prediction, confidence and top-k
    <paths.exports>/<run>/                   model.pt, model.ts, model.onnx, preprocess.json, classes.json,
                                             evaluate.json (= the report), predictions.csv (row,id,actual,predicted,
                                             confidence,correct), confusion_matrix.png (see cvpipe.evaluate.export),
                                             model.safetensors + config.json (the scored weights, timm's hub format)

and logs the summary (with intervals and calibration), a confusion-matrix plot, a per-class table and a
predictions table with images to W&B (same group as the training runs of this data), records using train's
``checkpoint-<arch>-seed<seed>`` artifact and logs the scored weights as ``model-<arch>-seed<seed>``
(:mod:`cvpipe.evaluate.artifact`). Each phase shows
progress (:class:`cvpipe.core.console.PhaseProgress`): bars on a terminal, one line per phase in a log.

Memory: the n x C logits (one array per TTA pass) and probabilities of the test and val splits live in
:func:`scratch` arrays (unlinked temporary files in ``TMPDIR``), and every n x C computation takes
:func:`~cvpipe.evaluate.metrics.row_chunks` of a few MB, so the process holds a few vectors of n values
beside the model, not n x C arrays.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cvpipe.core import storage, tracking
from cvpipe.core.config import Params
from cvpipe.core.console import PhaseProgress, info
from cvpipe.core.errors import StageError
from cvpipe.data.prepared import PreparedDataset
from cvpipe.evaluate import artifact
from cvpipe.evaluate import calibration as calib
from cvpipe.evaluate.intervals import metric_intervals
from cvpipe.evaluate.metrics import calibration, classification_metrics, model_cost, roc_auc, top_k_indices
from cvpipe.evaluate.plots import curve_rows, plot_confusion, plot_mistakes, plot_reliability, plot_risk_coverage
from cvpipe.torchkit import evaluation
from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint
from cvpipe.torchkit.runtime import resolve_runtime

SUMMARY_KEYS = (
    "accuracy", "top_k_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_precision",
    "weighted_recall", "weighted_f1", "roc_auc", "ece", "n_test",
)
# metrics/<run>/evaluate.json, the DVC metrics file: the headline a person compares across runs (convention I3);
# the rest is in reports/<run>/evaluate.json and the bundle
HEADLINE_KEYS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "macro_f1", "roc_auc", "ece", "latency_ms", "size_mb",
                 "throughput_img_s", "n_test")
RISK_COVERAGE_POINTS = 500  # most rows of risk_coverage.csv (evenly thinned; the JSON's AURC uses every point)


def confident_mistakes(targets: np.ndarray, probs: np.ndarray, limit: int) -> list[int]:
    """Test rows predicted wrongly, most confident first."""
    preds = probs.argmax(axis=1)
    wrong = np.flatnonzero(preds != targets)
    order = np.argsort(-probs[wrong, preds[wrong]], kind="stable")
    return [int(i) for i in wrong[order][:limit]]


def output_paths(params: Params, name: Optional[str] = None) -> dict[str, str]:
    """Where evaluate writes one run's files: under ``<paths.X>/<name>``, *name* the run folder
    (default ``params.run_name``, ``<arch>/seed<seed>``, convention of the bake-off's cells)."""
    name = name or params.run_name
    plots = storage.join(params.paths.plots, name)
    return {
        "metrics": storage.join(params.paths.metrics, name, "evaluate.json"),
        "confusion_csv": storage.join(plots, "confusion.csv"),
        "confusion_png": storage.join(plots, "confusion_matrix.png"),
        "reliability_csv": storage.join(plots, "reliability.csv"),
        "reliability_uncalibrated_csv": storage.join(plots, "reliability_uncalibrated.csv"),
        "reliability_png": storage.join(plots, "reliability.png"),
        "risk_coverage_csv": storage.join(plots, "risk_coverage.csv"),
        "risk_coverage_png": storage.join(plots, "risk_coverage.png"),
        "report": storage.join(params.paths.reports, name, "evaluate.json"),
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


def predict_logits(model, images: np.ndarray, normalize, rt, batch_size: int, tta_flip: bool,
                   advance=None) -> list[np.ndarray]:
    """Logits (float32, N x C, in :func:`scratch` arrays) of a timm *model* over uint8 HWC images, through the
    evaluation pass train's validation runs too: ``[plain]``, or with *tta_flip* ``[plain, horizontally
    flipped]`` (the flip of the uint8 NHWC batch is the flip of the normalized tensor).
    :func:`cvpipe.evaluate.calibration.softmax_probs` turns them into the (TTA-averaged, tempered)
    probabilities; *advance(n)* is called per batch of each pass."""
    import torch

    def batches(flip: bool):
        for x, labels in evaluation.array_batches(images, batch_size):
            yield (torch.flip(x, dims=[2]) if flip else x), labels
            if advance is not None:
                advance(len(x))

    shape = (len(images), model.num_classes)  # every timm model states its class count
    return [evaluation.evaluate(model, batches(flip), normalize, rt, logits_out=scratch(shape, np.float32)).logits
            for flip in ((False, True) if tta_flip else (False,))]


def scratch(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array backed by an unlinked temporary file (``TMPDIR``), freed when the array is: evaluate's
    n x C logits and probabilities live in the page cache, which the kernel can write out, not in the
    process's memory (200k test images of 1,000 classes are 1.6 GB of float64 per array).

    The file's blocks are reserved up front (``posix_fallocate``): a mapping of a sparse file on a disk that
    fills up kills the process with SIGBUS at the first page it cannot write, where this raises a clear error."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not nbytes:
        return np.zeros(shape, dtype=dtype)
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    short = f"evaluate needs {nbytes / 2**20:,.1f} MiB of scratch space in {folder} (TMPDIR)"
    if nbytes > free:
        raise StageError(f"{short}, {free / 2**20:,.1f} MiB are free: point TMPDIR at a larger disk")
    with tempfile.TemporaryFile(prefix="cvpipe-evaluate-", dir=folder) as f:
        try:
            if hasattr(os, "posix_fallocate"):  # Linux; elsewhere a sparse file, guarded by the check above
                os.posix_fallocate(f.fileno(), 0, nbytes)
            else:
                f.truncate(nbytes)
        except OSError as exc:
            raise StageError(f"{short}: {exc.strerror}") from None
        return np.memmap(f, dtype=dtype, mode="r+", shape=shape)  # the mapping keeps the file until it is freed


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
    """Score the checkpoint on the test split with probabilities calibrated on val; write the headline metrics,
    the full report, plots and exports; log them to W&B."""
    ep = params.evaluate
    src = _load(params)
    name, ds, test = src.name, src.ds, src.test
    rt = resolve_runtime(params.train.device, params.train.amp, params.train.channels_last, key="train")
    images = test.images  # a memory map, or ShardImages (decoded a batch at a time)
    targets = np.asarray(test.labels, dtype=np.int64)
    out = output_paths(params)
    with PhaseProgress(f"evaluate {params.run_name}") as phases:
        sc = _score(params, src, rt, images, targets, phases)
        m, probs, preds = sc.m, sc.probs, sc.preds
        mistakes = confident_mistakes(targets, probs, ep.gallery_size)
        m["mistakes"] = _mistake_rows(mistakes, test, ds.classes, targets, preds, probs)
        cost, parity, metrics = _cost_and_exports(src, rt, images, sc, out, ep, phases)
        storage.write_json(out["report"], metrics)
        storage.write_json(out["metrics"], headline(metrics))
        with phases.phase("plots"):
            _write_plots(name, ep, ds, test, out, images, targets, sc, mistakes)
        with phases.phase("W&B"):
            _log_wandb(params, name, src.ckpt, src.ckpt_path, metrics, m, targets, preds, probs, images, test, ds.classes, out,
                       mistakes)
    iv = metrics["intervals"]["accuracy"]
    info(
        f"evaluated {name} ({src.weights} weights) on {m['n']} test images: accuracy {m['accuracy']:.4f} "
        f"[{iv['low']:.4f}, {iv['high']:.4f}], macro-F1 {m['macro_f1']:.4f}, ECE {sc.rel_before['ece']:.4f} -> "
        f"{sc.rel['ece']:.4f} (T {sc.temperature:.3f}), {cost['latency_ms']:.2f} ms/img"
        + (f", export parity {max(parity['torchscript_max_abs_diff'], parity['onnx_max_abs_diff']):.2g}" if parity else "")
    )
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics/<run>/evaluate.json from the full report: :data:`HEADLINE_KEYS` (ECE calibrated)."""
    iv = metrics["intervals"]["accuracy"]
    cost = metrics["cost"]
    values = {**metrics, "accuracy_ci_low": iv["low"], "accuracy_ci_high": iv["high"],
              **{k: cost.get(k) for k in ("latency_ms", "size_mb", "throughput_img_s")}}
    return {k: values.get(k) for k in HEADLINE_KEYS}


@dataclass
class _Scored:
    """Test predictions (calibrated and not) and everything computed from them."""

    temperature: float
    probs: np.ndarray  # calibrated: softmax(logits / T), TTA-averaged (a scratch array)
    preds: np.ndarray
    m: dict[str, Any]  # classification_metrics of probs
    rel: dict[str, Any]  # calibration() bins and ECE of probs
    rel_before: dict[str, Any]
    curve: dict[str, np.ndarray]  # risk-coverage curve of probs
    detail: dict[str, Any]  # evaluate.json's temperature, intervals, calibration, risk_coverage


def _score(params: Params, src: "_Evaluated", rt, images: np.ndarray, targets: np.ndarray, phases) -> _Scored:
    """Predict the test images, fit T on val, and compute the metrics, intervals and risk-coverage of the
    calibrated probabilities (ECE, NLL and ROC-AUC before calibration beside them)."""
    ep, ds = params.evaluate, src.ds
    model, normalize = _eager_model(src, rt)
    test_logits = _predict_phase(model, images, normalize, rt, ep, phases, "test")
    temperature, fitted_on, n_val, note, val = _temperature(params, src, model, normalize, rt, phases)
    with phases.phase(f"metrics and intervals ({ep.bootstrap_resamples} bootstrap resamples)") as ph:
        probs = scratch(test_logits[0].shape, np.float64)  # T = 1 first, then overwritten with the calibrated
        before, rel_before = _uncalibrated(calib.softmax_probs(test_logits, out=probs), targets, ep.ece_bins)
        calib.softmax_probs(test_logits, temperature, out=probs)
        preds = probs.argmax(axis=1)
        m = classification_metrics(targets, probs, ds.classes, ep.top_k)
        rel = calibration(targets, probs, ep.ece_bins)
        iv = metric_intervals(targets, probs, m, rel["ece"], ep.ece_bins, ep.ci_level, ep.bootstrap_resamples, ep.bootstrap_seed)
        ph.result = f"accuracy {m['accuracy']:.4f} [{iv['accuracy']['low']:.4f}, {iv['accuracy']['high']:.4f}]"
    test = {"ece_before": rel_before["ece"], "ece_after": rel["ece"], "nll_before": before["nll"],
            "nll_after": calib.nll(probs, targets), "roc_auc_before": before["roc_auc"], "roc_auc_after": m["roc_auc"]}
    conf, correct = probs.max(axis=1), preds == targets
    curve = calib.risk_coverage_curve(conf, correct)
    rc = {**calib.at_threshold(conf, correct, params.serve.abstain_below), "aurc": round(calib.aurc(curve), 6),
          "threshold_param": "serve.abstain_below"}
    detail = {"temperature": round(temperature, 6), "intervals": iv,
              "calibration": calib.calibration_report(temperature, fitted_on, n_val, note, test, val), "risk_coverage": rc}
    return _Scored(temperature, probs, preds, m, rel, rel_before, curve, detail)


def _uncalibrated(probs: np.ndarray, targets: np.ndarray, ece_bins: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ROC-AUC and NLL (``before``) and the reliability bins of the test probabilities at T = 1, computed
    before the calibrated ones overwrite them."""
    return ({"roc_auc": roc_auc(targets, probs)[0], "nll": calib.nll(probs, targets)},
            calibration(targets, probs, ece_bins))


def _eager_model(src: "_Evaluated", rt):
    """The chosen weights at the train runtime's device and memory format, and evaluate's normalizer."""
    import torch

    from cvpipe.torchkit.loaders import BatchNormalizer

    ckpt = src.ckpt
    model = model_from_checkpoint({**ckpt, "model": src.state_dict}).to(rt.device).eval()
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, BatchNormalizer(ckpt["normalize"]["mean"], ckpt["normalize"]["std"], rt)


def _predict_phase(model, images: np.ndarray, normalize, rt, ep, phases, split: str) -> list[np.ndarray]:
    n = len(images)
    passes = 2 if ep.tta_flip else 1
    with phases.phase(f"predicting {n} {split} images" + (" (+ flipped)" if ep.tta_flip else ""), total=n * passes,
                      unit="img") as ph:
        return predict_logits(model, images, normalize, rt, ep.batch_size, ep.tta_flip, advance=ph.advance)


def _temperature(params: Params, src: "_Evaluated", model, normalize, rt, phases):
    """(T, fitted_on, val images, note, val NLL before/after): fitted on the val split with ``evaluate.calibrate``,
    else 1 with the reason in the note."""
    ep, ds = params.evaluate, src.ds
    if not ep.calibrate:
        return 1.0, None, 0, "evaluate.calibrate is false: probabilities are uncalibrated (T = 1)", None
    val = ds.split("val") if ds.has_split("val") else None
    if val is None or len(val) == 0:
        return 1.0, None, 0, "no val split to fit the temperature on: probabilities are uncalibrated (T = 1)", None
    logits = _predict_phase(model, val.images, normalize, rt, ep, phases, "val")
    labels = np.asarray(val.labels, dtype=np.int64)
    probs = calib.softmax_probs(logits, out=scratch(logits[0].shape, np.float64))
    if (probs.argmax(axis=1) == labels).all():
        # every val image right: the NLL keeps falling as T -> 0 (no minimum), and a T at the search bound would
        # make every later answer, mistakes included, near-certain
        return 1.0, None, len(labels), (f"all {len(labels)} val images are predicted right: the temperature cannot be "
                                        "fitted (val NLL has no minimum), probabilities are uncalibrated (T = 1)"), None
    with phases.phase(f"calibrating (temperature scaling on {len(labels)} val images)") as ph:
        t = round(calib.fit_temperature(logits, labels), 6)  # the value every file states (report, model.pt, ONNX)
        nll = {"nll_before": calib.nll(probs, labels), "nll_after": calib.nll(calib.softmax_probs(logits, t, out=probs), labels)}
        ph.result = f"T = {t:.3f}, val NLL {nll['nll_before']:.4f} -> {nll['nll_after']:.4f}"
    return t, "val", len(labels), None, nll


def _load(params: Params) -> _Evaluated:
    """The checkpoint ``evaluate.checkpoint`` names, the weights ``evaluate.weights`` picks, and the test split."""
    ep = params.evaluate
    name = params.train.arch
    ckpt_path = storage.join(params.paths.models, params.run_name, f"{ep.checkpoint}.pt")
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


def _mistake_rows(mistakes: list[int], test, classes: list[str], targets, preds, probs) -> list[dict[str, Any]]:
    """evaluate.json's most confident mistakes: test row, image id and source, actual, predicted, confidence."""
    return [
        {"row": i, "id": test.index[i]["id"], "source_uri": test.index[i]["source_uri"], "actual": classes[int(targets[i])],
         "predicted": classes[int(preds[i])], "confidence": round(float(probs[i, preds[i]]), 6)} for i in mistakes
    ]


def _cost_and_exports(src: _Evaluated, rt, images: np.ndarray, sc: _Scored, out: dict[str, str], ep,
                      phases) -> tuple[dict[str, Any], Optional[dict[str, Any]], dict[str, Any]]:
    """(model cost, export parity or None, evaluate.json's metrics): the cost is fp32 eager on this machine;
    with ``evaluate.export``, the TorchScript + ONNX bundle (outputs: logits / T) is written and must match the
    eager logits / T: ONNX Runtime from the raw uint8 test pixels (its input), eager from the normalized tensors."""
    import torch

    from cvpipe.torchkit.loaders import BatchNormalizer

    name, ckpt, weights, ds, m = src.name, src.ckpt, src.weights, src.ds, sc.m
    fp32_model = model_from_checkpoint({**ckpt, "model": src.state_dict}).to(rt.device).eval()
    with phases.phase(f"cost: FLOPs, latency ({ep.latency_runs} runs), throughput (batch {ep.throughput_batch})") as ph:
        cost = model_cost(fp32_model, ds.image_size, rt.device, ep.latency_runs, ep.throughput_batch,
                          file_bytes=len(storage.read_bytes(src.ckpt_path)))
        ph.result = f"{cost['gflops']:.3g} GFLOPs, {cost['latency_ms']:.2f} ms/img, {cost['throughput_img_s']:.0f} img/s"
    cost["checkpoint_bytes"] = cost.pop("file_bytes")
    parity: Optional[dict[str, Any]] = None
    if not ep.export:
        cost["file_bytes"] = cost["checkpoint_bytes"]
        cost["size_mb"] = round(cost["checkpoint_bytes"] / 2**20, 4)
        return cost, parity, _metrics_json(name, ckpt, ep, weights, sc, cost, parity, ds)
    from cvpipe.evaluate import export

    cpu_norm = BatchNormalizer(ckpt["normalize"]["mean"], ckpt["normalize"]["std"], _cpu_runtime())
    pixels = np.array(images[: ep.parity_images])  # the uint8 NHWC test pixels: model.onnx's input
    x = cpu_norm(torch.from_numpy(pixels))  # eager's input, normalized as evaluate does
    with storage.staged_dir(out["export_dir"]) as folder:
        with phases.phase(f"export TorchScript + ONNX (temperature {sc.temperature:.3f})"):
            sizes = export.write_bundle(folder, ckpt, fp32_model, weights, x[:1], temperature=sc.temperature)
        with phases.phase(f"parity on {len(pixels)} test images") as ph:
            parity = export.parity(fp32_model, folder, x, pixels, temperature=sc.temperature)
            parity["tolerance"] = ep.parity_tolerance
            worst = max(parity["torchscript_max_abs_diff"], parity["onnx_max_abs_diff"])
            ph.result = f"max abs logit difference {worst:.2g}"
        if worst > ep.parity_tolerance:
            raise StageError(
                f"export parity failed for {name}: max abs logit difference {worst:.3g} > evaluate.parity_tolerance "
                f"{ep.parity_tolerance:g} (TorchScript {parity['torchscript_max_abs_diff']:.3g}, ONNX {parity['onnx_max_abs_diff']:.3g})"
            )
        cost["onnx_bytes"] = sizes["model.onnx"]
        cost["torchscript_bytes"] = sizes["model.ts"]
        cost["file_bytes"] = sizes["model.onnx"]
        cost["size_mb"] = round(sizes["model.onnx"] / 2**20, 4)
        metrics = _metrics_json(name, ckpt, ep, weights, sc, cost, parity, ds)
        (folder / "evaluate.json").write_text(_dumps(metrics))
        artifact.write_timm(folder, ckpt, src.state_dict, metrics)  # "the model": W&B artifact + promoted bundle
        _write_predictions(str(folder / "predictions.csv"), src.test, ds.classes, sc)
        plot_confusion(np.asarray(m["confusion_matrix"]), ds.classes, str(folder / "confusion_matrix.png"),
                       f"{name}: test accuracy {m['accuracy']:.3f} (n={m['n']})")
    return cost, parity, metrics


def _write_predictions(path: str, test, classes: list[str], sc: _Scored) -> None:
    """The bundle's predictions.csv (convention I2; compare's paired tests read it): one row per test image in
    test row order, with the calibrated top-1 probability and whether the prediction is right."""
    targets = np.asarray(test.labels, dtype=np.int64)
    storage.write_csv(path, ["row", "id", "actual", "predicted", "confidence", "correct"],
                      ([i, test.index[i]["id"], classes[t], classes[p], f"{sc.probs[i, p]:.6f}", int(t == p)]
                       for i, (t, p) in enumerate(zip(targets, sc.preds))))


def _write_plots(name, ep, ds, test, out, images, targets, sc: _Scored, mistakes) -> None:
    """The DVC plots: confusion and per-image prediction CSVs, the reliability bins (after and before temperature
    scaling), the risk-coverage curve, and their figures."""
    m, probs, preds = sc.m, sc.probs, sc.preds
    storage.write_csv(out["confusion_csv"], ["actual", "predicted"], ((ds.classes[t], ds.classes[p]) for t, p in zip(targets, preds)))
    k = min(ep.top_k, len(ds.classes))
    topk = top_k_indices(probs, k)
    storage.write_csv(
        out["predictions"], ["row", "id", "source_uri", "actual", "predicted", "confidence", "correct", f"top{k}"],
        ([i, test.index[i]["id"], test.index[i]["source_uri"], ds.classes[t], ds.classes[p], f"{probs[i, p]:.6f}", int(t == p),
          "|".join(ds.classes[j] for j in topk[i])] for i, (t, p) in enumerate(zip(targets, preds))),
    )
    cols = ("bin", "lower", "upper", "count", "confidence", "accuracy")
    for key, rel in (("reliability_csv", sc.rel), ("reliability_uncalibrated_csv", sc.rel_before)):
        storage.write_csv(out[key], list(cols), ([b[c] for c in cols] for b in rel["bins"]))
    rc = sc.detail["risk_coverage"]
    storage.write_csv(out["risk_coverage_csv"], ["threshold", "coverage", "risk"], curve_rows(sc.curve, RISK_COVERAGE_POINTS))
    title = f"{name}: test accuracy {m['accuracy']:.3f} (n={m['n']})"
    plot_confusion(np.asarray(m["confusion_matrix"]), ds.classes, out["confusion_png"], title)
    plot_reliability([("uncalibrated", sc.rel_before), (f"temperature {sc.temperature:.3f}", sc.rel)], out["reliability_png"],
                     f"{name}: reliability on {m['n']} test images ({ep.ece_bins} bins)")
    plot_risk_coverage(sc.curve, rc, out["risk_coverage_png"], f"{name}: risk-coverage (AURC {rc['aurc']:.4f})")
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


def _metrics_json(name, ckpt, ep, weights, sc: _Scored, cost, parity, ds) -> dict[str, Any]:
    """The full report (reports/<run>/evaluate.json, the bundle's evaluate.json, the model card's metrics)."""
    m, cal = sc.m, sc.rel
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
        **sc.detail,
    }


def _summary_detail(metrics: dict[str, Any]) -> dict[str, Any]:
    """W&B summary keys of the intervals (``test/<metric>_ci_low|high``), the calibration (``calibration/*``:
    temperature, test ECE/NLL/ROC-AUC before and after) and the risk-coverage at serve.abstain_below."""
    out: dict[str, Any] = {}
    for key, iv in metrics["intervals"].items():
        if isinstance(iv, dict) and iv.get("low") is not None:
            out[f"test/{key}_ci_low"], out[f"test/{key}_ci_high"] = iv["low"], iv["high"]
    out.update({f"calibration/{k}": v for k, v in metrics["calibration"].items() if isinstance(v, (int, float)) and v is not None})
    rc = metrics["risk_coverage"]
    out.update({f"risk_coverage/{k}": rc[k] for k in ("threshold", "coverage", "error", "aurc") if rc.get(k) is not None})
    return out


def _log_wandb(params, name, ckpt, ckpt_path, metrics, m, targets, preds, probs, images, test, classes, out, mistakes) -> None:
    tracker = tracking.start(
        params,
        job_type="evaluate",
        name=f"evaluate-{name}-seed{params.train.seed}",
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
        summary.update(_summary_detail(metrics))
        review = metrics.get("label_review") or {}
        summary.update({f"data/{k}": v for k, v in review.items() if isinstance(v, (int, float))})
        tracker.summary(summary)
        artifact.log_lineage(tracker, params, ckpt, ckpt_path, metrics, out["export_dir"])
        try:
            import wandb

            n = min(len(targets), params.evaluate.table_images)
            wrong = set(mistakes)  # the mistakes first, then the other rows, up to n (not a list of every row)
            order = itertools.islice(itertools.chain(mistakes, (i for i in range(len(targets)) if i not in wrong)), n)
            table = wandb.Table(columns=["row", "id", "image", "actual", "predicted", "confidence", "correct"])
            for i in order:
                p = int(preds[i])
                table.add_data(i, test.index[i]["id"], wandb.Image(np.asarray(images[i])), classes[int(targets[i])],
                               classes[p], float(probs[i, p]), bool(p == targets[i]))
            log = {
                "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=targets.tolist(), preds=preds.tolist(), class_names=classes),
                "test/confusion_matrix_png": tracker.image(out["confusion_png"]),
                "test/reliability": tracker.image(out["reliability_png"]),
                "test/risk_coverage": tracker.image(out["risk_coverage_png"]),
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


