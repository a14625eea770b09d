"""Load a trained model for serving, with the preprocessing it was evaluated with.

This module has no torch import (import-linter contract ``serve-torch-free``): the model runs in
one of two backends,

* :mod:`cvpipe.serve.onnx_backend` (ONNX Runtime): a promoted folder's ``model.onnx`` when it takes
  raw uint8 NHWC pixels (evaluate's export since issue #20: float conversion, mean/std and channel
  order inside the graph). What the card needs (arch, classes, epoch, data version, parameter count)
  is in the graph's metadata, so ``model.pt`` is not even read;
* :mod:`cvpipe.serve.torch_backend` (torch eager, imported only when chosen): a bare train checkpoint,
  ``serve.backend: torch``, a non-CPU ``serve.device``, or a folder whose model.onnx is an older
  float-NCHW export (served through torch under ``auto``, with a note on the card; normalizing in
  numpy would be a second copy of the normalization).

``serve.backend: auto`` (default) picks onnxruntime when the folder has a uint8-pixel model.onnx and
``serve.device`` is cpu or auto, else torch; ``onnx`` or ``torch`` force one (``onnx`` on a model
without such a graph is a clear error). ``/model`` and ``/healthz`` report the backend.

Both backends return *calibrated* probabilities (issue #18): model.onnx divides its logits by the
temperature evaluate fitted, and the torch backend divides by the checkpoint's; which temperature, and
from which file, is resolved and cross-checked by :mod:`cvpipe.serve.abstain` and shown in ``/model``.

Two layouts are accepted, local or remote (``gs://``, any fsspec URL; copied down
once per version of the remote object by :func:`cvpipe.serve.remote.fetch_model`, so a
re-uploaded model is fetched again; credentials in the URL are never shown):

* a **promoted model folder** (``models/best/``)::

      model.onnx          uint8-pixel ONNX graph (the onnxruntime backend)
      model.pt            the train checkpoint (the torch backend)
      preprocess.json     image_size, resize_mode, mean, std, decode_side, temperature
      classes.json        ["ants", "bees"]
      card.json           arch, test metrics, model cost, data version, params summary
      confusion_matrix.png, leaderboard.md, leaderboard.csv, model.ts

  ``model.onnx`` or ``model.pt`` is required (the backend's); what the optional files would say is
  taken from the checkpoint or the graph's metadata where it can be, and the rest is reported as missing.

* a **bare train checkpoint** (``models/resnet18/seed42/best.pt``, torch backend): preprocessing and
  classes from its keys (``image_size``, ``resize_mode``, ``normalize``,
  ``classes``, ``arch``); the card from ``<metrics>/<arch>/seed<seed>/evaluate.json`` and the
  confusion matrix from ``<plots>/<arch>/seed<seed>/confusion_matrix.png`` when they exist.

Preprocessing is never re-typed; an upload takes the path a training image took:

1. :func:`cvpipe.data.images.decode_image` validates it like ingest (content sniffing,
   bomb refusal before decoding, EXIF orientation, RGB conversion);
2. ``DecodedImage.encoded`` gives the bytes ingest would have stored (the original
   when it is a clean JPEG/PNG, else ingest's normalized re-encode);
3. :func:`cvpipe.data.resize.decode_for_size` + :func:`cvpipe.data.images.fit_array` with the
   saved size and resize mode, exactly what preprocess did (JPEGs decoded at the same
   reduced DCT scale): the uint8 (S, S, 3) array preprocess stored;
4. the backend: model.onnx normalizes inside the graph; the torch backend with
   :class:`cvpipe.torchkit.loaders.BatchNormalizer` (the normalization train and evaluate use).

So a stored training image fed to the server gives the very array evaluate saw
(tests/test_raw_parity.py checks it byte for byte on real photos and awkward files).

Whatever an upload makes the decoder raise is a rejection (``ImageRejected``, a 4xx), never
a 500. Memory per request is bounded: the header's pixel count is refused above
``serve.max_pixels`` before decoding; images above :data:`LARGE_IMAGE_PIXELS` are decoded
one at a time (:meth:`ServedModel.decode_slot`), each kept as one full-size copy (a
non-JPEG's decoded pixels are used as they are instead of being re-encoded and decoded a
second time), and their memory is handed back to the system afterwards
(:mod:`cvpipe.serve.memory`). Optional files the card shows (the confusion matrix image) are
read into memory at load: removing them while serving changes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from cvpipe.core import storage
from cvpipe.core.config import run_name
from cvpipe.core.errors import StageError
from cvpipe.core.urls import redact_text, redact_url
from cvpipe.data.images import BOMB, CORRUPT, DecodedImage, ImageRejected, decode_image, fit_array
from cvpipe.serve import memory
from cvpipe.serve.abstain import Temperature, find_risk_coverage, resolve_temperature
from cvpipe.serve.remote import fetch_model

log = logging.getLogger("cvpipe.serve")

# images with more pixels than this (~12 MB as RGB) are decoded one at a time
LARGE_IMAGE_PIXELS = 4_000_000  # serve.large_image_pixels' default
# optional files held in memory from load (the rest are read once, at load, into the card)
ASSET_FILES = ("confusion_matrix.png",)
_LARGE_DECODE = threading.Lock()

OPTIONAL_FILES = {
    "preprocess.json": "preprocessing (taken from the checkpoint instead)",
    "classes.json": "class names (taken from the checkpoint instead)",
    "card.json": "model card (test metrics, model cost, data version)",
    "confusion_matrix.png": "confusion matrix image",
    "leaderboard.csv": "leaderboard from cvpipe compare",
    "leaderboard.md": "leaderboard from cvpipe compare (markdown)",
    "model.pt": "train checkpoint (the torch backend)",
    "model.onnx": "ONNX export (the onnxruntime backend)",
    "model.ts": "TorchScript export",
}

# params worth showing on a model card (the checkpoint holds all of them)
SUMMARY_KEYS = {
    "train": ("arch", "pretrained", "finetune", "epochs", "batch_size", "lr", "optimizer", "scheduler",
              "weight_decay", "label_smoothing", "mixup_alpha", "cutmix_alpha", "ema", "seed"),
    "preprocess": ("image_size", "resize_mode"),
    "ingest": ("source",),
    "split": ("strategy", "train", "val", "test", "seed"),
}


@dataclass
class Prediction:
    top_k: list[dict[str, Any]]
    decode_ms: float
    preprocess_ms: float
    inference_ms: float
    image: dict[str, Any]


@dataclass
class ServedModel:
    arch: str
    classes: list[str]
    image_size: int
    resize_mode: str
    mean: list[float]
    std: list[float]
    backend: Any  # OnnxBackend or TorchBackend: run(uint8 NHWC) -> (calibrated) probabilities, describe()
    source: str
    layout: str  # "folder" or "checkpoint"
    decode_side: int = 0  # preprocess decoded JPEGs at the scale covering this side (>= image_size)
    card: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Optional[Path]] = field(default_factory=dict)  # optional file -> local path or None
    assets: dict[str, bytes] = field(default_factory=dict)  # ASSET_FILES' bytes, read at load
    notes: list[str] = field(default_factory=list)  # what is missing, said plainly
    leaderboard: Optional[list[dict[str, str]]] = None
    leaderboard_md: Optional[str] = None
    # the softmax temperature the probabilities are calibrated with (inside model.onnx, or the torch backend's)
    temperature: Temperature = field(default_factory=lambda: Temperature(None, "unknown", ""))
    risk_coverage: Optional[dict[str, Any]] = None  # evaluate's {threshold, coverage, error, aurc}, when the card has it

    def __post_init__(self) -> None:
        self.decode_side = max(self.decode_side, self.image_size)

    # ------------------------------------------------------------------ inference
    def decode(self, data: bytes, *, max_pixels: int, min_size: int = 1, max_aspect_ratio: Optional[float] = None) -> DecodedImage:
        """Validate and decode upload bytes; raises :class:`cvpipe.data.images.ImageRejected`."""
        return decode_image(data, max_pixels=max_pixels, min_size=min_size, max_aspect_ratio=max_aspect_ratio)

    def to_array(self, decoded: DecodedImage, original: bytes) -> np.ndarray:
        """The evaluation input: (H, W, 3) uint8 at image_size, decoded and resized as preprocess did.

        A JPEG goes the stored bytes' way (the original when clean, else ingest's re-encode) through
        :func:`cvpipe.data.resize.decode_for_size`, at the reduced DCT scale preprocess used. Any other
        format is stored as a lossless PNG of the decoded pixels, which preprocess decodes back to the
        same pixels: those are used as they are, with no second full-size decode (and ``decoded.image``
        is released as soon as they are copied: one full-size copy at a time).
        """
        from cvpipe.data.resize import decode_for_size

        if decoded.image is not None and decoded.format != "JPEG":
            pixels = np.asarray(decoded.image)
            decoded.image = None  # one full-size copy at a time
            return fit_array(pixels, self.image_size, self.resize_mode)
        stored, _ = decoded.encoded(original)
        # the stored bytes' size is the decoded (upright) size: no third header parse per request (preprocess
        # passes the same size from ingest's manifest; decode_for_size re-decodes if a given size were wrong)
        shape = (decoded.width, decoded.height)
        return fit_array(decode_for_size(stored, self.decode_side, shape), self.image_size, self.resize_mode)

    @contextlib.contextmanager
    def decode_slot(self, data: bytes, max_pixels: int, large_pixels: int = LARGE_IMAGE_PIXELS):
        """Held around decoding *data*: images above *large_pixels* (up to *max_pixels*) one at a time,
        their memory returned to the system afterwards; smaller ones (and bombs, refused unread) pass.

        It reads the header before the slot is taken and :func:`decode_image` reads it again inside: a
        header parse is ~0.04 ms on a 110 KB photo (app/README.md "Where a request's CPU goes"), so the
        slot stays a plain wrapper rather than threading an open Pillow image through the decoder."""
        pixels = header_pixels(data)
        if not large_pixels < pixels <= max_pixels:
            yield
            return
        with _LARGE_DECODE:
            try:
                yield
            finally:
                memory.trim()

    @staticmethod
    @contextlib.contextmanager
    def decoder_errors():
        """Around decoding an upload: anything the decoder raises is an :class:`ImageRejected` (a 4xx)."""
        try:
            yield
        except ImageRejected:
            raise
        except MemoryError:
            raise ImageRejected(BOMB, "the image needs more memory to decode than the server has free") from None
        except Exception as exc:  # a decoder bug on a malformed file: the file is refused, the server stays up
            log.warning("decoder failure on an upload: %s: %s", type(exc).__name__, exc)
            raise ImageRejected(CORRUPT, f"the decoder failed on this file ({type(exc).__name__}: {exc})") from None

    def probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Calibrated softmax probabilities [len(arrays), classes] of uint8 (S, S, 3) arrays, run as one batch by
        the backend (the temperature is inside model.onnx, or applied by the torch backend)."""
        return self.backend.run(np.stack(arrays))

    def warm_up(self) -> None:
        """One pass on a blank image: the first call pays one-off allocation costs, not the first user."""
        self.probabilities([np.zeros((self.image_size, self.image_size, 3), np.uint8)])

    def top_k(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-probs, kind="stable")[:k]
        return [{"label": self.classes[i], "index": int(i), "probability": round(float(probs[i]), 6)} for i in order]

    def prepare(self, data: bytes, *, max_pixels: int, min_size: int = 1,
                max_aspect_ratio: Optional[float] = None) -> tuple[np.ndarray, Prediction]:
        """(the model input array, a Prediction without top-k yet): decoding and resizing, the part of a
        request that runs in the request's own thread when inference is micro-batched."""
        t0 = time.perf_counter()
        with self.decoder_errors():
            decoded = self.decode(data, max_pixels=max_pixels, min_size=min_size, max_aspect_ratio=max_aspect_ratio)
        t1 = time.perf_counter()
        with self.decoder_errors():
            arr = self.to_array(decoded, data)
        t2 = time.perf_counter()
        return arr, Prediction(top_k=[], decode_ms=(t1 - t0) * 1e3, preprocess_ms=(t2 - t1) * 1e3, inference_ms=0.0,
                               image={"format": decoded.format, "width": decoded.width, "height": decoded.height,
                                      "mode": decoded.source_mode, "frames": decoded.frames})

    def finish(self, pred: Prediction, arr: np.ndarray, k: int,
               infer: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Prediction:
        """*pred* with the top-k of *arr*'s probabilities; *infer* (one array -> its probabilities) is the
        micro-batcher's submit when ``serve.batch_window_ms`` > 0, else the backend runs the array alone."""
        t0 = time.perf_counter()
        probs = infer(arr) if infer is not None else self.probabilities([arr])[0]
        pred.inference_ms = (time.perf_counter() - t0) * 1e3
        pred.top_k = self.top_k(probs, k)
        return pred

    def predict_bytes(self, data: bytes, *, k: int, max_pixels: int, min_size: int = 1,
                      max_aspect_ratio: Optional[float] = None) -> Prediction:
        """Decode, resize and classify *data* in this thread."""
        arr, pred = self.prepare(data, max_pixels=max_pixels, min_size=min_size, max_aspect_ratio=max_aspect_ratio)
        return self.finish(pred, arr, k)

    # ------------------------------------------------------------------ description
    def info(self) -> dict[str, Any]:
        card = self.card
        return {
            "arch": self.arch,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "source": self.source,
            "layout": self.layout,
            "backend": self.backend.describe(),
            "calibration": self.temperature.describe(),
            "preprocess": {"image_size": self.image_size, "resize_mode": self.resize_mode,
                           "mean": self.mean, "std": self.std},
            "test_metrics": card.get("test_metrics"),
            "data_version": card.get("data_version"),
            "params_summary": card.get("params_summary"),
            "model_cost": card.get("model_cost"),
            "trained_epochs": card.get("trained_epochs"),
            "confusion_matrix_url": "/model/confusion_matrix.png" if "confusion_matrix.png" in self.assets else None,
            "leaderboard": self.leaderboard,
            "leaderboard_md": self.leaderboard_md,
            "files": {name: path is not None for name, path in self.files.items()},
            "notes": self.notes,
        }


def header_pixels(data: bytes) -> int:
    """The pixel count *data*'s image header declares; 0 when Pillow cannot read a header (the decoder refuses it)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
        return int(width) * int(height)
    except Exception:  # any malformed header: decode_image names the problem
        return 0


# ---------------------------------------------------------------------- loading


def _read_json(path: Optional[Path]) -> Optional[Any]:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StageError(f"cannot read {path}: {exc}") from None


def _params_summary(params: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    if not isinstance(params, dict):
        return None
    out: dict[str, Any] = {}
    for section, keys in SUMMARY_KEYS.items():
        sec = params.get(section)
        if isinstance(sec, dict):
            out[section] = {k: _redacted(sec[k]) for k in keys if k in sec}
    return out or None


def _redacted(value: Any) -> Any:
    """*value* with every URL in it (a string, or strings in lists and dicts) redacted: a source may carry credentials."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    return value


def _metrics_from_evaluate(ev: dict[str, Any]) -> dict[str, Any]:
    keep = ("accuracy", "macro_f1", "weighted_f1", "n_test", "checkpoint", "per_class")
    return {k: ev[k] for k in keep if k in ev}


def _find_local(folder: Path, name: str) -> Optional[Path]:
    p = folder / name
    return p if p.is_file() else None


BACKENDS = ("auto", "onnx", "torch")


def auto_threads(concurrent_runs: int) -> int:
    """Intra-op threads per model run when ``serve.onnx_threads`` / ``serve.torch_threads`` is 0: the cores
    this process may use shared by the *concurrent_runs* runs at once. Both libraries default to one thread
    per core for *each* run; with two requests at once on 2 cores that is 4 busy threads on 2 cores, and
    torch eager measured 80-160 ms per run that way under load against 10-11 ms with 1 thread each, and
    16.4 CPU ms per resnet18 run at 64 px against 9.4 (bench/serve.py, app/README.md)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, concurrent_runs))


def load_model(uri: str, *, device: str = "cpu", metrics_dir: str = "metrics", plots_dir: str = "plots",
               reports_dir: Optional[str] = None, torch_threads: int = 0, backend: str = "auto", onnx_threads: int = 0,
               concurrent_runs: int = 1) -> ServedModel:
    """Load a promoted model folder or a bare checkpoint (local or remote) on the backend *backend*
    picks (see the module docstring); raise StageError when impossible. *concurrent_runs* (model runs
    at once: ``serve.inference_threads``, or 1 with the micro-batcher's single worker) sizes the
    backend's intra-op threads (:func:`auto_threads`) when *onnx_threads* / *torch_threads* is 0."""
    if backend not in BACKENDS:
        raise StageError(f"serve.backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    shown = redact_url(str(uri))  # the form every message and the card show
    layout, local, files = _locate(uri)
    notes: list[str] = []
    onnx = _pick_onnx(shown, layout, files, backend, device, onnx_threads, concurrent_runs, notes)
    if onnx is not None:
        meta, run, size_path = dict(onnx.metadata), onnx, files["model.onnx"]
        params_m, ckpt_path = meta.get("params_m"), None
    else:
        ckpt_path = local if layout == "checkpoint" else files.get("model.pt")
        if ckpt_path is None:
            raise StageError(f"{shown} has no model.pt for the torch backend ({'; '.join(notes) or 'serve.backend: torch'})")
        from cvpipe.serve import torch_backend  # only here: the onnxruntime path never imports torch

        meta, module, dev, params_m = torch_backend.load(ckpt_path, device, torch_threads or auto_threads(concurrent_runs))
        size_path = ckpt_path
    arch = str(meta["arch"])

    prep = _read_json(files.get("preprocess.json")) or {}
    image_size, resize_mode, mean, std = _preprocessing(shown, prep, meta)
    classes = _read_json(files.get("classes.json")) or list(meta["classes"])
    if list(classes) != list(meta["classes"]):
        what = "the model.onnx metadata's" if onnx is not None else "the checkpoint's"
        raise StageError(f"{shown}: classes.json {classes} disagrees with {what} classes {meta['classes']}")
    if onnx is not None and onnx.image_size not in (None, int(image_size)):
        raise StageError(f"{shown}: model.onnx takes {onnx.image_size} px images, preprocess.json says {image_size}")
    card = _read_json(files.get("card.json")) or {}
    if not isinstance(card, dict):
        card = {}
    temperature = resolve_temperature(shown, "onnxruntime" if onnx is not None else "torch", model_file=meta,
                                      preprocess=prep, card=card)
    if onnx is None:
        run = torch_backend.TorchBackend(module, mean, std, dev, temperature=temperature.value)
    elif temperature.value is None:
        notes.append(f"calibration {temperature.source}")
    metrics, cm_path = _test_metrics(card, files.get("confusion_matrix.png"), layout, ckpt_path,
                                     _run_folder(arch, meta, local), (reports_dir or _sibling(metrics_dir, "reports"), metrics_dir),
                                     plots_dir, notes)
    files["confusion_matrix.png"] = cm_path
    if metrics is None:
        notes.append("no test metrics: the model folder has no card.json and no evaluate.json was found (run cvpipe evaluate)")
    full_card = _full_card(card, metrics, meta, params_m, size_path)
    leaderboard, leaderboard_md = _leaderboard(files)
    notes += _missing_notes(layout, files, run.name)

    model = ServedModel(
        arch=arch, decode_side=_decode_side(prep, meta, image_size), classes=list(classes), image_size=int(image_size),
        resize_mode=str(resize_mode), mean=[float(v) for v in mean], std=[float(v) for v in std], backend=run,
        source=shown, layout=layout, card=full_card, files=files, assets=_read_assets(files), notes=notes,
        leaderboard=leaderboard, leaderboard_md=leaderboard_md, temperature=temperature,
        risk_coverage=find_risk_coverage(card, local if layout == "folder" else None),
    )
    model.warm_up()
    return model


def _pick_onnx(shown: str, layout: str, files: dict[str, Optional[Path]], backend: str, device: str, onnx_threads: int,
               concurrent_runs: int, notes: list[str]):
    """The onnxruntime backend when *backend* and the model allow it, else None (torch), with the reason in *notes*."""
    if backend == "torch":
        return None
    from cvpipe.serve import onnx_backend

    why = ""
    if layout == "checkpoint":
        why = "a bare checkpoint has no model.onnx (serve a promoted model folder for onnxruntime)"
    elif files.get("model.onnx") is None:
        why = "the folder has no model.onnx"
    elif backend == "auto" and device not in ("cpu", "auto"):
        why = f"serve.device is {device} and the onnxruntime backend runs on the CPU"
    if not why:
        threads = onnx_threads or auto_threads(concurrent_runs)
        try:
            found, why = onnx_backend.open_pixel_model(files["model.onnx"], threads)
        except StageError as exc:  # no onnxruntime, an unreadable graph: auto falls back to torch, saying why
            if backend == "onnx":
                raise
            found, why = None, str(exc)
        if found is not None:
            return found
    if backend == "onnx":
        raise StageError(f"serve.backend is onnx, but {shown}: {why}")
    if layout == "folder":
        notes.append(f"served through torch: {why}")
    return None


def _locate(uri: str) -> tuple[str, Path, dict[str, Optional[Path]]]:
    """The layout ("folder" or "checkpoint"), the local folder or checkpoint, and the folder's files (local path or None)."""
    shown = redact_url(str(uri))
    try:
        found = storage.exists(uri)
        local = fetch_model(uri) if found and storage.is_remote(uri) else Path(uri)
    except Exception as exc:  # credentials, network, permissions: one line, without the URL's secrets
        raise StageError(redact_text(f"cannot fetch the model {shown}: {type(exc).__name__}: {exc}", [str(uri)])) from None
    if not found:
        raise StageError(
            f"no model at {shown}: give serve.model (or --model) a promoted model folder or a train checkpoint such as models/resnet18/seed42/best.pt"
        )
    if not local.is_dir():
        return "checkpoint", local, {}
    files = {name: _find_local(local, name) for name in OPTIONAL_FILES}
    if files["model.pt"] is None and files["model.onnx"] is None:
        raise StageError(f"{shown} is a folder without model.pt or model.onnx: not a promoted model folder")
    return "folder", local, files


def _preprocessing(shown: str, prep: dict[str, Any], ckpt: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """image_size, resize_mode, mean, std: preprocess.json's where it says, else the checkpoint's."""
    norm = ckpt.get("normalize") or {}
    image_size = prep.get("image_size", ckpt.get("image_size"))
    resize_mode = prep.get("resize_mode", ckpt.get("resize_mode")) or "shorter_side_center_crop"
    mean = prep.get("mean", norm.get("mean"))
    std = prep.get("std", norm.get("std"))
    if image_size is None or mean is None or std is None:
        raise StageError(f"{shown}: the saved preprocessing is incomplete (image_size={image_size}, mean={mean}, std={std})")
    return image_size, resize_mode, mean, std


def _run_folder(arch: str, meta: dict[str, Any], local: Path) -> str:
    """The model's run folder under metrics/ and plots/ (``cvpipe.core.config.run_name``: ``<arch>/seed<seed>``):
    the seed from the checkpoint's params, else from a ``.../<arch>/seed<N>/`` model path; ``<arch>`` alone when
    neither says (a model from before the bake-off had seeds)."""
    train = meta.get("params", {}).get("train") if isinstance(meta.get("params"), dict) else None
    seed = train.get("seed") if isinstance(train, dict) else None
    folder = local.parent if local.suffix in (".pt", ".pth") else local
    if seed is None and folder.parent.name == arch and re.fullmatch(r"seed\d+", folder.name):
        seed = int(folder.name[4:])
    return arch if seed is None else run_name(arch, int(seed))


def _test_metrics(card: dict[str, Any], cm_path: Optional[Path], layout: str, ckpt_path: Path, run: str,
                  dirs: tuple[str, str], plots_dir: str, notes: list[str]) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """Test metrics and confusion matrix image: the card's, else evaluate's full report
    (``<reports>/<run>/evaluate.json``), else its headline (``<metrics>/<run>/evaluate.json``); *dirs* is
    (reports, metrics), *run* from :func:`_run_folder`."""
    metrics = card.get("test_metrics") or card.get("metrics")
    if metrics is not None:
        return metrics, cm_path
    candidates = [storage.join(d, run, "evaluate.json") for d in dirs]
    depth = len(Path(run).parts)  # models/<arch>/seed<N>/best.pt: the project is depth + 1 folders above
    if layout == "checkpoint" and len(ckpt_path.parents) >= depth + 2:
        candidates += [str(ckpt_path.parents[depth + 1] / sub / run / "evaluate.json") for sub in ("reports", "metrics")]
    for cand in candidates:
        if storage.exists(cand):
            metrics = _metrics_from_evaluate(storage.read_json(cand))
            notes.append(f"test metrics read from {cand}")
            if cm_path is None:
                cm_path = _confusion_matrix_near(cand, plots_dir, run)
            break
    return metrics, cm_path


def _sibling(folder: str, name: str) -> str:
    """*name* beside *folder* (``<project>/metrics`` -> ``<project>/reports``), local or remote."""
    folder = str(folder).rstrip("/")
    parent = folder.rsplit("/", 1)[0] if "/" in folder else ""
    return storage.join(parent, name) if parent else name


def _confusion_matrix_near(evaluate_json: str, plots_dir: str, run: str) -> Optional[Path]:
    """evaluate's confusion matrix image in *plots_dir*, else in the plots folder of evaluate.json's project
    (``<project>/metrics/<run>/evaluate.json``)."""
    depth = len(Path(run).parts)
    local = not storage.is_remote(evaluate_json) and len(Path(evaluate_json).parents) >= depth + 2
    base = Path(evaluate_json).parents[depth + 1] if local else None
    for pc in ([Path(plots_dir) / run / "confusion_matrix.png"] +
               ([base / "plots" / run / "confusion_matrix.png"] if base else [])):
        if pc.is_file():
            return pc
    return None


def _full_card(card: dict[str, Any], metrics: Optional[dict[str, Any]], meta: dict[str, Any], params_m: Optional[float],
               model_path: Path) -> dict[str, Any]:
    """The served card: card.json's entries, the rest from the checkpoint (or the graph's metadata) and the model file."""
    size_mb = round(model_path.stat().st_size / 1e6, 2)
    size_key = "onnx_mb" if model_path.suffix == ".onnx" else "checkpoint_mb"
    return {
        "test_metrics": metrics,
        "data_version": card.get("data_version") or meta.get("dataset_hash"),
        "params_summary": card.get("params_summary") or card.get("params") or _params_summary(meta.get("params")),
        "model_cost": card.get("model_cost") or card.get("cost") or {"params_m": params_m, size_key: size_mb},
        "trained_epochs": card.get("trained_epochs") or meta.get("epoch"),
    }


def _read_assets(files: dict[str, Optional[Path]]) -> dict[str, bytes]:
    """The bytes of the ASSET_FILES the model has, read now: the card never depends on the files staying."""
    assets = {}
    for name in ASSET_FILES:
        if files.get(name) is not None:
            try:
                assets[name] = files[name].read_bytes()
            except OSError as exc:
                raise StageError(f"cannot read {files[name]}: {exc.strerror or exc}") from None
    return assets


def _leaderboard(files: dict[str, Optional[Path]]) -> tuple[Optional[list[dict[str, str]]], Optional[str]]:
    """compare's leaderboard rows (leaderboard.csv) and markdown (leaderboard.md), None where missing."""
    leaderboard = None
    if files.get("leaderboard.csv"):
        with open(files["leaderboard.csv"], newline="", encoding="utf-8") as fh:
            leaderboard = list(csv.DictReader(fh))
    leaderboard_md = files["leaderboard.md"].read_text(encoding="utf-8") if files.get("leaderboard.md") else None
    return leaderboard, leaderboard_md


def _missing_notes(layout: str, files: dict[str, Optional[Path]], backend: str) -> list[str]:
    """What the model lacks, said plainly: missing optional files of a folder, or what a bare checkpoint cannot give
    (model.pt is not missed when onnxruntime serves: it is the torch backend's file)."""
    notes = []
    for name, what in OPTIONAL_FILES.items():
        if name == "model.pt" and backend != "torch":
            continue
        if layout == "folder" and files.get(name) is None:
            notes.append(f"{name} missing: no {what}")
    if layout == "checkpoint":
        if files.get("confusion_matrix.png") is None:
            notes.append("no confusion matrix image found (run cvpipe evaluate)")
        notes.append("no leaderboard: a bare checkpoint was loaded, not a promoted model folder (cvpipe compare)")
    return notes


def _decode_side(prep: dict[str, Any], ckpt: dict[str, Any], image_size: Any) -> int:
    """The side preprocess decoded JPEGs for: >= HASH_MIN_SIDE when it hashed for near-duplicates (the
    checkpoint's params, or the same params in model.onnx's metadata; preprocess.json may say it)."""
    from cvpipe.data.resize import HASH_MIN_SIDE

    split_cfg = (ckpt.get("params") or {}).get("split") or {}
    hashed = split_cfg.get("near_duplicate_distance", 4) is not None  # split.near_duplicate_distance
    return int(prep.get("decode_side") or (max(int(image_size), HASH_MIN_SIDE) if hashed else int(image_size)))
