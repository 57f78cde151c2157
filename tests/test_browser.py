"""The page in a real browser: Debian's headless Chromium driven by Selenium through the packaged
chromedriver (nothing downloaded: Selenium Manager is made to fail if anything calls it), against
`chexdist app` running in its own process on a free localhost port. A real X-ray is uploaded, the
table must show the 14 findings with the probabilities `chexdist predict` gives, an overlay must
load, a bad file must show its error and the next good upload must work. The screenshot is saved
(to $CHEXDIST_SCREENSHOT too when set: docs/img/app.png is made that way)."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest

from chexdist.bench.app import multipart, running_app
from chexdist.cli import main as cli
from tests.conftest import REAL_IMAGES

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
pytestmark = pytest.mark.slow


@pytest.fixture
def driver(tmp_path, monkeypatch):
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")

    def no_download(*_a, **_k):
        raise AssertionError("Selenium Manager ran (it would download a driver)")

    monkeypatch.setattr(SeleniumManager, "binary_paths", no_download)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield browser
    browser.quit()


def cli_record(run, path, out: Path) -> dict:
    assert cli.main(["predict", "--run", str(run), str(path), "--format", "json", "--quiet", "--out", str(out)]) == 0
    return json.loads(out.read_text())["predictions"][0]


def image_with_overlay(port: int, images: list[Path]) -> Path:
    """The first image whose positive findings have a drawable map (the page must show one)."""
    for path in images:
        body, ctype = multipart(path)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/cam", data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(request, timeout=120) as response:
            if json.loads(response.read())["overlays"]:
                return path
    pytest.fail("no image among the real X-rays gets a Grad-CAM overlay from the trained model")


def upload_and_wait(browser, path: Path, timeout: float = 180.0) -> str:
    """Choose `path` in the file input and wait for the page to finish: "done" or "error"."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.execute_script("document.body.dataset.state = 'idle'")
    browser.find_element("id", "file").send_keys(str(path))
    state = lambda d: d.find_element("tag name", "body").get_attribute("data-state")  # noqa: E731
    WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: state(d) in ("done", "error"))
    return state(browser)


def check_table(browser, expected: dict) -> None:
    rows = browser.find_elements("css selector", "#findings tbody tr")
    assert len(rows) == 14
    shown = {r.get_attribute("data-finding"): float(r.find_element("css selector", ".probability").text) for r in rows}
    assert shown.keys() == expected["probabilities"].keys()
    for name, p in expected["probabilities"].items():
        assert abs(shown[name] - p) <= 5.1e-5, (name, shown[name], p)
    assert list(shown.values()) == sorted(shown.values(), reverse=True), "sorted by probability"
    highlighted = {r.get_attribute("data-finding") for r in rows if "positive" in r.get_attribute("class").split()}
    assert highlighted == set(expected["positive"])


def test_upload_table_overlay_error_and_again(trained_run, driver, tmp_path, real_data):
    images = sorted(REAL_IMAGES.glob("*.png"))[:8]
    bad = tmp_path / f"not-an-xray-{uuid.uuid4().hex[:6]}.png"
    bad.write_text("this is text, not an image\n")
    with running_app(trained_run) as (_proc, port):
        good = image_with_overlay(port, images)
        second = next(p for p in images if p != good)
        driver.get(f"http://127.0.0.1:{port}/")
        assert "not for diagnosis" in driver.find_element("id", "notice").text

        assert upload_and_wait(driver, good) == "done", driver.find_element("id", "error").text
        check_table(driver, cli_record(trained_run, good, tmp_path / "good.json"))
        overlays = driver.find_elements("css selector", "#overlays img.overlay")
        assert overlays and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", o) > 0
                                for o in overlays)
        assert "model card" in driver.find_element("id", "card").text.lower()
        shot = tmp_path / "app.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("CHEXDIST_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["CHEXDIST_SCREENSHOT"])

        assert upload_and_wait(driver, bad) == "error"
        error = driver.find_element("id", "error")
        assert error.is_displayed() and "not a PNG, JPEG or DICOM" in error.text

        assert upload_and_wait(driver, second) == "done", driver.find_element("id", "error").text
        assert not driver.find_element("id", "error").is_displayed()
        check_table(driver, cli_record(trained_run, second, tmp_path / "second.json"))
