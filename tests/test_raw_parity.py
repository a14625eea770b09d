"""Parity from raw bytes (issue #20): the server's pixels are preprocess's, and ONNX Runtime on them is eager torch.

Real photos (hymenoptera) and awkward-but-valid files made here with Pillow (EXIF orientation 6,
CMYK, 16-bit grayscale, palette, grayscale, a 6000x4000 JPEG, a 9x9 PNG) go through the real
``cvpipe ingest`` + ``cvpipe preprocess`` at 48 px (JPEGs decoded at the 64 px DCT scale the
near-duplicate hash asks for). A tiny timm resnet is exported by evaluate's own
:func:`cvpipe.evaluate.export.write_bundle` and loaded by the app's :func:`cvpipe.serve.model.load_model`
(onnxruntime backend). For every file, from its original bytes:

(a) the app's decode + to_array equals, pixel for pixel, the array preprocess wrote for it;
(b) ONNX Runtime's logits on those uint8 pixels match torch eager's on the prepared array normalized
    by BatchNormalizer (what evaluate runs) within 1e-4, with the same top-1.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import cvpipe, write_params
from PIL import Image

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

IMAGE_SIZE = 48
TOLERANCE = 1e-4
REAL_PER_CLASS = 4


def _photo(real_data: Path, i: int) -> Image.Image:
    files = sorted((real_data / "hymenoptera_data" / "val" / "bees").glob("*.jpg"))
    with Image.open(files[i]) as img:
        return img.convert("RGB")


def _made_files(real_data: Path, out: Path) -> dict[str, Path]:
    """The awkward files, each from a different real photo (so none is a near-duplicate of another)."""
    made = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        made[name] = out / name
        img.save(made[name], **kw)

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    save("exif_orientation_6.jpg", _photo(real_data, 0), quality=90, exif=exif)
    save("cmyk.jpg", _photo(real_data, 1).convert("CMYK"), quality=90)
    gray16 = (np.asarray(_photo(real_data, 2).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    img16 = Image.fromarray(gray16, mode="I;16") if Image.fromarray(gray16).mode != "I;16" else Image.fromarray(gray16)
    assert img16.mode == "I;16"
    save("gray_16bit.png", img16)
    save("palette.png", _photo(real_data, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("grayscale.jpg", _photo(real_data, 4).convert("L"), quality=90)
    save("huge_6000x4000.jpg", _photo(real_data, 5).resize((6000, 4000), Image.Resampling.BILINEAR), quality=85)
    save("tiny_9x9.png", _photo(real_data, 6).resize((9, 9), Image.Resampling.BOX))
    return made


@pytest.fixture(scope="module")
def prepared_project(real_data, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A project after the real ingest + preprocess of the files; returns (project, {file name: original file})."""
    src = tmp_path_factory.mktemp("raw-parity-src")
    files: dict[str, Path] = {}
    for cls in ("ants", "bees"):
        (src / cls).mkdir()
        for f in sorted((real_data / "hymenoptera_data" / "train" / cls).glob("*.jpg"))[:REAL_PER_CLASS]:
            files[f.name] = shutil.copy(f, src / cls / f.name)
    files.update(_made_files(real_data, src / "bees"))
    assert Image.open(files["cmyk.jpg"]).mode == "CMYK" and Image.open(files["palette.png"]).mode == "P"
    proj = tmp_path_factory.mktemp("raw-parity-project")
    write_params(proj, {"ingest.source": str(src), "preprocess.image_size": IMAGE_SIZE, "wandb.mode": "disabled",
                        "split.train": 0.5, "split.val": 0.25, "split.test": 0.25})
    cvpipe("ingest", "--quiet", cwd=proj)
    cvpipe("preprocess", "--quiet", cwd=proj)
    return proj, {k: Path(v) for k, v in files.items()}


