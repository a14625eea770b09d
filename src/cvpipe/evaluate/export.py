"""Export an evaluated model to TorchScript and ONNX, with its class map and preprocessing beside it.

Bundle layout (``<paths.exports>/<arch>/seed<seed>/``, also what ``cvpipe compare`` promotes to ``models/best/``)::

    model.pt          the checkpoint, slimmed to what inference needs (arch, classes, normalize,
                      image_size, resize_mode, model = the evaluated weights, epoch, params, dataset_hash,
                      temperature)
    model.ts          TorchScript (torch.jit.trace), output logits / temperature
    model.onnx        ONNX (opset 18, dynamic batch axis), input ``pixels``: uint8 NHWC RGB, output logits / temperature
    preprocess.json   {"image_size", "resize_mode", "mean", "std", "interpolation", "input", "onnx_input", "temperature"}
    classes.json      ["class0", ...] (index = output logit)

**Calibrated outputs** (issue #18): evaluate fits one temperature T on the val split
(:mod:`cvpipe.evaluate.calibration`); both exports divide the logits by T inside the graph
(:class:`Tempered`), so ``softmax`` of what TorchScript, ONNX Runtime and the app get is the calibrated
probability with no extra step. model.pt keeps the raw weights and stores ``"temperature"`` (a torch
consumer divides by it; 1.0 when absent), as does preprocess.json and the ONNX metadata.

**model.onnx takes what the server has** (issue #20): ``pixels``, uint8, NHWC, RGB,
``[batch, image_size, image_size, 3]`` (dynamic batch): the array
:func:`cvpipe.data.resize.decode_for_size` + :func:`cvpipe.data.images.fit_array` give, the very
array preprocess stores. The conversion to float, the normalization with the model's mean/std and
the NHWC -> NCHW transpose are inside the graph (:class:`PixelModel`, the same arithmetic as
:class:`cvpipe.torchkit.loaders.BatchNormalizer`), so a server needs no torch and cannot normalize
differently from training. It returns ``logits`` [batch, classes]. The graph's metadata
(``cvpipe`` key, JSON) carries arch, classes, epoch, data version, the train params (the server
reads the JPEG decode side and the card's summary from them) and the parameter count, so the ONNX
Runtime server needs no torch checkpoint.

model.ts is unchanged: float32 NCHW already normalized ((x/255 - mean) / std), for torch users who
batch their own tensors (moving it to uint8 would change its contract for no serving gain: the app
never runs TorchScript).

``parity`` runs eager on the normalized tensors (BatchNormalizer) and divides by T, TorchScript on the
same tensors and ONNX Runtime on the raw uint8 pixels, and reports the max absolute (tempered) logit
difference of each export against eager fp32.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.core.errors import StageError

ONNX_OPSET = 18
ONNX_INPUT = "pixels"
ONNX_INPUT_LAYOUT = ("uint8 NHWC RGB [batch, image_size, image_size, 3]; float, /255, mean/std and NCHW inside the graph; "
                     "output: logits / temperature")
SLIM_KEYS = ("arch", "classes", "normalize", "image_size", "resize_mode", "epoch", "params", "dataset_hash", "wandb_run_id")


def slim_checkpoint(ckpt: dict[str, Any], state_dict: dict[str, Any], weights: str, temperature: float = 1.0) -> dict[str, Any]:
    out = {k: ckpt.get(k) for k in SLIM_KEYS}
    out["model"] = state_dict
    out["weights"] = weights
    out["temperature"] = float(temperature)
    return out


def preprocess_config(ckpt: dict[str, Any], temperature: float = 1.0) -> dict[str, Any]:
    return {
        "image_size": int(ckpt["image_size"]),
        "resize_mode": ckpt.get("resize_mode"),
        "mean": [float(v) for v in ckpt["normalize"]["mean"]],
        "std": [float(v) for v in ckpt["normalize"]["std"]],
        "interpolation": ckpt["normalize"].get("interpolation"),
        "input": "model.ts: float32 NCHW RGB, (pixel/255 - mean) / std; output: logits / temperature",
        "onnx_input": ONNX_INPUT_LAYOUT,
        "temperature": float(temperature),
    }


def onnx_metadata(ckpt: dict[str, Any], model, temperature: float = 1.0) -> dict[str, str]:
    """What the ONNX Runtime server shows on the model card without loading model.pt (it has no torch)."""
    params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 4)
    meta = {"arch": ckpt["arch"], "classes": list(ckpt["classes"]), "epoch": ckpt.get("epoch"),
            "dataset_hash": ckpt.get("dataset_hash"), "params": ckpt.get("params"), "params_m": params_m,
            "temperature": float(temperature)}
    return {"cvpipe": json.dumps(meta, default=str)}


def tempered(model, temperature: float):
    """*model* with its logits divided by *temperature* (a buffer, so TorchScript/ONNX carry it as a constant)."""
    import torch

    class Tempered(torch.nn.Module):
        """``inner(x) / T``: the calibrated logits (softmax of them = temperature-scaled probabilities)."""

        def __init__(self, inner, temperature: float):
            super().__init__()
            self.inner = inner
            self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

        def forward(self, x):
            return self.inner(x) / self.temperature

    return Tempered(model, temperature).eval()


def pixel_model(model, mean, std):
    """*model* behind the serving input: uint8 NHWC pixels in, logits out (see the module docstring)."""
    import torch

    class PixelModel(torch.nn.Module):
        """Float, normalize and transpose in the graph, with BatchNormalizer's arithmetic
        (``(x - 255*mean) / (255*std)`` in float32) so eager and export see the same numbers."""

        def __init__(self, inner, mean, std):
            super().__init__()
            self.inner = inner
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

        def forward(self, pixels):
            x = pixels.permute(0, 3, 1, 2).float()
            return self.inner((x - self.mean) / self.std)

    return PixelModel(model, mean, std).eval()


def to_torchscript(model, example) -> bytes:
    import warnings

    import torch

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example, check_trace=False)
        traced = torch.jit.freeze(traced.eval())
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
    return buf.getvalue()


def _onnx_export(model, args, path, **kw) -> None:
    import torch

    try:
        torch.onnx.export(model, args, path, **kw)
    except Exception as exc:
        raise StageError(
            f"ONNX export failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "set evaluate.export: false to evaluate without exports"
        ) from None


def to_onnx(model, pixels, metadata: dict[str, str]) -> bytes:
    """ONNX of *model* (a :func:`pixel_model`) on uint8 NHWC *pixels*, with *metadata* in the graph's metadata_props."""
    import tempfile
    import warnings

    with tempfile.TemporaryDirectory(prefix="cvpipe-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _onnx_export(
                model, (pixels,), str(path), input_names=[ONNX_INPUT], output_names=["logits"],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
            )
        import onnx

        proto = onnx.load(str(path))
        for key, value in metadata.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        return proto.SerializeToString()


