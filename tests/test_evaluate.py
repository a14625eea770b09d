"""Evaluate: metrics against scikit-learn and hand-checked values, calibration, a planted mislabel, the headline
metrics file against the full report, temperature scaling end to end, and the phase progress lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import absolute_pythonpath, cvpipe, digit_folders, write_params
from PIL import Image

from cvpipe.evaluate.metrics import calibration, classification_metrics, top_k_indices

CLASSES = ["a", "b", "c"]
# 6 test images; rows are softmax outputs. argmax: a, b, b, c, c, a
TARGETS = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array([
    [0.7, 0.2, 0.1],   # a -> a  correct
    [0.3, 0.6, 0.1],   # a -> b  wrong, true class 2nd
    [0.1, 0.8, 0.1],   # b -> b  correct
    [0.1, 0.3, 0.6],   # b -> c  wrong, true class 2nd
    [0.2, 0.1, 0.7],   # c -> c  correct
    [0.5, 0.1, 0.4],   # c -> a  wrong, true class 2nd
])


def test_metrics_match_sklearn_and_hand_checked_values():
    m = classification_metrics(TARGETS, PROBS, CLASSES, top_k=2)
    # by hand: 3 of 6 right; every wrong row has the true class second -> top-2 = 6/6
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["top_k"] == 2 and m["top_k_accuracy"] == pytest.approx(1.0)
    # per class by hand: a: P=1/2 (pred a: rows 0,5), R=1/2 -> F1 .5; b: P=1/2, R=1/2; c: P=1/2, R=1/2
    for c in CLASSES:
        assert m["per_class"][c]["precision"] == pytest.approx(0.5)
        assert m["per_class"][c]["recall"] == pytest.approx(0.5)
        assert m["per_class"][c]["support"] == 2
    assert m["macro_f1"] == pytest.approx(0.5) and m["weighted_f1"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]

    from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

    preds = PROBS.argmax(1)
    for avg in ("macro", "weighted"):
        assert m[f"{avg}_precision"] == pytest.approx(precision_score(TARGETS, preds, average=avg))
        assert m[f"{avg}_recall"] == pytest.approx(recall_score(TARGETS, preds, average=avg))
        assert m[f"{avg}_f1"] == pytest.approx(f1_score(TARGETS, preds, average=avg))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(TARGETS, PROBS, multi_class="ovr"))
    # hand: one-vs-rest AUC of class a: positives (.7,.3) vs negatives (.1,.1,.2,.5): 4/8 + 3/8 -> 7/8
    from sklearn.metrics import roc_auc_score as auc

    assert auc(TARGETS == 0, PROBS[:, 0]) == pytest.approx(7 / 8)


def test_metrics_with_an_absent_class_and_binary():
    m = classification_metrics(np.array([0, 0, 1]), PROBS[:3], CLASSES, top_k=5)
    assert m["roc_auc"] is None and "absent" in m["roc_auc_note"]
    assert m["top_k_accuracy"] is None  # k >= classes: always 1, not reported
    b = classification_metrics(np.array([0, 1, 1, 0]), np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.35, 0.65]]), ["x", "y"])
    # by hand: positives (.6, .7) vs negatives (.1, .65): 3 of 4 pairs ranked right
    assert b["roc_auc"] == pytest.approx(0.75) and b["accuracy"] == pytest.approx(0.75)


def test_ece_hand_checked():
    # 10 bins. Confidence .95: one right, one wrong -> |0.5 - 0.95| = .45 on half the data;
    # confidence .65: both right -> |1 - .65| = .35 on the other half. ECE = .225 + .175 = .4
    targets = np.array([0, 1, 0, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]])
    cal = calibration(targets, probs, n_bins=10)
    assert cal["ece"] == pytest.approx(0.4)
    assert [(b["bin"], b["count"]) for b in cal["bins"]] == [(6, 2), (9, 2)]
    assert cal["bins"][1]["accuracy"] == pytest.approx(0.5) and cal["bins"][1]["confidence"] == pytest.approx(0.95)
    perfect = calibration(np.array([0, 0]), np.array([[1.0, 0.0], [1.0, 0.0]]), n_bins=10)
    assert perfect["ece"] == pytest.approx(0.0)


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """4 digit classes x 30 images at 32 px, timm's test_resnet trained for 8 epochs (AdamW, no EMA)."""
    monkeypatch.chdir(tmp_path)
    for k, v in absolute_pythonpath().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    digit_folders(tmp_path / "src", 4, 30)
    write_params(tmp_path, {"ingest.source": str(tmp_path / "src"), "ingest.workers": 1, "preprocess.workers": 1,
                            "train.arch": "test_resnet", "train.epochs": 8, "train.batch_size": 16, "train.lr": 0.005,
                            "train.optimizer": "adamw", "train.weight_decay": 0.05,
                            # no EMA: the test below asks for EMA weights of a checkpoint without them
                            "train.ema": False, "train.monitor": "val_acc", "evaluate.weights": "model",
                            "evaluate.latency_runs": 3, "evaluate.gallery_size": 4, "wandb.mode": "disabled"})
    for stage in ("ingest", "preprocess", "train"):
        cvpipe(stage, "-q", cwd=tmp_path)
    return tmp_path


