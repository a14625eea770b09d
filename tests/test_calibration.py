"""Temperature scaling and the risk-coverage curve: known temperatures recovered, hand-checked curves."""

from __future__ import annotations

import numpy as np
import pytest

from cvpipe.evaluate import calibration as calib
from cvpipe.evaluate.metrics import calibration


def _overconfident(n: int, t_true: float, seed: int, classes: int = 5):
    """Labels drawn from softmax(z), logits reported as z * t_true: a model overconfident by t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, classes))
    p = calib.softmax_probs([z])
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return z * t_true, labels


def test_fit_temperature_recovers_a_known_temperature_and_lowers_ece_on_held_out_data():
    val_logits, val_labels = _overconfident(3000, 2.0, seed=0)
    t = calib.fit_temperature([val_logits], val_labels)
    assert t == pytest.approx(2.0, rel=0.1)
    test_logits, test_labels = _overconfident(2000, 2.0, seed=1)
    before, after = calib.softmax_probs([test_logits]), calib.softmax_probs([test_logits], t)
    assert (before.argmax(1) == after.argmax(1)).all()  # T never changes a prediction
    ece_before, ece_after = calibration(test_labels, before, 15)["ece"], calibration(test_labels, after, 15)["ece"]
    assert ece_after < ece_before / 2, (ece_before, ece_after)
    assert calib.nll(after, test_labels) < calib.nll(before, test_labels)


def test_fit_temperature_on_an_underconfident_model_and_with_flip_passes():
    logits, labels = _overconfident(3000, 0.5, seed=2)
    assert calib.fit_temperature([logits], labels) == pytest.approx(0.5, rel=0.1)
    # two TTA passes: T is fitted for the averaged probabilities (two identical passes = one pass)
    assert calib.fit_temperature([logits, logits], labels) == pytest.approx(calib.fit_temperature([logits], labels), rel=1e-3)


def test_softmax_probs_and_nll():
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    p = calib.softmax_probs([logits], 2.0)
    assert p[0] == pytest.approx([np.e / (np.e + 1), 1 / (np.e + 1)])
    assert p[1] == pytest.approx([0.5, 0.5])
    assert calib.nll(p, np.array([0, 1])) == pytest.approx(-(np.log(np.e / (np.e + 1)) + np.log(0.5)) / 2)


def test_risk_coverage_hand_checked():
    # confidences .9 (right), .8 (wrong), .8 (right), .6 (wrong), .5 (right)
    conf = np.array([0.9, 0.8, 0.8, 0.6, 0.5])
    correct = np.array([1, 0, 1, 0, 1])
    curve = calib.risk_coverage_curve(conf, correct)
    assert curve["threshold"] == pytest.approx([0.9, 0.8, 0.6, 0.5])  # the tie at .8 is one point
    assert curve["coverage"] == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert curve["risk"] == pytest.approx([0.0, 1 / 3, 2 / 4, 2 / 5])
    # step area: 0*.2 + 1/3*.4 + 1/2*.2 + 2/5*.2
    assert calib.aurc(curve) == pytest.approx(0.4 / 3 + 0.1 + 0.08)
    at = calib.at_threshold(conf, correct, 0.7)
    assert at == {"threshold": 0.7, "coverage": 0.6, "answered": 3, "error": pytest.approx(1 / 3, abs=1e-6)}
    assert calib.at_threshold(conf, correct, 0.0)["coverage"] == 1.0 and calib.at_threshold(conf, correct, 0.0)["error"] == 0.4
    nothing = calib.at_threshold(conf, correct, 0.95)
    assert nothing["answered"] == 0 and nothing["error"] is None


def test_calibration_report_says_why_t_is_one():
    rep = calib.calibration_report(1.0, None, 0, "no val split", {"ece_before": 0.1, "ece_after": 0.1}, None)
    assert rep["temperature"] == 1.0 and rep["fitted_on"] is None and rep["note"] == "no val split"
    assert rep["test_ece_before"] == rep["test_ece_after"] == 0.1
