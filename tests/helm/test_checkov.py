"""checkov over the rendered manifests of every CI values file: no finding left unexplained.

Offline, checkov has no severities (they come from the Prisma Cloud API), so every failed check
is treated as if it were high: it must match an entry of ACCEPTED below, which says why the chart
does it on purpose. An entry that no longer matches anything also fails, so the list stays true.
checkov does not know KEDA's ScaledJob, so the Job pod template is not scanned by it; the same
hardening is asserted for it in test_render.py::test_pods_are_locked_down.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helm.chart import REPO, missing, template

sys.path.insert(0, str(REPO / "helm" / "tools"))
import fetch_checkov

VALUES_FILES = [
    "defaults.yaml",
    "one-tier.yaml",
    "all-scale-to-zero.yaml",
    "batch-scaledjob.yaml",
    "mig.yaml",
    "existing-secret.yaml",
    "ingress.yaml",
    "s3-media.yaml",
    "postgres-s3.yaml",
    "scaler-work.yaml",
]

# (check id, resource regex "Kind.namespace.name", why it is accepted)
ACCEPTED: list[tuple[str, str, str]] = [
    (
        "CKV_K8S_11",
        r"^Deployment\..*-(gateway|webhooks|scaler|worker-[a-z0-9-]+)$",
        "CPU limits: deliberately unset on workers, gateway, webhooks and scaler. A CFS quota "
        "throttles the GPU worker's Python pre/post-processing threads, the gateway's WebSocket "
        "fan-out, the webhooks' delivery bursts (many jobs finishing at once) and the scaler's "
        "events replay at start, adding latency while the node has idle CPU; CPU requests are "
        "set for scheduling, memory limits are set everywhere. (The one-shot migration hook Job has a CPU limit.)",
    ),
    (
        "CKV_K8S_15",
        r".*",
        "imagePullPolicy IfNotPresent: images are addressed by immutable version tags or "
        "digests (image.*.digest); Always would make every GPU pod start (scale-up, Jobs) "
        "depend on the registry and add pull latency.",
    ),
    (
        "CKV_K8S_35",
        r".*",
        "Secrets as environment variables: the runtime contract reads AMQP_URL, "
        "FACEFLEET_API_KEYS and FACEFLEET_TOKEN_SECRET from the environment "
        "(facefleet.settings), and boto3 reads the s3 media key pair from AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY (the standard AWS chain); they come from secretKeyRef, never "
        "from plain values.",
    ),
    (
        "CKV_K8S_38",
        r"^Deployment\..*-worker-[a-z0-9-]+$",
        "Service account token mounted on workers of tiers with podDeletionCost only: the worker "
        "PATCHes its own pod's controller.kubernetes.io/pod-deletion-cost; the Role allows "
        "patch on pods and nothing else.",
    ),
    (
        "CKV_K8S_43",
        r".*",
        "Image digests: the defaults use tags (the chart cannot know a release's digest); "
        "production sets image.consumer.digest / image.producer.digest.",
    ),
    (
        "CKV_K8S_8",
        r"^Pod\..*-test-submit$",
        "No liveness probe on the `helm test` pod: it runs one command to completion and serves "
        "nothing; activeDeadlineSeconds bounds it.",
    ),
    (
        "CKV_K8S_9",
        r"^Pod\..*-test-submit$",
        "No readiness probe on the `helm test` pod: nothing routes traffic to it.",
    ),
]


def checkov_binary() -> Path:
    try:
        return fetch_checkov.fetch()
    except (fetch_checkov.FetchError, OSError) as exc:
        missing(f"checkov is not available: {exc}")
        raise


def failed_checks(report: Any) -> list[dict[str, Any]]:
    reports = report if isinstance(report, list) else [report]
    return [f for r in reports for f in r["results"]["failed_checks"]]


def explain(check_id: str, resource: str) -> str | None:
    for cid, pattern, reason in ACCEPTED:
        if cid == check_id and re.match(pattern, resource):
            return reason
    return None


@pytest.mark.slow
def test_checkov_findings_are_all_explained(helm: Path, tmp_path: Path) -> None:
    checkov = checkov_binary()
    for name in VALUES_FILES:
        (tmp_path / name).write_text(template(helm, [name]))
    proc = subprocess.run(
        [str(checkov), "-d", str(tmp_path), "--framework", "kubernetes", "--quiet",
         "--compact", "--skip-download", "-o", "json"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    failures = failed_checks(report)
    reports = report if isinstance(report, list) else [report]
    assert sum(r["summary"]["passed"] for r in reports) > 1000, "checkov scanned nothing?"
    unexplained = sorted(
        {
            f"{f['check_id']} {f['check_name']} on {f['resource']}"
            for f in failures
            if explain(f["check_id"], f["resource"]) is None
        }
    )
    assert not unexplained, "\n".join(unexplained)
    used = {(cid, pat) for cid, pat, _ in ACCEPTED for f in failures
            if f["check_id"] == cid and re.match(pat, f["resource"])}  # fmt: skip
    stale = [(cid, pat) for cid, pat, _ in ACCEPTED if (cid, pat) not in used]
    assert not stale, f"accepted findings that no longer occur (remove them): {stale}"


@pytest.mark.parametrize(
    ("check_id", "resource", "accepted"),
    [
        pytest.param("CKV_K8S_38", "Deployment.ns.ff-facefleet-gateway", False,
                     id="token-on-gateway-not-accepted"),
        pytest.param("CKV_K8S_38", "Deployment.ns.ff-facefleet-worker-high", True,
                     id="token-on-worker-accepted"),
        pytest.param("CKV_K8S_8", "Deployment.ns.ff-facefleet-gateway", False,
                     id="missing-probe-on-gateway-not-accepted"),
        pytest.param("CKV_K8S_20", "Deployment.ns.ff-facefleet-worker-high", False,
                     id="privilege-escalation-never-accepted"),
    ],
)  # fmt: skip
def test_acceptance_is_narrow(check_id: str, resource: str, accepted: bool) -> None:
    assert (explain(check_id, resource) is not None) is accepted
