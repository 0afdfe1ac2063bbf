"""The web page of `fluxmini serve` in a real headless Chromium (Selenium + chromedriver).

Types a prompt, generates, watches the progress bar and the live preview, checks that the image
shown is the one `FluxMini.generate` makes, and saves a screenshot. Needs Debian's `chromium` and
`chromium-driver` (.ci/run installs them and sets FLUXMINI_REQUIRE_BROWSER=1, which turns a
missing browser into a failure instead of a skip).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fluxmini

import make_pipeline_goldens as ref
from serverutil import API_KEY, LiveServer


def _browser_paths():
    chrome = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if chrome and driver:
        return chrome, driver
    msg = "needs chromium and chromedriver (apt-get install chromium chromium-driver)"
    if os.environ.get("FLUXMINI_REQUIRE_BROWSER"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    chrome, driver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def test_page_generates_with_progress_and_preview(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = ref.model_path()
    s = LiveServer(model, "--api-key", API_KEY, "--alias", "flux-tiny", log_dir=tmp_path)
    try:
        browser.get(s.url + "/")
        WebDriverWait(browser, 30).until(lambda d: "flux-tiny" in d.find_element(By.ID, "model").text)
        # record every progress width and preview the page shows: one mutation record per change (the
        # old style text of the bar), so changes made within one task are all seen
        browser.execute_script("""
            window.seen = {bars: [], previews: 0};
            new MutationObserver((records) => records.forEach((r) => window.seen.bars.push(r.oldValue || '')))
              .observe(document.getElementById('bar'), {attributes: true, attributeOldValue: true,
                                                         attributeFilter: ['style']});
            new MutationObserver((records) => { window.seen.previews += records.length; })
              .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});
        """)
        fields = {"prompt": "a lighthouse on a cliff at sunset", "width": "128", "height": "96", "steps": "6",
                  "guidance": "3.5", "seed": "21", "previews": "3", "apikey": API_KEY}
        for name, value in fields.items():
            el = browser.find_element(By.ID, name)
            el.clear()
            el.send_keys(value)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 300).until(
            lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
        status = browser.find_element(By.ID, "status").text
        assert status == "done: 128x96, seed 21", status
        seen = browser.execute_script("return window.seen")
        styles = seen["bars"] + [browser.find_element(By.ID, "bar").get_attribute("style")]
        widths = [float(m.group(1)) for m in map(re.compile(r"width:\s*([0-9.]+)%").search, styles) if m]
        # a step-by-step bar: 1/6 ... 6/6 (then 100% again when the image arrives)
        assert [round(w, 1) for w in widths[:6]] == [round(100 * k / 6, 1) for k in range(1, 7)], styles
        assert all(w == 100 for w in widths[6:]), styles
        assert seen["previews"] == 3
        src = browser.find_element(By.ID, "output").get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
        tiny = fluxmini.FluxMini.load(str(model), threads=1)
        want = tiny.generate(fields["prompt"], width=128, height=96, steps=6, seed=21, guidance=3.5, progress=False)
        np.testing.assert_array_equal(shown, np.asarray(want))
        assert browser.find_element(By.ID, "download").get_attribute("href") == src
        assert len(browser.find_elements(By.CSS_SELECTOR, "#history img")) == 1
        shot = Path(os.environ.get("FLUXMINI_SCREENSHOT", tmp_path / "fluxmini-serve-page.png"))
        assert browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] >= 1000
        print(f"\nSCREENSHOT: {shot}")
    finally:
        s.stop()
    assert "Traceback" not in s.log(), s.log()


def test_page_edit_mode(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    s = LiveServer(ref.model_path(), "--alias", "flux-tiny", log_dir=tmp_path)
    try:
        init = tmp_path / "init.png"
        Image.fromarray(ref.init_image(64, 64)).save(init)
        browser.get(s.url + "/")
        WebDriverWait(browser, 30).until(lambda d: "flux-tiny" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "edit").click()
        browser.find_element(By.ID, "image").send_keys(str(init))
        for name, value in {"prompt": "a watercolour", "width": "64", "height": "64", "steps": "5",
                            "strength": "0.6", "seed": "11"}.items():
            el = browser.find_element(By.ID, name)
            el.clear()
            el.send_keys(value)
        browser.find_element(By.ID, "go").click()
        WebDriverWait(browser, 300).until(
            lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
        assert browser.find_element(By.ID, "status").text == "done: 64x64, seed 11"
        src = browser.find_element(By.ID, "output").get_attribute("src")
        meta = fluxmini.read_metadata(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
        assert meta["mode"] == "img2img" and meta["strength"] == 0.6
    finally:
        s.stop()
