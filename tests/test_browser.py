"""End to end in a real browser: Debian's headless Chromium (Selenium + chromedriver) drives the served page.

A resnet18 is trained for 2 epochs at 64 px on a slice of hymenoptera_data by the real
pipeline; the page gets a real ant/bee photo through its file picker and the test reads
the predicted label off the page. Set CVPIPE_SCREENSHOT=docs/app-screenshot.png to keep
the screenshot (the README shows that file).

Skipped only when Chromium is absent *and* CI is unset; in CI a missing browser fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
from conftest import cvpipe, write_params
from PIL import Image

from cvpipe.core.config import ServeParams
from cvpipe.serve.app import BackgroundServer, create_app
from cvpipe.serve.model import load_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PER_CLASS = 30

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.realdata]


def _need_browser() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    msg = f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def hymenoptera_model(real_data, tmp_path_factory) -> Path:
    _need_browser()
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


@pytest.fixture
def browser(tmp_path):
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_predicts_a_real_photo_and_shows_the_model_card(hymenoptera_model, real_data, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    proj = hymenoptera_model
    model = load_model(str(proj / "models/resnet18/best.pt"), metrics_dir=str(proj / "metrics"), plots_dir=str(proj / "plots"))
    assert model.classes == ["ants", "bees"]
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