def test_predict_logits_flip_pass_is_the_flipped_images_pass():
    """evaluate keeps each pass's logits (to divide them by T) in disk-backed arrays: the plain pass is the
    shared evaluation pass's, the flipped one the model's logits of the mirrored images, their averaged softmax
    the flip-TTA probability; the advance callback sees every image of every pass."""
    import torch

    from cvpipe.evaluate.calibration import softmax_probs
    from cvpipe.evaluate.stage import predict_logits
    from cvpipe.torchkit import evaluation
    from cvpipe.torchkit.loaders import BatchNormalizer
    from cvpipe.torchkit.models import create, data_config
    from cvpipe.torchkit.runtime import resolve_runtime

    torch.manual_seed(0)
    model = create("test_resnet", num_classes=3).eval()
    rt = resolve_runtime("cpu", "off", False, key="train")
    cfg = data_config(model)
    norm = BatchNormalizer(cfg["mean"], cfg["std"], rt)
    images = np.random.default_rng(0).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    seen = []
    logits = predict_logits(model, images, norm, rt, 3, tta_flip=True, advance=seen.append)
    assert len(logits) == 2 and sum(seen) == 14
    assert all(isinstance(lg, np.memmap) and lg.shape == (7, 3) and lg.dtype == np.float32 for lg in logits)
    ref = evaluation.evaluate(model, evaluation.array_batches(images, 3), norm, rt, logits_out=np.empty((7, 3), np.float32))
    assert np.array_equal(logits[0], ref.logits)
    with torch.inference_mode():
        plain = model(norm(torch.from_numpy(images))).float()
        flipped = model(norm(torch.from_numpy(np.ascontiguousarray(images[:, :, ::-1])))).float()
    assert logits[1] == pytest.approx(flipped.numpy(), abs=1e-5)
    expected = ((plain.softmax(1) + flipped.softmax(1)) / 2).double().numpy()
    assert softmax_probs(logits) == pytest.approx(expected, abs=1e-6)


def test_phase_progress_prints_one_line_per_phase_in_a_log():
    """Without a terminal (a log, `dvc repro` piped to a file): no bar, one line per finished phase with its
    result and time; a phase that raises prints nothing; quiet prints nothing."""
    import io

    from rich.console import Console

    from cvpipe.core import console as console_mod

    buf = io.StringIO()
    with console_mod.PhaseProgress("evaluate r/seed1", out=Console(file=buf, width=60)) as phases:
        assert phases.live is None
        with phases.phase("predicting 3 test images", total=3, unit="img") as ph:
            ph.advance(3)
            ph.result = "accuracy 1.0"
        with pytest.raises(RuntimeError), phases.phase("export"):
            raise RuntimeError("boom")
        with phases.phase("plots"):
            pass
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines  # one line each, however narrow the console
    assert lines[0].startswith("evaluate r/seed1: predicting 3 test images: accuracy 1.0 (") and lines[0].endswith(" s)")
    assert lines[1].startswith("evaluate r/seed1: plots (")
    # on a terminal: one bar row, a fresh task per phase (counted or not), and the same lines
    term = io.StringIO()
    with console_mod.PhaseProgress("evaluate r/seed1", out=Console(file=term, force_terminal=True, width=100)) as phases:
        assert phases.live is not None
        with phases.phase("predicting 3 test images", total=3, unit="img") as ph:
            ph.advance(3)
        with phases.phase("plots"):
            assert len(phases.live.tasks) == 1 and phases.live.tasks[0].total is None
    assert phases.live.tasks == [] and "evaluate r/seed1: plots (" in term.getvalue()
    console_mod.set_quiet(True)
    try:
        quiet = io.StringIO()
        with console_mod.PhaseProgress("x", out=Console(file=quiet)) as phases, phases.phase("plots"):
            pass
        assert quiet.getvalue() == ""
    finally:
        console_mod.set_quiet(False)


