"""Load a trained model for serving, with the preprocessing it was evaluated with.

Two layouts are accepted, local or remote (``gs://``, any fsspec URL; copied down
once per version of the remote object by :func:`cvpipe.serve.remote.fetch_model`, so a
re-uploaded model is fetched again; credentials in the URL are never shown):

* a **promoted model folder** (``models/best/``)::

      model.pt            the train checkpoint (required)
      preprocess.json     image_size, resize_mode, mean, std
      classes.json        ["ants", "bees"]
      card.json           arch, test metrics, model cost, data version, params summary
      confusion_matrix.png, leaderboard.md, leaderboard.csv, model.onnx, model.ts

  Only ``model.pt`` is required; what the optional files would say is taken from
  the checkpoint where it can be, and the rest is reported as missing.

* a **bare train checkpoint** (``models/resnet18/best.pt``): preprocessing and
  classes from its keys (``image_size``, ``resize_mode``, ``normalize``,
  ``classes``, ``arch``); the card from ``<metrics>/<arch>/evaluate.json`` and the
  confusion matrix from ``<plots>/<arch>/confusion_matrix.png`` when they exist.

Preprocessing is never re-typed; an upload takes the path a training image took:

1. :func:`cvpipe.data.images.decode_image` validates it like ingest (content sniffing,
   bomb refusal before decoding, EXIF orientation, RGB conversion);
2. ``DecodedImage.encoded`` gives the bytes ingest would have stored (the original
   when it is a clean JPEG/PNG, else ingest's normalized re-encode);
3. :func:`cvpipe.data.resize.decode_for_size` + :func:`cvpipe.data.images.fit_array` with the
   saved size and resize mode, exactly what preprocess did (JPEGs decoded at the same
   reduced DCT scale);
4. :class:`cvpipe.torchkit.loaders.BatchNormalizer` with the saved mean/std: the one
   normalization train and evaluate use (uint8 NHWC -> float NCHW on the device).

So a stored training image fed to the server gives the very array evaluate saw.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cvpipe.core import storage
from cvpipe.core.errors import StageError
from cvpipe.core.urls import redact_text, redact_url
from cvpipe.data.images import BOMB, CORRUPT, DecodedImage, ImageRejected, decode_image, fit_array
from cvpipe.serve import memory
from cvpipe.serve.remote import fetch_model
from cvpipe.torchkit.loaders import BatchNormalizer
from cvpipe.torchkit.runtime import Runtime

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
    "model.onnx": "ONNX export",
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
    module: Any  # torch.nn.Module in eval mode
    device: Any
    source: str
    layout: str  # "folder" or "checkpoint"
    decode_side: int = 0  # preprocess decoded JPEGs at the scale covering this side (>= image_size)
    card: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Optional[Path]] = field(default_factory=dict)  # optional file -> local path or None
    assets: dict[str, bytes] = field(default_factory=dict)  # ASSET_FILES' bytes, read at load
    notes: list[str] = field(default_factory=list)  # what is missing, said plainly
    leaderboard: Optional[list[dict[str, str]]] = None
    leaderboard_md: Optional[str] = None

    def __post_init__(self) -> None:
        # fp32, default memory format: the module is served as loaded (no autocast, no channels_last)
        runtime = Runtime(self.device, amp_dtype=None, use_scaler=False, channels_last=False)
        self._normalize = BatchNormalizer(self.mean, self.std, runtime)
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
        return fit_array(decode_for_size(stored, self.decode_side), self.image_size, self.resize_mode)

    @contextlib.contextmanager
    def decode_slot(self, data: bytes, max_pixels: int, large_pixels: int = LARGE_IMAGE_PIXELS):
        """Held around decoding *data*: images above *large_pixels* (up to *max_pixels*) one at a time,
        their memory returned to the system afterwards; smaller ones (and bombs, refused unread) pass."""
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

    def to_tensor(self, arrays: list[np.ndarray]):
        """uint8 (H, W, 3) arrays -> the normalized float (B, 3, H, W) batch on the device, as evaluate builds it."""
        import torch

        # contiguous NCHW like the module's weights (the normalizer's permute leaves NHWC memory,
        # which would send the convolutions down another kernel path)
        return self._normalize(torch.from_numpy(np.stack(arrays))).contiguous()

    def forward(self, x) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.module(x)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def warm_up(self) -> None:
        """One pass on a blank image: the first call pays one-off allocation costs, not the first user."""
        import torch

        with torch.inference_mode():
            self.forward(self.to_tensor([np.zeros((self.image_size, self.image_size, 3), np.uint8)]))

    def top_k(self, probs: np.ndarray, k: int) -> list[dict[str, Any]]:
        k = max(1, min(k, len(self.classes)))
        order = np.argsort(-probs, kind="stable")[:k]
        return [{"label": self.classes[i], "index": int(i), "probability": round(float(probs[i]), 6)} for i in order]

    def predict_bytes(self, data: bytes, *, k: int, max_pixels: int, min_size: int = 1,
                      max_aspect_ratio: Optional[float] = None) -> Prediction:
        t0 = time.perf_counter()
        with self.decoder_errors():
            decoded = self.decode(data, max_pixels=max_pixels, min_size=min_size, max_aspect_ratio=max_aspect_ratio)
        t1 = time.perf_counter()
        with self.decoder_errors():
            arr = self.to_array(decoded, data)
        x = self.to_tensor([arr])
        t2 = time.perf_counter()
        probs = self.forward(x)[0]
        t3 = time.perf_counter()
        return Prediction(
            top_k=self.top_k(probs, k),
            decode_ms=(t1 - t0) * 1e3,
            preprocess_ms=(t2 - t1) * 1e3,
            inference_ms=(t3 - t2) * 1e3,
            image={"format": decoded.format, "width": decoded.width, "height": decoded.height,
                   "mode": decoded.source_mode, "frames": decoded.frames},
        )

    # ------------------------------------------------------------------ description
    def info(self) -> dict[str, Any]:
        card = self.card
        return {
            "arch": self.arch,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "source": self.source,
            "layout": self.layout,
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


def load_model(uri: str, *, device: str = "cpu", metrics_dir: str = "metrics", plots_dir: str = "plots",
               torch_threads: int = 0) -> ServedModel:
    """Load a promoted model folder or a bare checkpoint (local or remote); raise StageError when impossible."""
    import torch

    from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint
    from cvpipe.torchkit.runtime import resolve_device

    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    shown = redact_url(str(uri))  # the form every message and the card show
    layout, ckpt_path, files = _locate(uri)
    ckpt = load_checkpoint(str(ckpt_path))
    for key in ("arch", "classes", "model"):
        if key not in ckpt:
            raise StageError(f"{ckpt_path} is not a cvpipe train checkpoint (no {key!r})")
    arch = str(ckpt["arch"])

    prep = _read_json(files.get("preprocess.json")) or {}
    image_size, resize_mode, mean, std = _preprocessing(shown, prep, ckpt)
    classes = _read_json(files.get("classes.json")) or list(ckpt["classes"])
    if list(classes) != list(ckpt["classes"]):
        raise StageError(f"{shown}: classes.json {classes} disagrees with the checkpoint's classes {ckpt['classes']}")

    card = _read_json(files.get("card.json")) or {}
    if not isinstance(card, dict):
        card = {}
    notes: list[str] = []
    metrics, cm_path = _test_metrics(card, files.get("confusion_matrix.png"), layout, ckpt_path, arch, metrics_dir,
                                     plots_dir, notes)
    files["confusion_matrix.png"] = cm_path
    if metrics is None:
        notes.append("no test metrics: the model folder has no card.json and no evaluate.json was found (run cvpipe evaluate)")

    module = model_from_checkpoint(ckpt)
    dev = resolve_device(device, "serve.device")
    module.to(dev).eval()
    full_card = _full_card(card, metrics, ckpt, module, ckpt_path)
    leaderboard, leaderboard_md = _leaderboard(files)
    notes += _missing_notes(layout, files)

    model = ServedModel(
        arch=arch, decode_side=_decode_side(prep, ckpt, image_size), classes=list(classes), image_size=int(image_size),
        resize_mode=str(resize_mode), mean=[float(v) for v in mean], std=[float(v) for v in std], module=module,
        device=dev, source=shown, layout=layout, card=full_card, files=files, assets=_read_assets(files), notes=notes,
        leaderboard=leaderboard, leaderboard_md=leaderboard_md,
    )
    model.warm_up()
    return model


def _locate(uri: str) -> tuple[str, Path, dict[str, Optional[Path]]]:
    """The layout ("folder" or "checkpoint"), the local checkpoint and the folder's optional files (local path or None)."""
    shown = redact_url(str(uri))
    try:
        found = storage.exists(uri)
        local = fetch_model(uri) if found and storage.is_remote(uri) else Path(uri)
    except Exception as exc:  # credentials, network, permissions: one line, without the URL's secrets
        raise StageError(redact_text(f"cannot fetch the model {shown}: {type(exc).__name__}: {exc}", [str(uri)])) from None
    if not found:
        raise StageError(
            f"no model at {shown}: give serve.model (or --model) a promoted model folder or a train checkpoint such as models/resnet18/best.pt"
        )
    if not local.is_dir():
        return "checkpoint", local, {}
    ckpt_path = local / "model.pt"
    if not ckpt_path.is_file():
        raise StageError(f"{shown} is a folder without model.pt: not a promoted model folder")
    return "folder", ckpt_path, {name: _find_local(local, name) for name in OPTIONAL_FILES}


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


