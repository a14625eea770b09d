"""Export: TorchScript and ONNX of a model agree with eager PyTorch on real photos (max |logit diff| <= 1e-4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvpipe.evaluate import export
from cvpipe.torchkit.models import create, data_config


def _real_batch(real_data: Path, size: int, mean, std, n: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """(normalized NCHW tensors as evaluate makes them, the uint8 NHWC pixels they come from)."""
    from cvpipe.torchkit.loaders import BatchNormalizer
    from cvpipe.torchkit.runtime import resolve_runtime

    files = sorted((real_data / "hymenoptera_data" / "val").rglob("*.jpg"))[:n]
    assert len(files) == n
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files])
    norm = BatchNormalizer(mean, std, resolve_runtime("cpu", "off", False, key="train"))
    return norm(torch.from_numpy(pixels)).contiguous(), pixels


@pytest.mark.realdata
@pytest.mark.parametrize("arch", ["resnet18", "test_vit"])
def test_torchscript_and_onnx_parity_on_real_images(arch, real_data, tmp_path):
    torch.manual_seed(0)
    model = create(arch, num_classes=2).eval()
    cfg = data_config(model)
    size = 64 if arch == "resnet18" else model.pretrained_cfg["input_size"][-1]  # the ViT at its own size (no pos-embed resampling)
    ckpt = {"arch": arch, "classes": ["ants", "bees"], "normalize": cfg, "image_size": size, "resize_mode": "shorter_side_center_crop",
            "epoch": 0, "params": {}, "dataset_hash": "x", "model": model.state_dict()}
    x, pixels = _real_batch(real_data, size, cfg["mean"], cfg["std"])
    sizes = export.write_bundle(tmp_path, ckpt, model, "model", x[:1])
    assert sizes["model.onnx"] > 1000 and sizes["model.ts"] > 1000
    rep = export.parity(model, tmp_path, x, pixels)
    assert rep["images"] == 8
    assert rep["torchscript_max_abs_diff"] <= 1e-4 and rep["onnx_max_abs_diff"] <= 1e-4, rep
    assert rep["argmax_agree_onnx"] == 1.0 and rep["argmax_agree_torchscript"] == 1.0
    # the logits are not trivially zero (the bound means something)
    assert rep["logit_abs_max"] > 1e-3

    pre = json.loads((tmp_path / "preprocess.json").read_text())
    assert pre["image_size"] == size and pre["mean"] == pytest.approx(cfg["mean"]) and pre["std"] == pytest.approx(cfg["std"])
    assert pre["onnx_input"].startswith("uint8 NHWC RGB")
    assert json.loads((tmp_path / "classes.json").read_text()) == ["ants", "bees"]
    from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint

    back = load_checkpoint(tmp_path / "model.pt")
    assert back["arch"] == arch and back["weights"] == "model"
    with torch.inference_mode():
        assert torch.allclose(model_from_checkpoint(back).eval()(x), model(x), atol=1e-6)


def test_onnx_takes_uint8_nhwc_pixels_with_a_dynamic_batch_and_carries_its_metadata(tmp_path):
    import onnxruntime as ort

    model = create("test_resnet", num_classes=3).eval()
    ckpt = {"arch": "test_resnet", "classes": ["a", "b", "c"], "normalize": data_config(model), "image_size": 32,
            "resize_mode": "stretch", "epoch": 1, "params": {}, "dataset_hash": "x", "model": model.state_dict()}
    export.write_bundle(tmp_path, ckpt, model, "model", torch.randn(1, 3, 32, 32))
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert inp.name == "pixels" and inp.type == "tensor(uint8)" and inp.shape[1:] == [32, 32, 3]
    rng = np.random.default_rng(0)
    for n in (1, 5):
        out = sess.run(["logits"], {"pixels": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)})[0]
        assert out.shape == (n, 3)
    with pytest.raises(Exception):  # a float NCHW batch is not what the graph takes
        sess.run(["logits"], {"pixels": np.zeros((1, 3, 32, 32), np.float32)})
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["cvpipe"])
    assert meta["arch"] == "test_resnet" and meta["classes"] == ["a", "b", "c"] and meta["epoch"] == 1
    assert meta["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6, abs=1e-4)


def test_exports_return_calibrated_probabilities(tmp_path):
    """With a temperature T != 1 in the bundle, softmax of the ONNX and TorchScript outputs equals the calibrated
    eager probabilities softmax(logits / T), model.pt and preprocess.json carry T, and parity compares tempered logits."""
    import onnxruntime as ort

    from cvpipe.evaluate.calibration import softmax_probs
    from cvpipe.torchkit.loaders import BatchNormalizer
    from cvpipe.torchkit.models import load_checkpoint
    from cvpipe.torchkit.runtime import resolve_runtime

    torch.manual_seed(0)
    model = create("test_resnet", num_classes=3).eval()
    cfg = data_config(model)
    temperature = 2.5
    ckpt = {"arch": "test_resnet", "classes": ["a", "b", "c"], "normalize": cfg, "image_size": 32, "resize_mode": "stretch",
            "epoch": 1, "params": {}, "dataset_hash": "x", "model": model.state_dict()}
    pixels = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    x = BatchNormalizer(cfg["mean"], cfg["std"], resolve_runtime("cpu", "off", False, key="train"))(torch.from_numpy(pixels))
    export.write_bundle(tmp_path, ckpt, model, "model", x[:1], temperature=temperature)
    with torch.inference_mode():
        raw = model(x).numpy()
        ts = torch.jit.load(str(tmp_path / "model.ts"))(x).numpy()
    calibrated = softmax_probs([raw], temperature)
    assert np.abs(calibrated - softmax_probs([raw])).max() > 1e-3  # T != 1 changes the probabilities: the check means something
    onnx_out = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], {"pixels": pixels})[0]
    assert softmax_probs([onnx_out]) == pytest.approx(calibrated, abs=1e-5)
    assert softmax_probs([ts]) == pytest.approx(calibrated, abs=1e-5)
    assert load_checkpoint(tmp_path / "model.pt")["temperature"] == temperature
    assert json.loads((tmp_path / "preprocess.json").read_text())["temperature"] == temperature
    rep = export.parity(model, tmp_path, x, pixels, temperature=temperature)
    assert rep["temperature"] == temperature and max(rep["onnx_max_abs_diff"], rep["torchscript_max_abs_diff"]) <= 1e-4
