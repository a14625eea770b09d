"""cvpipe serve: the API against a model trained by the real sample pipeline (digits slice, 2 epochs).

The app serves evaluate's export folder (exports/resnet18/seed42: a uint8-pixel model.onnx) on ONNX
Runtime; the bare checkpoint (models/resnet18/seed42/best.pt) on torch, and both give the same answers."""

from __future__ import annotations

import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import cvpipe, make_digits_slice, write_params
from servers import stop_process
from fastapi.testclient import TestClient
from PIL import Image

from cvpipe.core.config import ServeParams
from cvpipe.core.errors import StageError
from cvpipe.serve.app import BackgroundServer, create_app
from cvpipe.serve.model import load_model

PER_CLASS = 20


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A project folder after ingest -> preprocess -> train (2 epochs) -> evaluate on a digits slice."""
    src = make_digits_slice(tmp_path_factory, PER_CLASS)
    proj = tmp_path_factory.mktemp("served-project")
    write_params(proj, {"ingest.source": str(src), "train.epochs": 2, "train.warmup_epochs": 1, "wandb.mode": "disabled"})
    for stage in ("ingest", "preprocess"):
        cvpipe(stage, "--quiet", cwd=proj)
    cvpipe("train", "--quiet", "--epochs", "2", cwd=proj)
    cvpipe("evaluate", "--quiet", cwd=proj)
    return proj


@pytest.fixture(scope="module")
def served(trained):
    """evaluate's export folder on the default backend: onnxruntime."""
    return load_model(str(trained / "exports/resnet18/seed42"), metrics_dir=str(trained / "metrics"),
                      plots_dir=str(trained / "plots"))


@pytest.fixture(scope="module")
def served_pt(trained):
    """The bare train checkpoint: the torch backend."""
    return load_model(str(trained / "models/resnet18/seed42/best.pt"), metrics_dir=str(trained / "metrics"),
                      plots_dir=str(trained / "plots"))


@pytest.fixture(scope="module")
def client(served):
    with TestClient(create_app(served, ServeParams()), raise_server_exceptions=False) as c:
        yield c