@pytest.mark.slow
def test_planted_mislabel_shows_in_confusion_matrix_and_gallery(tiny_project):
    root = tiny_project
    proc = cvpipe("evaluate", cwd=root)  # not quiet, output piped: the log-mode progress lines
    log = proc.stdout + proc.stderr
    n_test, n_val = (len(np.load(root / f"data/prepared/{s}/labels.npy")) for s in ("test", "val"))
    for phase in (f"predicting {n_test} test images (", f"predicting {n_val} val images (",
                  "metrics and intervals (1000 bootstrap resamples): accuracy ", "cost: FLOPs", "export TorchScript + ONNX",
                  f"parity on {n_test} test images: max abs logit difference", "plots (", "W&B ("):
        assert f"evaluate test_resnet/seed42: {phase}" in log, (phase, log)
    head = json.loads((root / "metrics/test_resnet/seed42/evaluate.json").read_text())
    before = json.loads((root / "reports/test_resnet/seed42/evaluate.json").read_text())
    _check_headline_report_and_bundle(root, head, before, n_test)
    # plant: the most confidently *right* test image gets the wrong label (its class + 1)
    import csv

    with open(root / "plots/test_resnet/seed42/predictions.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["correct"] == "1"]
    victim = max(rows, key=lambda r: float(r["confidence"]))
    row, true = int(victim["row"]), int(victim["actual"])
    labels_path = root / "data/prepared/test/labels.npy"
    labels = np.load(labels_path)
    assert labels[row] == true
    labels[row] = (true + 1) % 4
    np.save(labels_path, labels)

    cvpipe("evaluate", "-q", cwd=root)
    after = json.loads((root / "reports/test_resnet/seed42/evaluate.json").read_text())
    cm0, cm1 = np.array(before["confusion_matrix"]), np.array(after["confusion_matrix"])
    diff = cm1 - cm0
    planted = (true + 1) % 4
    expected = np.zeros_like(diff)
    expected[true, true], expected[planted, true] = -1, 1  # one image moved from the diagonal to (planted, true)
    assert (diff == expected).all(), diff
    assert after["errors"] == before["errors"] + 1
    # it is the most confident mistake there is (it was the most confident right answer): first in the gallery
    first = after["most_confident_mistakes"][0]
    assert (first["row"], first["actual"], first["predicted"]) == (row, str(planted), str(true))
    png = Image.open(root / "plots/test_resnet/seed42/mistakes.png")
    assert png.format == "PNG" and png.size[0] >= 150
    # the rest of the report is there
    for key in ("top_k_accuracy", "macro_precision", "weighted_recall", "roc_auc", "ece"):
        assert after[key] is not None or key == "top_k_accuracy"
    assert after["cost"]["params"] > 0 and after["cost"]["flops"] > 0 and after["cost"]["latency_ms"] > 0
    assert max(after["export_parity"]["onnx_max_abs_diff"], after["export_parity"]["torchscript_max_abs_diff"]) <= 1e-4
    assert (root / "plots/test_resnet/seed42/reliability.png").exists() and (root / "plots/test_resnet/seed42/reliability.csv").exists()

    # EMA weights asked of a checkpoint without them: one line, exit 1
    proc = cvpipe("evaluate", "-q", "-S", "evaluate.weights=ema", cwd=root, check=False)
    assert proc.returncode == 1 and "no EMA weights" in proc.stdout + proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    # flip TTA runs and is recorded
    cvpipe("evaluate", "-q", "-S", "evaluate.tta_flip=true", "-S", "evaluate.export=false", cwd=root)
    flipped = json.loads((root / "reports/test_resnet/seed42/evaluate.json").read_text())
    assert flipped["tta_flip"] is True and flipped["calibration"]["temperature"] > 0
    # no calibration asked: T = 1 and the report says why
    cvpipe("evaluate", "-q", "-S", "evaluate.calibrate=false", "-S", "evaluate.export=false", cwd=root)
    plain = json.loads((root / "reports/test_resnet/seed42/evaluate.json").read_text())
    assert plain["temperature"] == 1.0 and "evaluate.calibrate is false" in plain["calibration"]["note"]
    assert plain["calibration"]["test_ece_before"] == plain["calibration"]["test_ece_after"] == plain["ece"]

    # a val image relabelled, so val has a mistake and the temperature is identifiable: T is fitted (!= 1), lowers
    # val NLL, and model.onnx's softmax is the calibrated confidence evaluate reports
    val_path = root / "data/prepared/val/labels.npy"
    val = np.load(val_path)
    val[0] = (val[0] + 1) % 4
    np.save(val_path, val)
    proc = cvpipe("evaluate", cwd=root)
    assert f"evaluate test_resnet/seed42: calibrating (temperature scaling on {n_val} val images): T = " in proc.stdout + proc.stderr
    rep = json.loads((root / "reports/test_resnet/seed42/evaluate.json").read_text())
    cal = rep["calibration"]
    assert cal["fitted_on"] == "val" and cal["n_val"] == n_val and cal["temperature"] == rep["temperature"] != 1.0
    assert cal["val_nll_after"] <= cal["val_nll_before"]  # the fit minimised val NLL: it cannot end above T = 1
    assert cal["test_ece_after"] == rep["ece"] and cal["test_nll_after"] is not None
    _check_headline_report_and_bundle(root, json.loads((root / "metrics/test_resnet/seed42/evaluate.json").read_text()), rep, n_test)


def _check_headline_report_and_bundle(root: Path, head: dict, rep: dict, n: int) -> None:
    """metrics/<run>/evaluate.json is the few-key headline of the full report; the report has the intervals,
    the calibration and the risk-coverage; the bundle's model.onnx returns the calibrated probabilities."""
    import csv

    from cvpipe.evaluate.stage import HEADLINE_KEYS

    assert tuple(head) == HEADLINE_KEYS and sum(isinstance(v, (int, float)) for v in head.values()) <= 10
    iv = rep["intervals"]
    assert head["accuracy"] == rep["accuracy"] and head["ece"] == rep["ece"] and head["n_test"] == rep["n_test"] == n
    assert head["accuracy_ci_low"] == iv["accuracy"]["low"] <= head["accuracy"] <= head["accuracy_ci_high"] == iv["accuracy"]["high"]
    assert head["latency_ms"] == rep["cost"]["latency_ms"] and head["size_mb"] == rep["cost"]["size_mb"]
    for key in ("macro_f1", "roc_auc", "ece"):
        assert iv[key]["low"] <= iv[key]["high"] and iv[key]["method"] == "stratified percentile bootstrap"
    cal = rep["calibration"]
    if cal["fitted_on"] is None:  # every val image right (a tiny, easy split): T = 1 and the note says so
        assert rep["temperature"] == 1.0 and "cannot be fitted" in cal["note"]
    assert cal["test_ece_after"] == rep["ece"] and cal["test_ece_before"] >= 0
    rc = rep["risk_coverage"]
    assert rc["threshold"] == 0.0 and rc["coverage"] == 1.0 and rc["error"] == pytest.approx(1 - rep["accuracy"], abs=1e-6)
    assert 0 <= rc["aurc"] <= 1
    with open(root / "plots/test_resnet/seed42/risk_coverage.csv", newline="") as fh:
        curve = list(csv.DictReader(fh))
    assert float(curve[-1]["coverage"]) == 1.0
    for name in ("reliability.csv", "reliability_uncalibrated.csv", "reliability.png", "risk_coverage.png"):
        assert (root / "plots/test_resnet/seed42" / name).stat().st_size > 0
    bundle = root / "exports/test_resnet/seed42"
    assert json.loads((bundle / "evaluate.json").read_text()) == rep
    with open(bundle / "predictions.csv", newline="") as fh:
        preds = list(csv.DictReader(fh))
    assert list(preds[0]) == ["row", "id", "actual", "predicted", "confidence", "correct"] and len(preds) == n
    assert [int(r["row"]) for r in preds] == list(range(n))
    assert sum(int(r["correct"]) for r in preds) / n == pytest.approx(rep["accuracy"])
    _check_onnx_is_calibrated(root, bundle, preds, rep["temperature"])


def _check_onnx_is_calibrated(root: Path, bundle: Path, preds: list, temperature: float) -> None:
    """softmax of model.onnx on the test pixels = softmax(fp32 eager logits of model.pt / T) (to 1e-5), and = the
    calibrated confidences evaluate reported (to 0.02: evaluate scores at the train runtime's precision, bf16
    autocast where the CPU has it, the exports are fp32)."""
    import onnxruntime as ort
    import torch

    from cvpipe.evaluate.calibration import softmax_probs
    from cvpipe.torchkit.loaders import BatchNormalizer
    from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint
    from cvpipe.torchkit.runtime import resolve_runtime

    pixels = np.load(root / "data/prepared/test/images.npy")
    out = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"pixels": pixels})[0]
    ckpt = load_checkpoint(bundle / "model.pt")
    assert ckpt["temperature"] == pytest.approx(temperature)
    norm = BatchNormalizer(ckpt["normalize"]["mean"], ckpt["normalize"]["std"], resolve_runtime("cpu", "off", False, key="train"))
    with torch.inference_mode():
        eager = model_from_checkpoint(ckpt).eval()(norm(torch.from_numpy(pixels))).numpy()
    probs = softmax_probs([out])
    assert probs == pytest.approx(softmax_probs([eager], temperature), abs=1e-5)
    assert probs.max(1) == pytest.approx([float(r["confidence"]) for r in preds], abs=0.02)
    assert json.loads((bundle / "preprocess.json").read_text())["temperature"] == pytest.approx(temperature)


