"""Render the chart into plain manifests under keda/manifests/, for users without Helm.

Release `facefleet`, namespace `facefleet`, values helm/ci/plain-manifests.yaml, `helm test` pod
left out. One file per chart template (`worker-scaledobject.yaml`, ...) plus a
kustomization.yaml, so `kubectl apply -k keda/manifests` works and kustomize can change the
namespace or patch thresholds. tests/helm/test_chart_files.py fails when the files differ from a
fresh render; regenerate with ``python helm/tools/render_manifests.py``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import fetch_helm

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "facefleet"
VALUES = REPO_ROOT / "helm" / "ci" / "plain-manifests.yaml"
OUT = REPO_ROOT / "keda" / "manifests"
RELEASE = "facefleet"
NAMESPACE = "facefleet"
SOURCE = re.compile(r"^# Source: facefleet/templates/(?P<path>\S+)$", re.MULTILINE)
HEADER = (
    "# Rendered from helm/facefleet by helm/tools/render_manifests.py (release {release},"
    " namespace {namespace},\n# values helm/ci/plain-manifests.yaml). Do not edit: change the"
    " chart and re-render.\n"
)


def render(helm: Path) -> dict[str, str]:
    """File name -> content of every manifest file (kustomization.yaml included)."""
    cmd = [
        str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
        "-f", str(VALUES), "--skip-tests",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"helm template failed:\n{proc.stderr}")
    files: dict[str, list[str]] = {}
    for doc in proc.stdout.split("\n---\n"):
        m = SOURCE.search(doc)
        if not m or not doc[m.end() :].strip():
            continue
        name = m["path"].replace("/", "-")
        files.setdefault(name, []).append(doc[m.end() :].strip("\n"))
    out = {
        name: HEADER.format(release=RELEASE, namespace=NAMESPACE) + "\n---\n".join(docs) + "\n"
        for name, docs in sorted(files.items())
    }
    resources = "".join(f"  - {name}\n" for name in out)
    out["kustomization.yaml"] = (
        HEADER.format(release=RELEASE, namespace=NAMESPACE)
        + "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        + f"namespace: {NAMESPACE}\nresources:\n{resources}"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if keda/manifests is stale")
    args = parser.parse_args(argv)
    files = render(fetch_helm.fetch())
    current = {p.name: p.read_text() for p in OUT.glob("*.yaml")} if OUT.is_dir() else {}
    if args.check:
        if current != files:
            print(f"{OUT} is stale: run python helm/tools/render_manifests.py", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in set(current) - set(files):
        (OUT / stale).unlink()
    for name, text in files.items():
        (OUT / name).write_text(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