def _png(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _test_rows(proj: Path) -> list[dict[str, str]]:
    with open(proj / "data/prepared/test/index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _manifest(proj: Path) -> dict[str, str]:
    with open(proj / "data/raw/manifest.csv", newline="") as fh:
        return {r["id"]: r["path"] for r in csv.DictReader(fh)}


def test_healthz_docs_and_model_card(client, trained):
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["model"] == "resnet18"
    assert h.json()["backend"] == "onnxruntime"

    m = client.get("/model").json()
    ev = json.loads((trained / "metrics/resnet18/seed42/evaluate.json").read_text())
    tr = json.loads((trained / "reports/resnet18/seed42/train.json").read_text())
    assert m["arch"] == "resnet18" and m["classes"] == [str(i) for i in range(10)]
    assert m["test_metrics"]["accuracy"] == ev["accuracy"] and m["test_metrics"]["n_test"] == ev["n_test"]
    assert m["data_version"] == tr["dataset_hash"]
    assert m["params_summary"]["train"]["epochs"] == 2 and m["params_summary"]["train"]["arch"] == "resnet18"
    assert m["preprocess"]["image_size"] == 32 and m["preprocess"]["resize_mode"] == "shorter_side_center_crop"
    assert m["model_cost"]["params_m"] == pytest.approx(tr["params_m"], abs=1e-3)
    assert m["leaderboard"] is None and any("leaderboard" in n for n in m["notes"])
    assert m["layout"] == "folder" and m["backend"]["name"] == "onnxruntime" and m["backend"]["file"] == "model.onnx"
    assert m["backend"]["intra_op_threads"] >= 1 and m["backend"]["graph_optimization"] == "ORT_ENABLE_ALL"
    assert "pixels: uint8 NHWC" in m["backend"]["input"]
    assert not any("model.pt" in n for n in m["notes"])  # the torch backend's file is not missed
    prep = json.loads((trained / "exports/resnet18/seed42/preprocess.json").read_text())
    assert m["calibration"] == {"temperature": prep["temperature"], "source": "from model.onnx metadata",
                                "applied_by": "model.onnx"}  # evaluate's fit, inside the graph
    assert m["abstain"]["abstain_below"] == 0.0 and m["abstain"]["enabled"] is False

    png = client.get(m["confusion_matrix_url"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == (trained / "exports/resnet18/seed42/confusion_matrix.png").read_bytes()

    spec = client.get("/openapi.json").json()
    assert {"/predict", "/model", "/healthz"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_predict_is_the_evaluation_preprocessing_and_model(client, served, trained):
    """A stored test image posted to /predict gives the array preprocess wrote and the probabilities evaluate saw."""
    from cvpipe.data.prepared import PreparedDataset

    test = PreparedDataset(str(trained / "data/prepared")).split("test")
    paths = _manifest(trained)
    rows = _test_rows(trained)[:12]
    for i, row in enumerate(rows):
        data = (trained / "data/raw" / paths[row["id"]]).read_bytes()
        arr = served.to_array(served.decode(data, max_pixels=10**8), data)
        np.testing.assert_array_equal(arr, test.images[i])  # the very pixels evaluate saw

        r = client.post("/predict", files={"file": (f"{row['id']}.png", data, "image/png")}, params={"top_k": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        expected = served.probabilities([np.asarray(test.images[i])])[0]
        got = {t["label"]: t["probability"] for t in body["top_k"]}
        assert len(got) == 10 and sum(got.values()) == pytest.approx(1.0, abs=1e-4)
        for c, p in zip(served.classes, expected):
            assert got[c] == pytest.approx(float(p), abs=1e-5)
        assert body["label"] == served.classes[int(expected.argmax())]
        assert [t["probability"] for t in body["top_k"]] == sorted(got.values(), reverse=True)
        lat = body["latency_ms"]
        assert 0 < lat["inference"] <= lat["total"] and lat["decode"] > 0


def test_top_k_defaults_and_caps(client):
    r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")})
    assert r.status_code == 200 and len(r.json()["top_k"]) == ServeParams().top_k
    r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")}, params={"top_k": 50})
    assert len(r.json()["top_k"]) == 10
    r = client.post("/predict", files={"file": ("x.png", _png(), "image/png")}, params={"top_k": 0})
    assert r.status_code == 422 and r.json()["error"] == "invalid_request"


EXPECTED_REJECTIONS = {
    "zero_bytes.jpg": (400, "empty_file"),
    "not_an_image.jpg": (415, "not_an_image"),
    "html_error_page.jpg": (415, "not_an_image"),
    "git_lfs_pointer.jpg": (415, "git_lfs_pointer"),
    "decompression_bomb_14000x14000.png": (413, "decompression_bomb"),
    "truncated_half.jpg": (422, "truncated"),
    "tiny_1x1.png": (422, "too_small"),
    "extreme_aspect_12x2000.jpg": (422, "extreme_aspect_ratio"),
}
EXPECTED_PREDICTIONS = {"progressive.jpg", "cmyk.jpg", "exif_orientation_6.jpg", "png_content_named.jpg",
                        "jpeg_content_named.png", "rgba_alpha.png", "gray_16bit.png", "ünïcødé_名前.jpg"}


def test_every_bad_input_gets_a_prediction_or_a_4xx_with_a_reason(client, served, real_data):
    files = sorted(p for p in (real_data / "bad_inputs").iterdir() if p.is_file())
    assert len(files) >= 30
    outcomes = {}
    for f in files:
        r = client.post("/predict", files={"file": (f.name, f.read_bytes(), "application/octet-stream")})
        assert r.status_code < 500, f"{f.name}: {r.status_code} {r.text}"
        body = r.json()
        if r.status_code == 200:
            assert body["label"] in served.classes and 0 <= body["probability"] <= 1
        else:
            assert 400 <= r.status_code < 500, f"{f.name}: {r.status_code}"
            assert body["error"] and len(body["detail"]) > 10, f"{f.name}: {body}"
        outcomes[f.name] = (r.status_code, body.get("error"))
    for name, expected in EXPECTED_REJECTIONS.items():
        assert outcomes[name] == expected, name
    for name in EXPECTED_PREDICTIONS:
        assert outcomes[name][0] == 200, (name, outcomes[name])
    assert client.get("/healthz").json()["status"] == "ok"  # still up


def test_request_errors_are_json_4xx(client):
    r = client.post("/predict")
    assert r.status_code == 400 and r.json()["error"] == "missing_file"
    r = client.post("/predict", data={"other": "x"})
    assert r.status_code == 400 and "file" in r.json()["detail"]
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"] == "http_error"
    r = client.get("/predict")
    assert r.status_code == 405 and "error" in r.json()


def test_upload_limit_by_header_and_by_stream(served):
    settings = ServeParams(max_upload_bytes=4000)
    big = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    data = buf.getvalue()
    assert len(data) > 100_000
    with TestClient(create_app(served, settings), raise_server_exceptions=False) as c:
        r = c.post("/predict", files={"file": ("big.png", data, "image/png")})
        assert r.status_code == 413 and r.json()["error"] == "too_large" and "4000" in r.json()["detail"]
        # a file just over the limit but within the multipart slack: caught after parsing
        r = c.post("/predict", files={"file": ("b.bin", b"\x89PNG" + b"0" * 5000, "image/png")})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        # chunked body (no Content-Length): cut off while streaming
        boundary = "xyz"
        payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
                   f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()

        def chunks():
            for i in range(0, len(payload), 8192):
                yield payload[i:i + 8192]

        r = c.post("/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert c.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200


def _read_http_response(sock) -> str:
    """Read one whole HTTP/1.1 response: headers and body may arrive in separate TCP segments."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf.decode("latin-1")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode("latin-1")


def test_slow_upload_times_out_and_server_stays_up(served):
    app = create_app(served, ServeParams(request_timeout_s=1.0))
    with BackgroundServer(app) as url:
        host, port = url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 5000\r\n\r\n--b\r\n")
            t0 = time.monotonic()
            reply = _read_http_response(s)
            waited = time.monotonic() - t0
        assert reply.startswith("HTTP/1.1 408"), reply
        assert '"error":"request_timeout"' in reply and 0.8 < waited < 5
        r = httpx.post(f"{url}/predict", files={"file": ("x.png", _png(), "image/png")}, timeout=30)
        assert r.status_code == 200 and r.json()["label"] in served.classes
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_promoted_folder_layout_and_missing_optional_files(trained, tmp_path):
    best = tmp_path / "best"
    best.mkdir()
    shutil.copy(trained / "models/resnet18/seed42/best.pt", best / "model.pt")
    classes = [str(i) for i in range(10)]
    (best / "classes.json").write_text(json.dumps(classes))
    (best / "preprocess.json").write_text(json.dumps(
        {"image_size": 32, "resize_mode": "shorter_side_center_crop", "mean": [0.5] * 3, "std": [0.25] * 3}))
    (best / "card.json").write_text(json.dumps({
        "arch": "resnet18", "test_metrics": {"accuracy": 0.75, "macro_f1": 0.7, "n_test": 30},
        "data_version": "abc123", "model_cost": {"params_m": 11.2, "latency_ms": 3.0},
        "params_summary": {"train": {"epochs": 2}}}))
    (best / "leaderboard.csv").write_text("rank,arch,accuracy\n1,resnet18,0.75\n2,mobilenetv3_small_050,0.6\n")
    m = load_model(str(best), metrics_dir=str(tmp_path / "no-metrics"))
    assert m.layout == "folder" and m.mean == [0.5] * 3 and m.std == [0.25] * 3  # the saved config wins
    with TestClient(create_app(m, ServeParams())) as c:
        info = c.get("/model").json()
        assert info["test_metrics"]["accuracy"] == 0.75 and info["data_version"] == "abc123"
        assert info["leaderboard"][1]["arch"] == "mobilenetv3_small_050"
        assert info["files"]["confusion_matrix.png"] is False and info["confusion_matrix_url"] is None
        assert any(n.startswith("confusion_matrix.png missing") for n in info["notes"])
        assert any(n.startswith("model.onnx missing") for n in info["notes"])
        r = c.get("/model/confusion_matrix.png")
        assert r.status_code == 404 and "confusion matrix" in r.json()["detail"]
        assert c.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200

    (best / "classes.json").write_text(json.dumps(list(reversed(classes))))
    with pytest.raises(StageError, match="disagrees"):
        load_model(str(best))
    (best / "model.pt").unlink()
    with pytest.raises(StageError, match="without model.pt"):
        load_model(str(best))
    with pytest.raises(StageError, match="no model at"):
        load_model(str(tmp_path / "nothing"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_end_to_end(trained):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvpipe", "serve", "--quiet", "--model", "models/resnet18/seed42/best.pt", "--port", str(port),
         "--top-k", "3", "--abstain-below", "0.5"],
        cwd=trained, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "cvpipe serve did not come up"
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", files={"file": ("x.png", _png(), "image/png")}, timeout=30)
        assert r.status_code == 200 and len(r.json()["top_k"]) == 3
        body = r.json()
        assert body["abstain_below"] == 0.5 and body["unsure"] == (body["probability"] < 0.5)
        assert body["label"] == (None if body["unsure"] else body["top_k"][0]["label"])
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["backend"] == "torch"  # a bare .pt: torch
        m = httpx.get(f"http://127.0.0.1:{port}/model").json()  # card found via paths.metrics of the project
        assert m["test_metrics"]["accuracy"] == json.loads((trained / "metrics/resnet18/seed42/evaluate.json").read_text())["accuracy"]
        assert m["abstain"]["abstain_below"] == 0.5 and m["abstain"]["enabled"] is True
    finally:
        stop_process(proc, timeout=20)

    bad = cvpipe("serve", "--model", "models/nothing.pt", cwd=trained, check=False)
    assert bad.returncode == 1 and "no model at models/nothing.pt" in bad.stdout + bad.stderr
    bad = cvpipe("serve", "--model", "models/resnet18/seed42/best.pt", "--backend", "onnx", cwd=trained, check=False)
    assert bad.returncode == 1 and "serve.backend is onnx, but models/resnet18/seed42/best.pt" in bad.stdout + bad.stderr
    bad = cvpipe("serve", "--backend", "tensorrt", cwd=trained, check=False)
    assert bad.returncode == 2 and "serve.backend" in bad.stdout + bad.stderr
    bad = cvpipe("serve", "-S", "serve.port=0", cwd=trained, check=False)
    assert bad.returncode == 2 and "serve.port" in bad.stdout + bad.stderr
    bad = cvpipe("serve", "--abstain-below", "1", cwd=trained, check=False)
    assert bad.returncode == 2 and "serve.abstain_below" in bad.stdout + bad.stderr


@pytest.mark.slow
def test_load_from_gs_through_the_emulator(trained, tmp_path, monkeypatch):
    """serve.model may be gs://: a checkpoint and a promoted folder, fetched through gcsfs from the GCS emulator."""
    from servers import gcs_emulator, upload_tree

    folder = tmp_path / "best"
    folder.mkdir()
    shutil.copy(trained / "models/resnet18/seed42/best.pt", folder / "model.pt")
    (folder / "card.json").write_text(json.dumps({"test_metrics": {"accuracy": 0.5}, "data_version": "gs-v1"}))
    shutil.copy(trained / "plots/resnet18/seed42/confusion_matrix.png", folder / "confusion_matrix.png")
    monkeypatch.setenv("CVPIPE_CACHE", str(tmp_path / "cache"))
    with gcs_emulator(tmp_path / "gcs") as endpoint:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
        upload_tree(endpoint, folder, "cvpipe-models", "models/best")
        m = load_model("gs://cvpipe-models/models/best")
        assert m.layout == "folder" and m.card["data_version"] == "gs-v1" and m.files["confusion_matrix.png"] is not None
        c = load_model("gs://cvpipe-models/models/best/model.pt")
        assert c.layout == "checkpoint" and c.classes == m.classes
    with TestClient(create_app(m, ServeParams())) as client:
        assert client.get("/model/confusion_matrix.png").status_code == 200
        assert client.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200


# ---------------------------------------------------------------------- backends


def test_torch_backend_serves_the_bare_checkpoint_with_the_same_answers(served, served_pt, trained):
    from cvpipe.data.prepared import PreparedDataset

    assert served.backend.name == "onnxruntime" and served_pt.backend.name == "torch" and served_pt.layout == "checkpoint"
    with TestClient(create_app(served_pt, ServeParams())) as c:
        assert c.get("/healthz").json()["backend"] == "torch"
        assert c.get("/model").json()["backend"]["name"] == "torch"
        assert c.post("/predict", files={"file": ("x.png", _png(), "image/png")}).status_code == 200

    # the same folder (the evaluated weights: model.pt and model.onnx) on torch answers like onnxruntime
    images = list(np.asarray(PreparedDataset(str(trained / "data/prepared")).split("test").images))
    forced = load_model(str(trained / "exports/resnet18/seed42"), backend="torch", metrics_dir=str(trained / "metrics"))
    ort_p, pt_p = served.probabilities(images), forced.probabilities(images)
    assert forced.backend.name == "torch" and len(images) >= 20
    assert np.abs(ort_p - pt_p).max() <= 1e-5 and (ort_p.argmax(1) == pt_p.argmax(1)).all()
    # both calibrated with evaluate's temperature: in the graph for onnxruntime, divided by the torch backend
    assert forced.temperature.value == served.temperature.value != 1.0 and forced.backend.temperature != 1.0
    with pytest.raises(StageError, match="serve.backend is onnx, but .*bare checkpoint has no model.onnx"):
        load_model(str(trained / "models/resnet18/seed42/best.pt"), backend="onnx")
    with pytest.raises(StageError, match="serve.backend must be one of auto, onnx, torch"):
        load_model(str(trained / "exports/resnet18/seed42"), backend="tensorrt")


def test_onnx_folder_needs_no_checkpoint_and_an_old_float_onnx_goes_to_torch(trained, tmp_path):
    """A folder with only the uint8 model.onnx (+ preprocess/classes) serves on onnxruntime; one whose
    model.onnx takes float NCHW (exported before #20) is served through torch under auto, refused under onnx."""
    import torch

    from cvpipe.torchkit.models import load_checkpoint, model_from_checkpoint

    only_onnx = tmp_path / "only-onnx"
    only_onnx.mkdir()
    for name in ("model.onnx", "preprocess.json", "classes.json"):
        shutil.copy(trained / "exports/resnet18/seed42" / name, only_onnx / name)
    m = load_model(str(only_onnx), metrics_dir=str(trained / "metrics"))
    assert m.backend.name == "onnxruntime" and m.arch == "resnet18" and m.card["model_cost"]["onnx_mb"] > 0
    assert m.card["trained_epochs"] == 2 and m.card["params_summary"]["train"]["arch"] == "resnet18"

    old = tmp_path / "old"
    shutil.copytree(trained / "exports/resnet18/seed42", old)
    ckpt = load_checkpoint(str(old / "model.pt"))
    torch.onnx.export(model_from_checkpoint(ckpt).eval(), (torch.zeros(1, 3, 32, 32),), str(old / "model.onnx"),
                      input_names=["input"], output_names=["logits"], dynamo=False)
    m = load_model(str(old), metrics_dir=str(trained / "metrics"))
    assert m.backend.name == "torch" and any("served through torch: model.onnx takes tensor(float)" in n for n in m.notes)
    with pytest.raises(StageError, match="serve.backend is onnx, but .*re-run cvpipe evaluate"):
        load_model(str(old), backend="onnx")
    (old / "model.pt").unlink()
    with pytest.raises(StageError, match="has no model.pt for the torch backend"):
        load_model(str(old))


# ---------------------------------------------------------------------- micro-batching


def test_batcher_routes_each_result_to_its_request_and_batches_arrivals_together():
    import threading

    from cvpipe.serve.batching import MicroBatcher

    calls = []

    def run(batch):  # row i -> the first pixel of item i, so every answer says whose it is
        calls.append(len(batch))
        return batch[:, 0, 0, :].astype(np.float32)

    b = MicroBatcher(run, window_ms=200, max_batch=8)
    out = {}

    def ask(i):
        out[i] = b.submit(np.full((4, 4, 3), i, np.uint8), timeout=10)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    b.close()
    assert {i: v.tolist() for i, v in out.items()} == {i: [i, i, i] for i in range(8)}
    assert sum(calls) == 8 and len(calls) < 8 and max(calls) <= 8  # arrivals within the window shared a batch


def test_batcher_isolates_a_failing_item_and_bounds_the_wait():
    import threading
    import time as _time

    from cvpipe.serve.batching import MicroBatcher

    def run(batch):
        if (batch[:, 0, 0, 0] == 13).any():
            raise ValueError("bad item")
        return batch[:, 0, 0, :].astype(np.float32)

    b = MicroBatcher(run, window_ms=100, max_batch=4)
    results = {}

    def ask(i):
        try:
            results[i] = b.submit(np.full((2, 2, 3), i, np.uint8), timeout=10)[0]
        except ValueError as exc:
            results[i] = str(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in (11, 12, 13, 14)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {11: 11.0, 12: 12.0, 13: "bad item", 14: 14.0}
    b.close()

    gate = threading.Event()
    slow = MicroBatcher(lambda batch: (gate.wait(5), batch[:, 0, 0, :].astype(np.float32))[1], window_ms=1, max_batch=2)
    t0 = _time.monotonic()
    with pytest.raises(TimeoutError):
        slow.submit(np.zeros((2, 2, 3), np.uint8), timeout=0.3)
    assert _time.monotonic() - t0 < 2  # bounded: the caller is back well before the model
    gate.set()
    assert slow.submit(np.ones((2, 2, 3), np.uint8), timeout=10).tolist() == [1.0, 1.0, 1.0]  # still serving
    slow.close()


def test_micro_batched_app_gives_the_unbatched_answers(served, trained):
    import concurrent.futures

    paths = _manifest(trained)
    datas = [(trained / "data/raw" / paths[r["id"]]).read_bytes() for r in _test_rows(trained)[:8]]
    expected = [served.predict_bytes(d, k=3, max_pixels=10**8).top_k for d in datas]
    threshold = _between(sorted(e[0]["probability"] for e in expected))  # some answers unsure, some not
    app = create_app(served, ServeParams(batch_window_ms=50, max_batch_size=8, inference_threads=4,
                                         abstain_below=threshold))
    with BackgroundServer(app) as url:
        def post(d):
            return httpx.post(f"{url}/predict", files={"file": ("x.png", d, "image/png")}, params={"top_k": 3}, timeout=30)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, datas))
    for r, exp in zip(answers, expected):
        assert r.status_code == 200, r.text
        got = r.json()["top_k"]
        assert [t["label"] for t in got] == [t["label"] for t in exp]
        assert [t["probability"] for t in got] == pytest.approx([t["probability"] for t in exp], abs=1e-5)
        unsure = exp[0]["probability"] < threshold
        assert r.json()["unsure"] is unsure and r.json()["label"] == (None if unsure else exp[0]["label"])
    assert app.state.batcher.items >= 8 and app.state.batcher.batches < app.state.batcher.items
    assert not app.state.batcher.running  # the server's shutdown stopped the batcher's thread


# ---------------------------------------------------------------------- thread settings


def test_onnx_sessions_with_a_thread_pool_do_not_spin(trained):
    """More than one intra-op thread: the session is built with allow_spinning 0 (ORT's workers would
    busy-wait between runs, doubling the CPU per request on a shared box); one thread has no pool to spin."""
    from cvpipe.serve.onnx_backend import OnnxBackend, session_options

    key = "session.intra_op.allow_spinning"
    assert session_options(2).get_session_config_entry(key) == "0"
    assert session_options(2).intra_op_num_threads == 2 and session_options(2).inter_op_num_threads == 1
    with pytest.raises(RuntimeError, match="does not have configuration"):  # ORT's default (spinning) left alone
        session_options(1).get_session_config_entry(key)
    backend = OnnxBackend(trained / "exports/resnet18/seed42/model.onnx", 2)
    built = backend.session.get_session_options()  # what the live session was given
    assert built.get_session_config_entry(key) == "0" and built.intra_op_num_threads == 2
    assert backend.describe()["intra_op_allow_spinning"] == "0"


def test_unset_thread_counts_share_the_cores_between_concurrent_runs(trained, monkeypatch):
    """serve.onnx_threads / serve.torch_threads 0: cores // concurrent runs for both backends (torch's own
    default, one thread per core for each run, oversubscribes the CPU when requests run at once)."""
    import torch

    from cvpipe.serve import model as model_mod

    monkeypatch.setattr(model_mod.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    assert [model_mod.auto_threads(n) for n in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # neither 2 nor 1: the load below must set it
        pt = load_model(str(trained / "models/resnet18/seed42/best.pt"), concurrent_runs=2, metrics_dir=str(trained / "metrics"))
        assert pt.backend.name == "torch" and torch.get_num_threads() == 2 and pt.info()["backend"]["torch_threads"] == 2
        load_model(str(trained / "models/resnet18/seed42/best.pt"), torch_threads=1, concurrent_runs=2,
                   metrics_dir=str(trained / "metrics"))
        assert torch.get_num_threads() == 1  # an explicit serve.torch_threads wins
        onnx = load_model(str(trained / "exports/resnet18/seed42"), concurrent_runs=4, metrics_dir=str(trained / "metrics"))
        assert onnx.backend.threads == 1 and onnx.info()["backend"]["intra_op_threads"] == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- abstaining (issue #18)


def _between(probs: list[float]) -> float:
    """A threshold with some of the sorted *probs* below it and the rest above: the middle of the widest gap
    between neighbours, so answers a few 1e-6 apart (batched vs alone) fall on the same side."""
    gaps = [(b - a, (a + b) / 2) for a, b in zip(probs, probs[1:]) if b > a]
    assert gaps, f"every top-1 probability is {probs[0]}: no threshold splits them"
    return max(gaps)[1]


def _test_images(trained: Path, n: int) -> list[bytes]:
    paths = _manifest(trained)
    return [(trained / "data/raw" / paths[r["id"]]).read_bytes() for r in _test_rows(trained)[:n]]


def test_abstain_below_answers_unsure_with_the_top_k(served, trained):
    """serve.abstain_below: 0 never abstains; above every confidence every answer is unsure (label null, the
    top-k kept); in between, exactly the answers whose top-1 probability is below it."""
    datas = _test_images(trained, 10)
    top1 = [served.predict_bytes(d, k=1, max_pixels=10**8).top_k[0]["probability"] for d in datas]
    high = 0.999999
    assert max(top1) < high, top1  # a 2-epoch model is never that sure of a digit
    mid = _between(sorted(top1))
    for threshold in (0.0, mid, high):
        with TestClient(create_app(served, ServeParams(abstain_below=threshold))) as c:
            card = c.get("/model").json()["abstain"]
            assert card["abstain_below"] == threshold and card["enabled"] is (threshold > 0)
            for d, p in zip(datas, top1):
                body = c.post("/predict", files={"file": ("d.png", d, "image/png")}, params={"top_k": 3}).json()
                unsure = p < threshold
                assert body["unsure"] is unsure and body["abstain_below"] == threshold
                assert body["probability"] == pytest.approx(p, abs=1e-6) == body["top_k"][0]["probability"]
                assert len(body["top_k"]) == 3  # the candidates, also when unsure
                assert body["label"] == (None if unsure else body["top_k"][0]["label"])
    assert 0 < sum(p < mid for p in top1) < len(top1)  # the middle threshold tried both answers

    schema = TestClient(create_app(served, ServeParams())).get("/openapi.json").json()["components"]["schemas"]
    props = schema["PredictResponse"]["properties"]
    assert props["unsure"]["type"] == "boolean" and "null" in json.dumps(props["label"])
    with pytest.raises(ValueError, match="abstain_below"):
        ServeParams(abstain_below=1.0)
    with pytest.raises(ValueError, match="abstain_below"):
        ServeParams(abstain_below=-0.1)


def _with_temperature(trained: Path, folder: Path, temperature) -> Path:
    """The trained checkpoint saved to *folder*/t.pt with ``temperature`` set (or removed when None)."""
    import torch

    from cvpipe.torchkit.models import load_checkpoint

    ckpt = load_checkpoint(str(trained / "models/resnet18/seed42/best.pt"))
    ckpt.pop("temperature", None)
    if temperature is not None:
        ckpt["temperature"] = temperature
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, folder / "t.pt")
    return folder / "t.pt"


def test_torch_backend_divides_logits_by_the_checkpoint_temperature(trained, tmp_path):
    """A checkpoint with temperature 2.0 gives softmax(logits / 2): softer than the same weights at 1.0; a bare
    checkpoint without one is served at 1.0 and says it is uncalibrated."""
    from cvpipe.data.prepared import PreparedDataset

    images = list(np.asarray(PreparedDataset(str(trained / "data/prepared")).split("test").images))[:16]
    kw = {"metrics_dir": str(trained / "metrics")}
    one = load_model(str(_with_temperature(trained, tmp_path / "one", 1.0)), **kw)
    two = load_model(str(_with_temperature(trained, tmp_path / "two", 2.0)), **kw)
    bare = load_model(str(_with_temperature(trained, tmp_path / "bare", None)), **kw)
    p1, p2, p_bare = one.probabilities(images), two.probabilities(images), bare.probabilities(images)
    np.testing.assert_allclose(p_bare, p1, atol=1e-6)
    soft = np.exp(np.log(p1) / 2.0)  # softmax(z / 2) from softmax(z): exp(log p / 2), renormalized
    np.testing.assert_allclose(p2, soft / soft.sum(1, keepdims=True), atol=1e-5)
    assert (p2.max(1) < p1.max(1)).all() and (p2.argmax(1) == p1.argmax(1)).all()  # softer, same ranking
    assert two.info()["calibration"] == {"temperature": 2.0, "source": "from model.pt", "applied_by": "torch backend"}
    assert two.info()["backend"]["temperature"] == 2.0
    assert bare.temperature.value == 1.0 and "no fitted temperature" in bare.temperature.source
    with TestClient(create_app(two, ServeParams(abstain_below=0.5))) as c:
        ab = c.get("/model").json()["abstain"]
        assert ab["temperature"] == 2.0 and ab["abstain_below"] == 0.5

    with pytest.raises(StageError, match="model.pt has temperature -1.0; it must be a positive number"):
        load_model(str(_with_temperature(trained, tmp_path / "neg", -1.0)), **kw)
    folder = tmp_path / "mixed"  # a bundle whose files disagree: refused, not served with either value
    shutil.copytree(trained / "exports/resnet18/seed42", folder)
    shutil.copy(_with_temperature(trained, tmp_path / "t3", 3.0), folder / "model.pt")
    prep = json.loads((folder / "preprocess.json").read_text())
    (folder / "preprocess.json").write_text(json.dumps({**prep, "temperature": 1.5}))
    with pytest.raises(StageError, match="model.pt says temperature 3 and preprocess.json says 1.5"):
        load_model(str(folder), backend="torch", **kw)


def test_onnx_temperature_is_reported_not_applied_again_and_the_card_gives_coverage(served, trained, tmp_path):
    """model.onnx's logits are already divided by the temperature: the server reports the value (from the
    graph's metadata, preprocess.json or card.json) and leaves the probabilities alone; card.json's
    risk-coverage at the configured threshold is the expected coverage and error on /model."""
    folder = tmp_path / "bundle"
    shutil.copytree(trained / "exports/resnet18/seed42", folder)
    stated = served.temperature.value or 1.5  # the export's own value once evaluate calibrates, else any value
    rc = {"threshold": 0.6, "coverage": 0.8, "error": 0.05, "aurc": 0.03}
    (folder / "card.json").write_text(json.dumps({"temperature": stated, "risk_coverage": rc}))
    m = load_model(str(folder), metrics_dir=str(trained / "metrics"))
    assert m.backend.name == "onnxruntime" and m.temperature.value == stated
    assert m.temperature.describe()["applied_by"] == "model.onnx"
    images = [np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 200, np.uint8)]
    np.testing.assert_array_equal(m.probabilities(images), served.probabilities(images))  # not divided twice
    with TestClient(create_app(m, ServeParams(abstain_below=0.6))) as c:
        ab = c.get("/model").json()["abstain"]
        assert ab["temperature"] == stated and ab["expected"] == {"coverage": 0.8, "error": 0.05, "aurc": 0.03}
    with TestClient(create_app(m, ServeParams(abstain_below=0.7))) as c:
        ab = c.get("/model").json()["abstain"]
        assert ab["expected"] is None and "threshold 0.6, not 0.7" in ab["expected_note"]

    prep = json.loads((folder / "preprocess.json").read_text())
    (folder / "preprocess.json").write_text(json.dumps({**prep, "temperature": stated}))
    (folder / "card.json").write_text(json.dumps({"calibration": {"temperature": stated * 2}}))
    with pytest.raises(StageError, match=f"says temperature {stated:g} and card.json says {stated * 2:g}"):
        load_model(str(folder), metrics_dir=str(trained / "metrics"))


def test_temperature_sources_agree_within_report_rounding_and_the_rule_is_strictly_below():
    """Unit: a card's calibration report rounds T to 6 decimals (still the same T); a real difference is refused;
    an answer exactly at the threshold is answered."""
    from cvpipe.serve.abstain import is_unsure, resolve_temperature

    t = resolve_temperature("m", "onnxruntime", model_file={"temperature": 0.3123456789},
                            preprocess={"temperature": 0.3123456789}, card={"calibration": {"temperature": 0.312346}})
    assert t.value == 0.3123456789 and t.source == "from model.onnx metadata" and t.applied_by == "model.onnx"
    with pytest.raises(StageError, match="model.onnx metadata says temperature 0.312346 and card.json says 0.3124"):
        resolve_temperature("m", "onnxruntime", model_file={"temperature": 0.312346}, preprocess={},
                            card={"temperature": 0.3124})
    with pytest.raises(StageError, match="preprocess.json has temperature 'hot'"):
        resolve_temperature("m", "torch", model_file={}, preprocess={"temperature": "hot"}, card={})
    unknown = resolve_temperature("m", "onnxruntime", model_file={}, preprocess={}, card={})
    assert unknown.value is None and unknown.source.startswith("unknown")
    assert resolve_temperature("m", "torch", model_file={}, preprocess={"temperature": 1.7}, card={}).value == 1.7
    assert [is_unsure(p, 0.5) for p in (0.49, 0.5, 0.51)] == [True, False, False]
    assert not is_unsure(0.01, 0.0)
