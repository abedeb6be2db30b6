"""The status page end to end in headless Chromium: submit through the page, watch the bar reach
100%, see the result.

Needs Debian's chromium + chromium-driver and the selenium package; skipped locally without
them, a failure in CI (CI=true). Never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.conftest import API_KEY, Gateway, GatewayWorld, png

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SCREENSHOT = os.environ.get("FACEFLEET_TEST_PAGE_SCREENSHOT")
"""When set, the final page is also saved there (for people to look at)."""


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
    # the key's recent jobs (GET /v1/jobs) list it, completed, within a refresh or two
    wait.until(ec.text_to_be_present_in_element((By.ID, "recent-jobs"), job_id[:8]))
    wait.until(ec.text_to_be_present_in_element((By.ID, "recent-jobs"), "completed"))
    assert world.journal(job_id)[-1]["type"] == "completed"
    assert browser.execute_script("return sessionStorage.getItem('facefleet.apiKey')") == API_KEY
    assert API_KEY not in browser.page_source  # in sessionStorage, never in the document
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    if SCREENSHOT:
        shutil.copyfile(shot, SCREENSHOT)
