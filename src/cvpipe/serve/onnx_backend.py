"""Serve a model.onnx that takes raw pixels (issue #20) through ONNX Runtime: no torch in the process.

The graph evaluate exports (:mod:`cvpipe.evaluate.export`) takes ``pixels``, uint8 NHWC RGB
``[batch, S, S, 3]``, and does the float conversion, the mean/std normalization and the NCHW
transpose itself; this backend only stacks the arrays :meth:`cvpipe.serve.model.ServedModel.to_array`
made (the preprocess functions) and applies a softmax to the ``logits``. Those are already divided by the
temperature evaluate fitted (issue #18), so the softmax is the calibrated probabilities the abstain rule
(``serve.abstain_below``, :mod:`cvpipe.serve.abstain`) needs; nothing is divided here.

Session options are set for the machine (:func:`session_options`): ``intra_op_num_threads`` from
``serve.onnx_threads`` (0 = :func:`cvpipe.serve.model.auto_threads`: the cores this process may use
divided by the model runs at once, ``serve.inference_threads`` or 1 when the micro-batcher's single
worker runs every batch, so concurrent requests do not oversubscribe the CPU; ORT's own default is
one thread per core for *each* run), graph optimizations ``ORT_ENABLE_ALL``, and the CPU execution
provider (the app image's onnxruntime is the CPU build; ``serve.device`` other than cpu selects the
torch backend).

With more than one intra-op thread the pool's threads do not spin
(``session.intra_op.allow_spinning = 0``): ORT's workers otherwise busy-wait for the next op
between ops and runs, which on a shared 2-core box took CPU from the request threads decoding
the next upload: 2 threads per run x 2 runs at once, resnet18 at 64 px, 5.0 CPU ms per run
spinning against 3.2 not spinning, and 21 CPU ms burned in half a second of idleness against 0.1.
The session is sequential (``ORT_SEQUENTIAL``), so its inter-op pool is never created and needs no
setting (:data:`INTER_OP_THREADS` = 1 says so).

An older bundle's model.onnx takes float NCHW already normalized: :func:`open_pixel_model` says so and
``serve.backend: auto`` serves such a folder through torch instead (normalizing in numpy here would
be a second copy of the normalization, the thing issue #20 removes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cvpipe.core.errors import StageError

NAME = "onnxruntime"


def _ort():
    try:
        import onnxruntime as ort
    except ImportError as exc:  # the app image installs it; a bare dev env may not
        raise StageError(f"serve.backend onnx needs onnxruntime ({exc}); pip install onnxruntime") from None
    return ort


INTER_OP_THREADS = 1  # sequential execution: no inter-op pool


def session_options(threads: int):
    """The :class:`onnxruntime.SessionOptions` for *threads* intra-op threads per run (see the module docstring)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = INTER_OP_THREADS
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 1:  # a 1-thread pool has no workers to spin
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class OnnxBackend:
    """An ONNX Runtime session on a uint8-pixel model.onnx; :meth:`run` maps uint8 NHWC -> probabilities."""

    name = NAME

    def __init__(self, path: Path, threads: int):
        ort = _ort()
        opts = session_options(threads)
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # a corrupt or foreign file: one line, not ORT's traceback
            raise StageError(f"cannot load {path.name} with onnxruntime: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.path, self.threads = path, threads
        inputs = self.session.get_inputs()
        self.input = inputs[0]
        raw = self.session.get_modelmeta().custom_metadata_map.get("cvpipe")
        self.metadata: dict[str, Any] = json.loads(raw) if raw else {}

    @property
    def takes_pixels(self) -> bool:
        """True for the uint8 NHWC graph of issue #20 (False for an older float NCHW export)."""
        shape = self.input.shape
        return self.input.type == "tensor(uint8)" and len(shape) == 4 and shape[3] == 3

    @property
    def image_size(self) -> Optional[int]:
        side = self.input.shape[1]
        return side if isinstance(side, int) else None

    def run(self, pixels: np.ndarray) -> np.ndarray:
        """Softmax probabilities (float32, [batch, classes]) of uint8 NHWC *pixels*."""
        logits = self.session.run(None, {self.input.name: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]
        z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def describe(self) -> dict[str, Any]:
        return {"name": NAME, "file": self.path.name, "input": f"{self.input.name}: uint8 NHWC {self.input.shape}",
                "intra_op_threads": self.threads, "intra_op_allow_spinning": "0" if self.threads > 1 else None,
                "graph_optimization": "ORT_ENABLE_ALL",
                "providers": self.session.get_providers()}


def open_pixel_model(path: Path, threads: int) -> tuple[Optional[OnnxBackend], str]:
    """(the backend, "") when *path* is a uint8-pixel model.onnx, else (None, why not)."""
    backend = OnnxBackend(path, threads)
    if not backend.takes_pixels:
        return None, (f"{path.name} takes {backend.input.type} {backend.input.shape} (an export from before "
                      "the uint8-pixel graph; re-run cvpipe evaluate to export one)")
    if not backend.metadata.get("classes") or not backend.metadata.get("arch"):
        return None, f"{path.name} has no cvpipe metadata (arch, classes): re-run cvpipe evaluate to export it"
    return backend, ""