def test_top_k_indices_sort_in_row_chunks_most_probable_first_ties_by_class_index():
    rng = np.random.default_rng(4)
    probs = rng.random((50, 30)).round(1)  # many equal probabilities in a row
    top = top_k_indices(probs, 5, rows=7)  # 8 chunks, the last one short
    assert top.shape == (50, 5)
    for row, idx in zip(probs, top):
        expected = sorted(range(30), key=lambda c: (-row[c], c))[:5]
        assert idx.tolist() == expected
    assert top_k_indices(probs[:, :3], 5).shape == (50, 3)  # k above the class count: every class


def test_the_metric_path_holds_no_n_by_c_array_and_equals_sklearns_whole_array_metrics():
    """Test logits of 40,000 images x 200 classes (two TTA passes, in evaluate's disk-backed arrays), scored as
    evaluate scores them: the process holds chunks, not the n x C float64 copies the whole-array calls made
    (five of them, 320 MB here), and every figure equals scikit-learn's on the whole array."""
    import tracemalloc

    from sklearn.metrics import log_loss, roc_auc_score, top_k_accuracy_score

    from cvpipe.evaluate import calibration as calib
    from cvpipe.evaluate.metrics import roc_auc, top_k_accuracy
    from cvpipe.evaluate.stage import scratch

    n, c = 40_000, 200
    rng = np.random.default_rng(0)
    targets = rng.integers(0, c, n)
    logits = []
    for _ in range(2):
        lg = scratch((n, c), np.float32)
        for s in range(0, n, 5000):  # written in parts, as the evaluation pass does
            part = rng.standard_normal((min(5000, n - s), c), dtype=np.float32)
            part[np.arange(len(part)), targets[s : s + 5000]] += 2.0
            lg[s : s + 5000] = part
        logits.append(lg)
    probs = scratch((n, c), np.float64)
    calib.fit_temperature([lg[:10] for lg in logits], targets[:10])  # the imports, before memory is traced
    tracemalloc.start()
    try:
        t = calib.fit_temperature(logits, targets)
        calib.softmax_probs(logits, t, out=probs)
        got = {"auc": roc_auc(targets, probs)[0], "nll": calib.nll(probs, targets), "top5": top_k_accuracy(targets, probs, 5),
               "m": classification_metrics(targets, probs, [str(i) for i in range(c)], 5)}
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * c * 8 / 2, peak  # under half of one n x C float64 array
    whole = np.mean([np.exp(lg / t) / np.exp(lg / t).sum(1, keepdims=True) for lg in (np.asarray(x, np.float64) for x in logits)], axis=0)
    assert np.allclose(probs, whole, rtol=1e-12, atol=0)
    assert got["auc"] == roc_auc_score(targets, probs / probs.sum(1, keepdims=True), multi_class="ovr", labels=list(range(c)))
    assert got["nll"] == pytest.approx(log_loss(targets, probs, labels=list(range(c))), rel=1e-12)
    assert got["top5"] == got["m"]["top_k_accuracy"] == top_k_accuracy_score(targets, probs, k=5, labels=list(range(c)))


def test_scratch_arrays_are_zeroed_files_and_a_disk_too_small_is_a_clear_error(tmp_path, monkeypatch):
    """evaluate's n x C arrays: zeroed, file-backed and writable; more than TMPDIR holds is a StageError that
    names the space needed and TMPDIR (not a SIGBUS at the first page the disk cannot hold)."""
    import shutil

    from cvpipe.core.errors import StageError
    from cvpipe.evaluate.stage import scratch

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    a = scratch((1000, 7), np.float64)
    assert isinstance(a, np.memmap) and a.shape == (1000, 7) and not a.any()
    a[:] = 1.5
    assert a.sum() == 1.5 * 7000 and list(tmp_path.iterdir()) == []  # unlinked: nothing left in TMPDIR
    assert scratch((0, 7), np.float32).shape == (0, 7)
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(StageError, match=rf"scratch space in {tmp_path} \(TMPDIR\), .* MiB are free: point TMPDIR"):
        scratch((free // 8 + 2**20, 8), np.uint8)
