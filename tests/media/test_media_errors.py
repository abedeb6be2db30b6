"""How SDK failures reach callers: one StorageError code per kind of failure.

The table feeds botocore's own exception types (as the SDK raises them) to the boundary
mapping; the last test points a store at a closed loopback port for a real connection error.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from facefleet.media import S3MediaStore, _s3_error
from facefleet.storage import StorageError
from tests.s3server import free_port


def client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    return ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        pytest.param(client_error("NoSuchKey", 404), "media_not_found", id="no-such-key"),
        pytest.param(client_error("404", 404, "HeadObject"), "media_not_found", id="head-404"),
        pytest.param(client_error("NoSuchBucket", 404), "storage_error", id="no-such-bucket"),
        pytest.param(client_error("AccessDenied", 403), "storage_error", id="access-denied"),
        pytest.param(client_error("SlowDown", 503), "storage_error", id="throttled"),
        pytest.param(client_error("InternalError", 500), "storage_error", id="server-error"),
        pytest.param(
            EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
            "storage_error",
            id="endpoint-unreachable",
        ),
        pytest.param(
            ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), "storage_error", id="timeout"
        ),
        pytest.param(NoCredentialsError(), "storage_error", id="no-credentials"),
    ],
)
def test_sdk_errors_map_to_storage_errors(exc: Exception, code: str) -> None:
    err = _s3_error(exc, "s3://b/k")
    assert isinstance(err, StorageError)
    assert err.code == code
    assert err.message.startswith("s3://b/k")


def test_an_unreachable_endpoint_is_a_transient_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = S3MediaStore("ff-unreachable", "p")
    source = tmp_path / "a.png"
    source.write_bytes(b"x")
    for op in (
        lambda: store.put_file(source),
        lambda: store.download("s3://ff-unreachable/p/uploads/x/a.png", tmp_path / "d"),
        lambda: store.mark_submitted(str(uuid.uuid4()), b"{}"),
        lambda: store.read_manifest(store.default_output_prefix(), str(uuid.uuid4())),
    ):
        with pytest.raises(StorageError) as info:
            op()
        assert info.value.code == "storage_error"
