"""Saying "not sure": the served model's temperature and the abstain rule (``serve.abstain_below``, issue #18).

The app answers ``unsure`` (``label: null``, the top-k kept) when the *calibrated* top-1 probability is
below ``serve.abstain_below``. Calibrated means divided by the temperature evaluate fitted on the
validation split:

* ``model.onnx`` (onnxruntime backend) outputs logits already divided by it (the division is in the
  graph), so the server applies nothing and only *reports* the value, from the graph's metadata,
  ``preprocess.json`` or ``card.json`` (whichever says);
* the torch backend divides the checkpoint's logits by ``model.pt["temperature"]`` (a promoted folder's
  ``preprocess.json`` when the checkpoint lacks it; 1.0 for a bare train checkpoint, which was never
  calibrated).

Files of one bundle that state different temperatures are refused at load: the probabilities would
depend on which backend served them. The expected test coverage and error at the threshold come from
the risk-coverage entry evaluate writes (card.json, or the bundle's evaluate.json) when it was computed
for the same threshold.

Hand-written: a few comparisons over the bundle's JSON; no library has cvpipe's file layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from cvpipe.core.errors import StageError

# two files' temperatures agree within ABS_TOL + REL_TOL * |T|: JSON and ONNX metadata round-trip floats exactly,
# but evaluate's calibration report (which a card may copy) rounds to 6 decimals, and a float32 copy differs by ~1e-7
ABS_TOL = 1e-6
REL_TOL = 1e-6
# a card's risk-coverage threshold matches serve.abstain_below within this
THRESHOLD_TOL = 1e-9


@dataclass(frozen=True)
class Temperature:
    """The model's softmax temperature: *value* (None when nothing says), where it was read, and what applies it."""

    value: Optional[float]
    source: str
    applied_by: str  # "model.onnx" (inside the graph), "torch backend", or "" (nothing: unknown)

    def describe(self) -> dict[str, Any]:
        return {"temperature": self.value, "source": self.source, "applied_by": self.applied_by or None}

    @property
    def text(self) -> str:
        return f"{self.value:g}, {self.source}" if self.value is not None else self.source


def _checked(shown: str, where: str, value: Any) -> float:
    """*value* as a positive finite float; a StageError naming the file otherwise."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(value, bool) or not math.isfinite(t) or t <= 0:
        raise StageError(f"{shown}: {where} has temperature {value!r}; it must be a positive number")
    return t


def _card_temperature(card: Mapping[str, Any]) -> Any:
    """card.json's temperature: top-level ``temperature`` or ``calibration.temperature``."""
    if "temperature" in card:
        return card["temperature"]
    cal = card.get("calibration")
    return cal.get("temperature") if isinstance(cal, Mapping) else None


def resolve_temperature(shown: str, backend: str, *, model_file: Mapping[str, Any], preprocess: Mapping[str, Any],
                        card: Mapping[str, Any]) -> Temperature:
    """The temperature of the model *shown* serves on *backend* ("onnxruntime" or "torch").

    *model_file* is the backend's own file: model.onnx's ``cvpipe`` metadata or the torch checkpoint.
    Every file that states a temperature must state the same one (StageError otherwise). On torch the
    value returned is the one :class:`cvpipe.serve.torch_backend.TorchBackend` divides by (1.0 when no
    file says); on onnxruntime it is only reported (None when no file says)."""
    own = "model.onnx metadata" if backend == "onnxruntime" else "model.pt"
    stated = [(where, _checked(shown, where, v)) for where, v in (
        (own, model_file.get("temperature")), ("preprocess.json", preprocess.get("temperature")),
        ("card.json", _card_temperature(card))) if v is not None]
    for where, t in stated[1:]:
        first_where, first = stated[0]
        if abs(t - first) > ABS_TOL + REL_TOL * max(t, first):
            raise StageError(f"{shown}: {first_where} says temperature {first:g} and {where} says {t:g}; "
                             "re-export the model with cvpipe evaluate")
    if backend == "onnxruntime":
        if stated:
            return Temperature(stated[0][1], f"from {stated[0][0]}", "model.onnx")
        return Temperature(None, "unknown: model.onnx, preprocess.json and card.json do not say (an export from "
                                 "before calibration: probabilities may be uncalibrated; re-run cvpipe evaluate)", "")
    if stated:
        return Temperature(stated[0][1], f"from {stated[0][0]}", "torch backend")
    return Temperature(1.0, "1.0: the checkpoint has no fitted temperature (a bare train checkpoint: uncalibrated; "
                            "serve evaluate's export for calibrated probabilities)", "torch backend")


def is_unsure(top1_probability: float, abstain_below: float) -> bool:
    """True when the answer should be "unsure": the top-1 probability is below the threshold (0 = never)."""
    return abstain_below > 0 and top1_probability < abstain_below


def find_risk_coverage(card: Mapping[str, Any], folder: Optional[Path]) -> Optional[dict[str, Any]]:
    """evaluate's risk-coverage entry (``{threshold, coverage, error, answered, aurc}``): card.json's (top level or under
    ``test_metrics``), else the bundle's ``evaluate.json`` in *folder*; None when neither has one."""
    import json

    for holder in (card, card.get("test_metrics") if isinstance(card.get("test_metrics"), Mapping) else {}):
        rc = holder.get("risk_coverage")
        if isinstance(rc, Mapping):
            return dict(rc)
    ev = folder / "evaluate.json" if folder is not None else None
    if ev is None or not ev.is_file():
        return None
    try:
        rc = json.loads(ev.read_text(encoding="utf-8")).get("risk_coverage")
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable or foreign evaluate.json only costs the card its expected coverage
    return dict(rc) if isinstance(rc, Mapping) else None


def abstain_summary(abstain_below: float, temperature: Temperature,
                    risk_coverage: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``/model``'s ``abstain`` section: the threshold, the temperature, and the test coverage/error evaluate
    measured at this threshold (None with a reason when it measured another one, or none)."""
    out: dict[str, Any] = {"abstain_below": abstain_below, "enabled": abstain_below > 0, **temperature.describe(),
                           "expected": None, "expected_note": None}
    if risk_coverage is None:
        out["expected_note"] = "no risk-coverage in the model card (run cvpipe evaluate)"
        return out
    at = risk_coverage.get("threshold")
    if isinstance(at, (int, float)) and abs(float(at) - abstain_below) <= THRESHOLD_TOL:
        out["expected"] = {k: risk_coverage[k] for k in ("coverage", "error", "answered", "aurc") if k in risk_coverage}
    else:
        out["expected_note"] = (f"the card's risk-coverage is at threshold {at}, not {abstain_below:g} "
                                "(re-run cvpipe evaluate with this serve.abstain_below)")
    return out
