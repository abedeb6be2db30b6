"""`media_env`: a world in one of two shapes, and the spine's integration and chaos tests run on
both (test_integration.py makes it its `env`):

- `file`: the embedded default: media and job state (journals) in the data root;
- `s3-postgres`: no shared volume at all: media in an S3-API store (moto_server on loopback),
  job state in PostgreSQL (a fresh database per session).

Producers need only the broker and the media store in both."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.conftest import Env


@pytest.fixture(params=["file", "s3-postgres"])
def media_env(request: pytest.FixtureRequest, make_env: Callable[..., Env]) -> Env:
    if request.param == "s3-postgres":
        return make_env(
            media_url=request.getfixturevalue("s3_media_url"),
            store_url=request.getfixturevalue("pg_url"),
        )
    return make_env()
