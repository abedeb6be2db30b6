"""`media_env`: a world whose media live in the data root (file://, the embedded default) or in
an S3-API store (moto_server on loopback). The spine's integration and chaos tests run on both
(test_integration.py makes it its `env`). Job state stays in the workers' data root either way;
the producer needs only the broker and the store."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Env


@pytest.fixture(params=["file", "s3"])
def media_env(request: pytest.FixtureRequest, make_env: Callable[..., Env]) -> Env:
    if request.param == "s3":
        return make_env(media_url=request.getfixturevalue("s3_media_url"))
    return make_env()
