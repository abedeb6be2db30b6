"""Install checkov, once per machine, into its own virtualenv under the git-ignored cache.

checkov cannot live in the project's environment: it pins `packaging<24` (and old networkx),
which conflicts with pytest >= 8.x's `packaging>=24`. So it gets a private venv at
`.cache/checkov/venv` (PyPI only, pinned version) and is run as a separate program.

Usage: ``python helm/tools/fetch_checkov.py``; prints the path of the checkov executable.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

CHECKOV_VERSION = "3.3.30"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "checkov"


class FetchError(RuntimeError):
    """checkov could not be installed; the message carries pip's output."""


def checkov_path(cache: Path = DEFAULT_CACHE) -> Path:
    return cache / "venv" / "bin" / "checkov"


def _version(binary: Path) -> str:
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def fetch(cache: Path = DEFAULT_CACHE, version: str = CHECKOV_VERSION) -> Path:
    """Return a working checkov of `version`, installing it on first use."""
    binary = checkov_path(cache)
    if binary.exists() and _version(binary) == version:
        return binary
    env_dir = cache / "venv"
    if not (env_dir / "bin" / "python").exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    cmd = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    proc = subprocess.run(
        [*cmd, f"checkov=={version}"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0 or _version(binary) != version:
        raise FetchError(f"pip install checkov=={version} failed:\n{proc.stderr.strip()}")
    return binary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    try:
        print(fetch(args.cache))
    except (FetchError, OSError) as exc:
        print(f"fetch_checkov: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
