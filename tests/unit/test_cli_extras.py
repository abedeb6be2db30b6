"""A command run without its extra names the extra (facefleet.cli.missing_extra)."""

from __future__ import annotations

import pytest

from facefleet.cli import missing_extra


@pytest.mark.parametrize(
    ("module", "extra"),
    [
        pytest.param("cv2", "worker", id="opencv"),
        pytest.param("onnxruntime.capi", "worker", id="onnxruntime-submodule"),
        pytest.param("fastapi", "gateway", id="gateway"),
        pytest.param("grpc", "scaler", id="scaler"),
        pytest.param("matplotlib.pyplot", "sim", id="simulator-plot"),
        pytest.param("insightface", "demo", id="demo-photos"),
        pytest.param("no_such_module", None, id="not-ours-to-explain"),
    ],
)
def test_missing_extra_names_the_extra(module: str, extra: str | None) -> None:
    line = missing_extra(ModuleNotFoundError(f"No module named {module!r}", name=module))
    if extra is None:
        assert line is None
    else:
        assert line is not None
        assert f"facefleet[{extra}]" in line and repr(module.split(".")[0]) in line
