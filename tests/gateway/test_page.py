"""The status page end to end in headless Chromium: submit through the page, watch the bar reach
100%, see the result.

Needs Debian's chromium + chromium-driver and the selenium package; skipped locally without
them, a failure in CI (CI=true). Never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import API_KEY, Gateway, GatewayWorld, in_ci, png

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = os.environ.get("FACEFLEET_PAGE_SCREENSHOT")
"""When set, the final page is also saved there (for people to look at)."""


def _need_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        message = f"browser test needs {', '.join(missing)}"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1100,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_submit_through_the_page_and_see_the_result(
    world: GatewayWorld, gateway: Gateway, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    source, target = tmp_path / "me.png", tmp_path / "group.png"
    source.write_bytes(png(64, 64, (220, 170, 140)))
    target.write_bytes(png(64, 64, (90, 120, 200)))
    browser.get(gateway.url + "/")
    assert "FaceFleet" in browser.title
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "source").send_keys(str(source))
    browser.find_element(By.ID, "target").send_keys(str(target))
    options = browser.find_element(By.ID, "options")
    options.clear()
    options.send_keys('{"sleep_s": 2, "steps": 5}')
    wait = WebDriverWait(browser, 60)
    # the queue view filled in once the key was entered
    wait.until(ec.text_to_be_present_in_element((By.ID, "queues"), world.env.tier))
    browser.find_element(By.ID, "submit").click()
    wait.until(ec.visibility_of_element_located((By.ID, "job-card")))
    job_id = browser.find_element(By.ID, "job-id").text
    wait.until(
        ec.text_to_be_present_in_element_attribute((By.ID, "progress"), "aria-valuenow", "100")
    )
    wait.until(ec.text_to_be_present_in_element_attribute((By.ID, "state"), "class", "completed"))
    result = wait.until(ec.presence_of_element_located((By.ID, "result-media")))
    assert job_id in result.text  # the sleep processor's result.json names the job
    log = browser.find_element(By.ID, "events").get_attribute("textContent")
    assert "progress" in log and "completed" in log
    assert world.journal(job_id)[-1]["type"] == "completed"
    assert browser.execute_script("return sessionStorage.getItem('facefleet.apiKey')") == API_KEY
    assert API_KEY not in browser.page_source  # in sessionStorage, never in the document
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    if SCREENSHOT:
        shutil.copyfile(shot, SCREENSHOT)