def _prepared_rows(proj: Path) -> dict[str, np.ndarray]:
    """{source file name: the array preprocess wrote} over every split (augmented copies left out)."""
    from cvpipe.data.prepared import PreparedDataset

    ds = PreparedDataset(str(proj / "data/prepared"))
    rows = {}
    for name in ("train", "val", "test"):
        if not ds.has_split(name):
            continue
        split = ds.split(name)
        for i, row in enumerate(split.index):
            if not row.get("augmented_from"):
                rows[Path(row["source_uri"]).name] = np.array(split.images[i])
    return rows


@pytest.fixture(scope="module")
def bundle(prepared_project, tmp_path_factory):
    """A tiny timm resnet exported by evaluate's export code with this project's preprocessing and params."""
    import torch

    from cvpipe.data.prepared import PreparedDataset
    from cvpipe.evaluate import export
    from cvpipe.torchkit.models import create, data_config

    proj, _ = prepared_project
    ds = PreparedDataset(str(proj / "data/prepared"))
    torch.manual_seed(0)
    model = create("test_resnet", num_classes=len(ds.classes)).eval()
    params = yaml.safe_load((proj / "params.yaml").read_text())
    ckpt = {"arch": "test_resnet", "classes": ds.classes, "normalize": data_config(model), "image_size": ds.image_size,
            "resize_mode": params["preprocess"]["resize_mode"], "epoch": 0, "params": params,
            "dataset_hash": ds.meta.get("fingerprint"), "model": model.state_dict()}
    folder = tmp_path_factory.mktemp("raw-parity-bundle")
    export.write_bundle(folder, ckpt, model, "model", torch.zeros(1, 3, ds.image_size, ds.image_size))
    return folder, model, ckpt


def test_app_pixels_are_preprocess_pixels_and_onnx_logits_are_eager_logits(prepared_project, bundle):
    import torch

    from cvpipe.serve.model import load_model
    from cvpipe.torchkit.loaders import BatchNormalizer
    from cvpipe.torchkit.runtime import resolve_runtime

    proj, files = prepared_project
    folder, model, ckpt = bundle
    prepared = _prepared_rows(proj)
    assert set(files) <= set(prepared), f"not prepared: {sorted(set(files) - set(prepared))}"

    served = load_model(str(folder))
    assert served.backend.name == "onnxruntime" and served.image_size == IMAGE_SIZE and served.decode_side == 64
    assert json.loads((folder / "preprocess.json").read_text())["onnx_input"].startswith("uint8 NHWC")

    names = sorted(files)
    app_pixels = []
    for name in names:  # (a) from the original bytes, exactly what preprocess stored
        data = files[name].read_bytes()
        arr = served.to_array(served.decode(data, max_pixels=10**8), data)
        np.testing.assert_array_equal(arr, prepared[name], err_msg=f"{name}: the app's pixels differ from preprocess's")
        app_pixels.append(arr)

    pixels = np.stack(app_pixels)
    ort_logits = served.backend.session.run(["logits"], {"pixels": pixels})[0]
    norm = BatchNormalizer(ckpt["normalize"]["mean"], ckpt["normalize"]["std"], resolve_runtime("cpu", "off", False, key="train"))
    with torch.inference_mode():  # (b) eager on the prepared arrays, normalized as evaluate does
        eager = model(norm(torch.from_numpy(np.stack([prepared[n] for n in names]))).contiguous()).numpy()
    diff = np.abs(ort_logits - eager)
    report = {n: float(d) for n, d in zip(names, diff.max(axis=1))}
    print(f"\nraw-bytes parity, max |logit diff| per file (|logit| up to {np.abs(eager).max():.3g}): {report}")
    assert diff.max() <= TOLERANCE, report
    assert (ort_logits.argmax(1) == eager.argmax(1)).all()
    assert np.abs(eager).max() > 1e-3 and np.ptp(eager[:, 0]) > 1e-4  # the logits vary: the bound means something

    probs = served.probabilities(app_pixels)  # what /predict ranks: the same model output, softmaxed
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(eager), 1).numpy(), atol=1e-5)
