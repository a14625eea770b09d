"""Shared fixtures.

* ``real_data``: the folder named by ``CVPIPE_REAL_DATA`` (CI: ../shared/data).
  Unset -> tests that need it are skipped; set but missing -> they fail.
* ``project``: a temporary project folder (cwd) with its own params.yaml, so a
  test's outputs never touch the repository.
* W&B always runs offline inside the test's folder.
* Disk: a passed test's ``tmp_path`` is deleted at its teardown (pyproject's retention policy) and
  every folder ``tmp_path_factory`` made while a module ran is deleted when the module ends, unless
  one of its tests failed (kept to debug). So fixtures that make folders with ``tmp_path_factory``
  are module- or function-scoped; a session-scoped one would lose its folder after its first module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _sweep_module_scratch(request, tmp_path_factory):
    """Delete the folders tmp_path_factory made during this module once it ends (see the docstring)."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:
        return
    for path in set(base.iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    # the digits sample is materialized once per session, shared by all tests
    monkeypatch.setenv("CVPIPE_CACHE", str(_session_cache()))
    monkeypatch.setenv("MPLCONFIGDIR", str(home / "mpl"))
    yield


_CACHE: Path | None = None


def _session_cache() -> Path:
    global _CACHE
    if _CACHE is None:
        import tempfile

        _CACHE = Path(tempfile.mkdtemp(prefix="cvpipe-test-cache-"))
    return _CACHE


def pytest_sessionfinish(session, exitstatus):
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def real_data() -> Path:
    value = os.environ.get("CVPIPE_REAL_DATA")
    if not value:
        pytest.skip("CVPIPE_REAL_DATA is not set")
    path = Path(value).resolve()
    if not (path / "hymenoptera_data").is_dir() or not (path / "bad_inputs").is_dir():
        pytest.fail(f"CVPIPE_REAL_DATA={value} does not hold hymenoptera_data/ and bad_inputs/")
    return path


def absolute_pythonpath() -> dict[str, str]:
    """``PYTHONPATH`` with every entry made absolute (a relative ``PYTHONPATH=src`` breaks in a subprocess
    run in another folder); empty when it is not set."""
    pp = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": os.pathsep.join(str(Path(p).resolve()) for p in pp.split(os.pathsep) if p)} if pp else {}


def digit_folders(src: Path, classes: int, per_class: int) -> Path:
    """The first *per_class* real digits (scikit-learn's 8x8 scans, dark on light) of classes 0..classes-1
    as PNG class folders ``src/<class>/<index>.png``; returns *src*."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(classes):
        (src / str(c)).mkdir(parents=True)
        for i in np.flatnonzero(digits.target == c)[:per_class]:
            img = (255 - digits.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(img).convert("RGB").save(src / str(c) / f"{i}.png")
    return src


def write_params(folder: Path, overrides: dict | None = None, base: Path = REPO / "params.yaml") -> Path:
    """Copy the repo's params.yaml into *folder*, with dotted *overrides* set as ``-S`` sets them."""
    from cvpipe.core.config import apply_overrides

    data = apply_overrides(yaml.safe_load(base.read_text()), overrides or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    return tmp_path


def make_digits_slice(tmp_path_factory, per_class: int) -> Path:
    """A class-folder copy of the built-in digits sample with *per_class* images per class."""
    from cvpipe.data import sample

    full = sample.materialize("digits", tmp_path_factory.mktemp("digits-full") / "digits")
    out = tmp_path_factory.mktemp("digits-slice")
    for cls in sorted(p for p in full.iterdir() if p.is_dir()):
        (out / cls.name).mkdir()
        for f in sorted(cls.iterdir())[:per_class]:
            shutil.copy(f, out / cls.name / f.name)
    return out


def cvpipe(*args: str, cwd: Path | None = None, env: dict | None = None, check: bool = True, timeout: float = 900):
    """Run the real ``cvpipe`` CLI in a subprocess; returns CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "cvpipe", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cvpipe {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_together(runs: list[tuple[list[str], dict]], cwd: Path, name: str, timeout: float) -> list[tuple[int, str]]:
    """Start every (command, env) of *runs* at once in *cwd*, each in its own process group, and return each
    one's (exit code, output). The outputs go to files ``<name>-<i>.log``: with pipes, read one after the
    other, the unread one can fill and block its process, and a peer waiting for it in a collective hangs.
    A process still running after *timeout* seconds is killed with its children (exit code -9), so a stuck
    rendezvous fails the test instead of hanging CI."""
    import signal
    import time

    logs = [open(cwd / f"{name}-{i}.log", "w+") for i in range(len(runs))]
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
             for (cmd, env), log in zip(runs, logs)]
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            p.wait()
        outs = []
        for log in logs:
            log.seek(0)
            outs.append(log.read())
            log.close()
    return [(p.returncode, out) for p, out in zip(procs, outs)]


# ---- headless Chromium (tests/test_browser.py, tests/test_review_browser.py) ----------------------
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def need_browser() -> None:
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    msg = f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture
def browser(tmp_path):
    need_browser()
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