def write_bundle(folder: Path, ckpt: dict[str, Any], model, weights: str, example, temperature: float = 1.0) -> dict[str, int]:
    """Write the bundle into ``folder`` (a staged dir); returns file sizes. The exports output logits / *temperature*."""
    import torch

    cpu_model = model.to("cpu").float().eval().to(memory_format=torch.contiguous_format)
    example = example.to("cpu").float().contiguous()
    buf = io.BytesIO()
    torch.save(slim_checkpoint(ckpt, {k: v.cpu() for k, v in cpu_model.state_dict().items()}, weights, temperature), buf)
    size = int(ckpt["image_size"])
    pixels = torch.zeros((1, size, size, 3), dtype=torch.uint8)
    calibrated = tempered(cpu_model, temperature)
    served = pixel_model(calibrated, ckpt["normalize"]["mean"], ckpt["normalize"]["std"])
    files = {
        "model.pt": buf.getvalue(),
        "model.ts": to_torchscript(calibrated, example),
        "model.onnx": to_onnx(served, pixels, onnx_metadata(ckpt, cpu_model, temperature)),
        "preprocess.json": (json.dumps(preprocess_config(ckpt, temperature), indent=2) + "\n").encode(),
        "classes.json": (json.dumps(list(ckpt["classes"])) + "\n").encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: len(data) for name, data in files.items()}


def parity(model, folder: Path, inputs, pixels: np.ndarray, temperature: float = 1.0) -> dict[str, Any]:
    """Max |logit difference| against eager fp32 logits / *temperature* on ``inputs`` (the normalized NCHW
    tensors of the uint8 NHWC ``pixels``, as BatchNormalizer makes them): TorchScript on ``inputs``, ONNX
    Runtime on ``pixels``; both exports divide by the temperature themselves."""
    import warnings

    import torch

    x = inputs.to("cpu").float().contiguous()
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    if pixels.shape != (x.shape[0], x.shape[2], x.shape[3], 3):
        raise StageError(f"parity: pixels {pixels.shape} do not match the tensors {tuple(x.shape)} (uint8 NHWC expected)")
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = (model.to("cpu").float().eval()(x) / float(temperature)).numpy()
        ts = torch.jit.load(str(folder / "model.ts"), map_location="cpu")
        ts_out = ts(x).numpy()
    try:
        import onnxruntime as ort
    except ImportError as exc:  # the evaluate image installs it; say so instead of a traceback
        raise StageError(f"ONNX parity needs onnxruntime: {exc}") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    onnx_out = sess.run(["logits"], {ONNX_INPUT: pixels})[0]
    return {
        "images": int(x.shape[0]),
        "onnx_input": "uint8 NHWC pixels",
        "temperature": float(temperature),
        "torchscript_max_abs_diff": float(np.abs(ts_out - ref).max()),
        "onnx_max_abs_diff": float(np.abs(onnx_out - ref).max()),
        "logit_abs_max": float(np.abs(ref).max()),
        "argmax_agree_torchscript": float((ts_out.argmax(1) == ref.argmax(1)).mean()),
        "argmax_agree_onnx": float((onnx_out.argmax(1) == ref.argmax(1)).mean()),
    }
