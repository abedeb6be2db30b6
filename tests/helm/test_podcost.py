"""consumer/podcost.py against a fake Kubernetes API: what is patched, when, and that failures
never escape into the worker."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from facefleet.consumer.podcost import ANNOTATION, PodDeletionCost


class FakeApi:
    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fail = fail  # number of calls that raise before calls succeed

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("403 Forbidden: pods is forbidden")
        self.calls.append((name, namespace, body))
        return {}

    def costs(self) -> list[str]:
        return [body["metadata"]["annotations"][ANNOTATION] for _, _, body in self.calls]


def sequence(pc: PodDeletionCost, steps: str) -> None:
    for step in steps.split():
        getattr(pc, step)()


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        pytest.param("busy idle", ["100", "0"], id="one-job"),
        pytest.param("busy idle busy idle", ["100", "0", "100", "0"], id="two-jobs-in-a-row"),
        pytest.param("busy busy idle", ["100", "0"], id="repeated-busy-patches-once"),
        pytest.param("idle", ["0"], id="idle-at-start-marks-cheap"),
        pytest.param("idle idle busy", ["0", "100"], id="repeated-idle-patches-once"),
    ],
)
def test_patches_follow_state_changes(steps: str, expected: list[str]) -> None:
    api = FakeApi()
    pc = PodDeletionCost("w-abc", "ns", enabled=True, api=api)
    sequence(pc, steps)
    assert api.costs() == expected
    assert {(name, ns) for name, ns, _ in api.calls} == {("w-abc", "ns")}


@pytest.mark.parametrize(
    ("pod_name", "namespace", "enabled"),
    [
        pytest.param("w-abc", "ns", False, id="disabled"),
        pytest.param(None, "ns", True, id="no-pod-name"),
        pytest.param("w-abc", None, True, id="no-namespace"),
    ],
)
def test_disabled_never_calls_the_api(
    pod_name: str | None, namespace: str | None, enabled: bool
) -> None:
    api = FakeApi()
    pc = PodDeletionCost(pod_name, namespace, enabled=enabled, api=api)
    sequence(pc, "busy idle busy")
    assert api.calls == []
    assert pc.current is None


def test_api_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    api = FakeApi(fail=1)
    pc = PodDeletionCost("w-abc", "ns", enabled=True, api=api)
    with caplog.at_level(logging.WARNING, logger="facefleet.consumer.podcost"):
        pc.busy()  # fails: logged
    assert pc.current is None
    assert "403 Forbidden" in caplog.text and "ns/w-abc" in caplog.text
    pc.busy()  # still busy: retried because the first write did not land
    assert api.costs() == ["100"]
    assert pc.current == "100"


def test_missing_cluster_config_does_not_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an injected API, outside a cluster the in-cluster config fails: logged only."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    pc = PodDeletionCost("w-abc", "ns", enabled=True)
    pc.busy()
    pc.idle()
    assert pc.current is None