def _test_metrics(card: dict[str, Any], cm_path: Optional[Path], layout: str, ckpt_path: Path, arch: str,
                  metrics_dir: str, plots_dir: str, notes: list[str]) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """Test metrics and confusion matrix image: the card's, else evaluate's (``<metrics>/<arch>/evaluate.json``)."""
    metrics = card.get("test_metrics") or card.get("metrics")
    if metrics is not None:
        return metrics, cm_path
    candidates = [storage.join(metrics_dir, arch, "evaluate.json")]
    if layout == "checkpoint" and len(ckpt_path.parents) >= 3:
        candidates.append(str(ckpt_path.parents[2] / "metrics" / arch / "evaluate.json"))
    for cand in candidates:
        if storage.exists(cand):
            metrics = _metrics_from_evaluate(storage.read_json(cand))
            notes.append(f"test metrics read from {cand}")
            if cm_path is None:
                cm_path = _confusion_matrix_near(cand, plots_dir, arch)
            break
    return metrics, cm_path


def _confusion_matrix_near(evaluate_json: str, plots_dir: str, arch: str) -> Optional[Path]:
    """evaluate's confusion matrix image in *plots_dir*, else in the plots folder of evaluate.json's project."""
    base = Path(evaluate_json).parents[2] if not storage.is_remote(evaluate_json) else None
    for pc in ([Path(plots_dir) / arch / "confusion_matrix.png"] +
               ([base / "plots" / arch / "confusion_matrix.png"] if base else [])):
        if pc.is_file():
            return pc
    return None


