"""Export an evaluated model to TorchScript and ONNX, with its class map and preprocessing beside it.

Bundle layout (``<paths.exports>/<arch>/``, also what ``cvpipe compare`` promotes to ``models/best/``)::

    model.pt          the checkpoint, slimmed to what inference needs (arch, classes, normalize,
                      image_size, resize_mode, model = the evaluated weights, epoch, params, dataset_hash)
    model.ts          TorchScript (torch.jit.trace)
    model.onnx        ONNX (opset 18, dynamic batch axis)
    preprocess.json   {"image_size", "resize_mode", "mean", "std", "interpolation", "input"}
    classes.json      ["class0", ...] (index = output logit)

Both exports take float32 NCHW input already normalized ((x/255 - mean) / std) and return logits.
``parity`` runs eager, TorchScript and ONNX Runtime on the same real images and reports the
max absolute logit difference of each export against eager fp32.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cvpipe.core.errors import StageError

ONNX_OPSET = 18
SLIM_KEYS = ("arch", "classes", "normalize", "image_size", "resize_mode", "epoch", "params", "dataset_hash", "wandb_run_id")


def slim_checkpoint(ckpt: dict[str, Any], state_dict: dict[str, Any], weights: str) -> dict[str, Any]:
    out = {k: ckpt.get(k) for k in SLIM_KEYS}
    out["model"] = state_dict
    out["weights"] = weights
    return out


def preprocess_config(ckpt: dict[str, Any]) -> dict[str, Any]:
    return {
        "image_size": int(ckpt["image_size"]),
        "resize_mode": ckpt.get("resize_mode"),
        "mean": [float(v) for v in ckpt["normalize"]["mean"]],
        "std": [float(v) for v in ckpt["normalize"]["std"]],
        "interpolation": ckpt["normalize"].get("interpolation"),
        "input": "float32 NCHW RGB, (pixel/255 - mean) / std; output: logits",
    }


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


def to_onnx(model, example) -> bytes:
    import tempfile
    import warnings

    with tempfile.TemporaryDirectory(prefix="cvpipe-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _onnx_export(
                model, (example,), str(path), input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET, dynamo=False,
            )
        import onnx

        onnx.checker.check_model(str(path))
        return path.read_bytes()


def write_bundle(folder: Path, ckpt: dict[str, Any], model, weights: str, example) -> dict[str, int]:
    """Write the bundle into ``folder`` (a staged dir); returns file sizes."""
    import torch

    cpu_model = model.to("cpu").float().eval().to(memory_format=torch.contiguous_format)
    example = example.to("cpu").float().contiguous()
    buf = io.BytesIO()
    torch.save(slim_checkpoint(ckpt, {k: v.cpu() for k, v in cpu_model.state_dict().items()}, weights), buf)
    files = {
        "model.pt": buf.getvalue(),
        "model.ts": to_torchscript(cpu_model, example),
        "model.onnx": to_onnx(cpu_model, example),
        "preprocess.json": (json.dumps(preprocess_config(ckpt), indent=2) + "\n").encode(),
        "classes.json": (json.dumps(list(ckpt["classes"])) + "\n").encode(),
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: len(data) for name, data in files.items()}


def parity(model, folder: Path, inputs) -> dict[str, Any]:
    """Max |logit difference| of TorchScript and ONNX Runtime against eager fp32 on ``inputs`` (normalized NCHW)."""
    import warnings

    import torch

    x = inputs.to("cpu").float().contiguous()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = model.to("cpu").float().eval()(x).numpy()
        ts = torch.jit.load(str(folder / "model.ts"), map_location="cpu")
        ts_out = ts(x).numpy()
    try:
        import onnxruntime as ort
    except ImportError as exc:  # the evaluate image installs it; say so instead of a traceback
        raise StageError(f"ONNX parity needs onnxruntime: {exc}") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    onnx_out = sess.run(["logits"], {"input": x.numpy()})[0]
    return {
        "images": int(x.shape[0]),
        "torchscript_max_abs_diff": float(np.abs(ts_out - ref).max()),
        "onnx_max_abs_diff": float(np.abs(onnx_out - ref).max()),
        "logit_abs_max": float(np.abs(ref).max()),
        "argmax_agree_torchscript": float((ts_out.argmax(1) == ref.argmax(1)).mean()),
        "argmax_agree_onnx": float((onnx_out.argmax(1) == ref.argmax(1)).mean()),
    }
