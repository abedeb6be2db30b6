"""Mark this worker's pod as expensive to delete while it is running a job.

On scale-in the HPA only lowers a Deployment's replica count; the ReplicaSet controller then picks
the victims, and among Ready pods it deletes those with the lowest
`controller.kubernetes.io/pod-deletion-cost` first (beta and on by default since Kubernetes 1.22,
KEP-2255). A worker that sets a high cost while busy and a low one while idle makes scale-in hit
idle pods first. It is best effort: the controller may still pick a busy pod (other ranking rules
come first, e.g. unready before ready), which is why SIGTERM still drains (see the chart's
terminationGracePeriodSeconds).

Failures are logged and swallowed: the annotation is an optimisation, never a reason for a worker
to crash or to delay a job. The Kubernetes API object is injectable so tests use a fake.

RBAC (helm/facefleet/templates/worker/rbac.yaml): patch on pods of the namespace, nothing else.
This module never reads the pod (it only calls patch_namespaced_pod with the annotation), so it
needs no get; keep it that way or widen the Role. A Role cannot be limited to "the pod itself":
resourceNames must list literal names when the Role is written, and worker pod names are
generated later.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
BUSY_COST = "100"
IDLE_COST = "0"

log = logging.getLogger(__name__)


class PodPatcher(Protocol):
    """The part of kubernetes.client.CoreV1Api we use."""

    def patch_namespaced_pod(self, name: str, namespace: str, body: Any) -> Any: ...


def _in_cluster_api() -> PodPatcher:
    from kubernetes import client, config  # imported lazily: only workers with the flag need it

    config.load_incluster_config()  # type: ignore[no-untyped-call]
    api: PodPatcher = client.CoreV1Api()
    return api


class PodDeletionCost:
    """Sets the pod-deletion-cost annotation of one pod: high while busy, low while idle.

    Built from FACEFLEET_DELETION_COST, POD_NAME and POD_NAMESPACE (WorkerSettings.deletion_cost,
    pod_name, pod_namespace). Disabled, or without a pod name/namespace, every call is a no-op.
    `busy()` and `idle()` set a state, they do not count: the caller says "busy" when a job starts
    and "idle" when nothing is left in flight (consumer/worker.py does exactly that with
    prefetch > 1). Calls only reach the API when the state changes, and are thread-safe.
    """

    def __init__(
        self,
        pod_name: str | None,
        pod_namespace: str | None,
        enabled: bool,
        api: PodPatcher | None = None,
    ) -> None:
        self.pod_name = pod_name
        self.pod_namespace = pod_namespace
        self.enabled = bool(enabled and pod_name and pod_namespace)
        if enabled and not self.enabled:
            log.warning("pod-deletion-cost disabled: POD_NAME or POD_NAMESPACE is not set")
        self._api = api
        self._lock = threading.Lock()
        self._current: str | None = None

    def busy(self) -> None:
        """A job is running: make this pod expensive to delete."""
        with self._lock:
            self._set(BUSY_COST)

    def idle(self) -> None:
        """No job is running: make this pod the preferred victim of a scale-in."""
        with self._lock:
            self._set(IDLE_COST)

    @property
    def current(self) -> str | None:
        """The cost last written successfully (None before the first write)."""
        return self._current

    def _set(self, cost: str) -> None:
        if not self.enabled or cost == self._current:
            return
        body = {"metadata": {"annotations": {ANNOTATION: cost}}}
        try:
            if self._api is None:
                self._api = _in_cluster_api()
            self._api.patch_namespaced_pod(self.pod_name or "", self.pod_namespace or "", body)
        except Exception as exc:  # never crash a worker over an optimisation
            log.warning(
                "could not set %s=%s on pod %s/%s: %s",
                ANNOTATION,
                cost,
                self.pod_namespace,
                self.pod_name,
                exc,
            )
            return
        self._current = cost