def _full_card(card: dict[str, Any], metrics: Optional[dict[str, Any]], ckpt: dict[str, Any], module,
               ckpt_path: Path) -> dict[str, Any]:
    """The served card: card.json's entries, the rest from the checkpoint and the loaded module."""
    params_m = round(sum(p.numel() for p in module.parameters()) / 1e6, 4)
    size_mb = round(ckpt_path.stat().st_size / 1e6, 2)
    return {
        "test_metrics": metrics,
        "data_version": card.get("data_version") or ckpt.get("dataset_hash"),
        "params_summary": card.get("params_summary") or card.get("params") or _params_summary(ckpt.get("params")),
        "model_cost": card.get("model_cost") or card.get("cost") or {"params_m": params_m, "checkpoint_mb": size_mb},
        "trained_epochs": card.get("trained_epochs") or ckpt.get("epoch"),
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


def _missing_notes(layout: str, files: dict[str, Optional[Path]]) -> list[str]:
    """What the model lacks, said plainly: missing optional files of a folder, or what a bare checkpoint cannot give."""
    notes = []
    for name, what in OPTIONAL_FILES.items():
        if layout == "folder" and files.get(name) is None:
            notes.append(f"{name} missing: no {what}")
    if layout == "checkpoint":
        if files.get("confusion_matrix.png") is None:
            notes.append("no confusion matrix image found (run cvpipe evaluate)")
        notes.append("no leaderboard: a bare checkpoint was loaded, not a promoted model folder (cvpipe compare)")
    return notes


def _decode_side(prep: dict[str, Any], ckpt: dict[str, Any], image_size: Any) -> int:
    """The side preprocess decoded JPEGs for: >= HASH_MIN_SIDE when it hashed for near-duplicates."""
    from cvpipe.data.resize import HASH_MIN_SIDE

    split_cfg = (ckpt.get("params") or {}).get("split") or {}
    hashed = split_cfg.get("near_duplicate_distance", 4) is not None  # split.near_duplicate_distance
    return int(prep.get("decode_side") or (max(int(image_size), HASH_MIN_SIDE) if hashed else int(image_size)))
