"""End to end in a real browser: Debian's headless Chromium (Selenium + chromedriver) drives the served page.

A resnet18 is trained for 2 epochs at 64 px on a slice of hymenoptera_data by the real
pipeline and served from evaluate's export folder on onnxruntime; the page gets a real ant/bee photo through its file picker and the test reads
the predicted label off the page, then, served with ``serve.abstain_below`` above the photo's confidence,
reads "not sure" with the top-k. Set CVPIPE_SCREENSHOT=docs/app-screenshot.png to keep
the screenshot (the README shows that file).

Skipped only when Chromium is absent *and* CI is unset; in CI a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from conftest import cvpipe, need_browser, write_params
from PIL import Image

from cvpipe.core.config import ServeParams
from cvpipe.serve.app import BackgroundServer, create_app
from cvpipe.serve.model import load_model

PER_CLASS = 30

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.realdata]


@pytest.fixture(scope="module")
def hymenoptera_model(real_data, tmp_path_factory) -> Path:
    need_browser()
    src = tmp_path_factory.mktemp("hym-slice")
    for cls in ("ants", "bees"):
        (src / cls).mkdir()
        for f in sorted((real_data / "hymenoptera_data/train" / cls).iterdir())[:PER_CLASS]:
            shutil.copy(f, src / cls / f.name)
    proj = tmp_path_factory.mktemp("hym-project")
    write_params(proj, {
        "ingest.source": str(src), "preprocess.image_size": 64, "train.epochs": 2, "train.warmup_epochs": 1,
        "train.batch_size": 16, "wandb.mode": "disabled",
        "augment.train": [{"HorizontalFlip": {"p": 0.5}}],
    })
    for stage in ("ingest", "preprocess", "train", "evaluate"):
        cvpipe(stage, "--quiet", cwd=proj)
    return proj


def test_page_predicts_a_real_photo_and_shows_the_model_card(hymenoptera_model, real_data, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    proj = hymenoptera_model
    # evaluate's export folder: served on onnxruntime, as the app image serves it
    model = load_model(str(proj / "exports/resnet18/seed42"), metrics_dir=str(proj / "metrics"), plots_dir=str(proj / "plots"))
    assert model.classes == ["ants", "bees"] and model.backend.name == "onnxruntime"
    photo = sorted((real_data / "hymenoptera_data/val/bees").glob("*.jpg"))[0]

    with BackgroundServer(create_app(model, ServeParams())) as url:
        expected = httpx.post(f"{url}/predict", files={"file": (photo.name, photo.read_bytes())}, timeout=60).json()

        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        # the model card loads from /model
        wait.until(EC.text_to_be_present_in_element((By.ID, "model-summary"), "resnet18"))
        wait.until(lambda d: d.execute_script("return document.getElementById('confusion').complete "
                                              "&& document.getElementById('confusion').naturalWidth > 0"))
        assert "test accuracy" in browser.find_element(By.ID, "metrics").text
        assert "onnxruntime (model.onnx)" in browser.find_element(By.ID, "metrics").text

        browser.find_element(By.ID, "file-input").send_keys(str(photo))
        label_el = wait.until(EC.visibility_of_element_located((By.ID, "predicted-label")))
        wait.until(lambda d: label_el.text.strip() != "")
        label = label_el.text.strip()
        assert label in ("ants", "bees")
        assert label == expected["label"]  # what the page shows is what the API answers
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars li.topk")
        assert [b.find_element(By.CLASS_NAME, "label").text for b in bars] == [t["label"] for t in expected["top_k"]]
        assert browser.execute_script("return document.getElementById('preview').naturalWidth") > 100

        shot = tmp_path / "app-screenshot.png"
        assert browser.save_screenshot(str(shot))
        img = Image.open(shot)
        assert img.format == "PNG" and img.size[0] >= 1000
        keep = os.environ.get("CVPIPE_SCREENSHOT")
        if keep:
            Path(keep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, keep)

        # a rejected file: the page says why, and the next good file works again
        bad = tmp_path / "notes.jpg"
        bad.write_text("<html><body>404 not found</body></html>")
        browser.find_element(By.ID, "file-input").send_keys(str(bad))
        wait.until(EC.text_to_be_present_in_element((By.ID, "message"), "not an image"))
        msg = browser.find_element(By.ID, "message").text
        assert "Rejected (415 not_an_image)" in msg
        assert not browser.find_element(By.ID, "result").is_displayed()

    # serve.abstain_below above the photo's confidence: the page says "not sure" and still shows the top-k
    threshold = 0.999999
    assert expected["probability"] < threshold, expected
    with BackgroundServer(create_app(model, ServeParams(abstain_below=threshold))) as url:
        browser.get(url + "/")
        wait.until(EC.text_to_be_present_in_element((By.ID, "metrics"), "not sure below"))
        browser.find_element(By.ID, "file-input").send_keys(str(photo))
        wait.until(EC.text_to_be_present_in_element((By.ID, "predicted-label"), "not sure"))
        best = expected["top_k"][0]["label"]
        assert f"best guess {best}" in browser.find_element(By.ID, "predicted-prob").text
        assert "unsure" in browser.find_element(By.ID, "verdict").get_attribute("class")
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars li.topk")
        assert [b.find_element(By.CLASS_NAME, "label").text for b in bars] == [t["label"] for t in expected["top_k"]]
