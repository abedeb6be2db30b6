"""The checked-in gRPC stubs are what grpcio-tools makes of the vendored proto today."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("externalscaler_pb2.py", "externalscaler_pb2.pyi", "externalscaler_pb2_grpc.py")


def test_stubs_match_the_vendored_proto(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")
    target = tmp_path / "facefleet" / "keda" / "scaler"
    target.mkdir(parents=True)
    shutil.copy(ROOT / "keda/scaler/externalscaler.proto", target)
    rc = protoc.main(
        [
            "protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(target / "externalscaler.proto"),
        ]
    )
    assert rc == 0
    for name in GENERATED:
        assert (target / name).read_text() == (ROOT / "keda/scaler" / name).read_text(), (
            f"keda/scaler/{name} is stale: regenerate it (keda/scaler/SOURCE.txt)"
        )


def test_vendored_proto_is_v2_20_2_shape() -> None:
    text = (ROOT / "keda/scaler/externalscaler.proto").read_text()
    for rpc in ("IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics"):
        assert f"rpc {rpc}(" in text
    assert "StreamMetricSpec" not in text  # KEDA v2.21, not the release the chart targets
    assert "Apache License" in (ROOT / "keda/scaler/LICENSE-KEDA").read_text()
