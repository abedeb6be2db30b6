"""The gateway with the real face pipeline: upload two photos, follow the job, fetch the image.

Real broker, a real `faceswap` worker (classic backend) and a real gateway process.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from facefleet.broker import Broker
from tests.conftest import Env, delete_tier_queues
from tests.gateway.conftest import API_KEY, Gateway, GatewayWorld, read_events, seqs

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

IMAGES = Path(cv2.__file__).parent.parent / "insightface" / "data" / "images"


@pytest.fixture(scope="module")
def faceswap_world(
    broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayWorld]:
    tier = "gwfs" + uuid.uuid4().hex[:10]
    root = tmp_path_factory.mktemp("gateway-faceswap") / "data"
    root.mkdir()
    env = Env(broker.url, tier, root, [{"name": tier, "max_job_s": 120}])
    world = GatewayWorld(env, tier)
    # Interval 0: every stage is an event (by default a job this short reports none).
    env.start_worker(
        processor="faceswap", FACEFLEET_BACKEND="classic", FACEFLEET_PROGRESS_INTERVAL_S="0"
    )
    yield world
    for gw in world.gateways:
        gw.stop()
    env.stop_all()
    delete_tier_queues(broker.url, tier)


def test_upload_follow_and_download_a_face_swap(faceswap_world: GatewayWorld) -> None:
    gateway: Gateway = faceswap_world.start_gateway()
    target = (IMAGES / "t1.jpg").read_bytes()
    with gateway.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers={"Authorization": f"Bearer {API_KEY}"},
            files={
                "source": ("hanks.png", (IMAGES / "Tom_Hanks_54745.png").read_bytes(), "image/png"),
                "target": ("group.jpg", target, "image/jpeg"),
            },
            data={"options": json.dumps({"face_selector": "many"})},
        )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    frames, code, _ = read_events(gateway.ws_url(job["job_id"], token=job["token"]), timeout_s=120)
    assert code == 1000
    assert seqs(frames) == list(range(1, len(frames) + 1))
    assert frames[-1]["type"] == "completed", frames[-1]
    stages = {f["payload"].get("stage") for f in frames if f["type"] == "progress"}
    assert {"decode", "detect", "swap", "encode"} <= stages
    with gateway.http() as client:
        result = client.get(
            f"/v1/jobs/{job['job_id']}/result",
            headers={"Authorization": f"Bearer {job['token']}"},
        )
    assert result.status_code == 200
    image = cv2.imdecode(np.frombuffer(result.content, np.uint8), cv2.IMREAD_COLOR)
    original = cv2.imdecode(np.frombuffer(target, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == original.shape


def test_an_upload_without_a_face_fails_with_its_code(faceswap_world: GatewayWorld) -> None:
    gateway = (
        faceswap_world.gateways[0] if faceswap_world.gateways else faceswap_world.start_gateway()
    )
    blank = cv2.imencode(".png", np.full((240, 240, 3), 127, np.uint8))[1].tobytes()
    with gateway.http() as client:
        resp = client.post(
            "/v1/jobs",
            headers={"Authorization": f"Bearer {API_KEY}"},
            files={
                "source": ("blank.png", blank, "image/png"),
                "target": ("group.jpg", (IMAGES / "t1.jpg").read_bytes(), "image/jpeg"),
            },
        )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    frames, code, _ = read_events(gateway.ws_url(job["job_id"], token=job["token"]), timeout_s=120)
    assert code == 1000
    assert frames[-1]["type"] == "failed"
    assert frames[-1]["payload"]["code"] == "no_face_in_source"


def test_the_page_shows_the_swapped_photo(
    faceswap_world: GatewayWorld, browser: Any, tmp_path: Path
) -> None:
    """Chromium: upload two real photos through the page, watch 100%, see the result image."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    gateway = (
        faceswap_world.gateways[0] if faceswap_world.gateways else faceswap_world.start_gateway()
    )
    browser.get(gateway.url + "/")
    browser.find_element(By.ID, "api-key").send_keys(API_KEY)
    browser.find_element(By.ID, "source").send_keys(str(IMAGES / "Tom_Hanks_54745.png"))
    browser.find_element(By.ID, "target").send_keys(str(IMAGES / "t1.jpg"))
    options = browser.find_element(By.ID, "options")
    options.clear()
    options.send_keys("{}")
    wait = WebDriverWait(browser, 120)
    wait.until(ec.text_to_be_present_in_element((By.ID, "queues"), faceswap_world.env.tier))
    browser.find_element(By.ID, "submit").click()
    wait.until(
        ec.text_to_be_present_in_element_attribute((By.ID, "progress"), "aria-valuenow", "100")
    )
    wait.until(ec.text_to_be_present_in_element_attribute((By.ID, "state"), "class", "completed"))
    media = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "img#result-media")))
    wait.until(lambda _: browser.execute_script("return arguments[0].naturalWidth", media) > 0)
    assert browser.execute_script("return arguments[0].naturalWidth", media) == 1280
    browser.save_screenshot(str(tmp_path / "faceswap-page.png"))
