"""`facefleet models ...` through the real dispatcher, as an operator or an init container runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from facefleet.cli import main
from tests.models.conftest import Mirror


def test_tiny_then_pull_then_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "tiny", "--dest", str(tmp_path / "tiny")]) == 0
    catalog = capsys.readouterr().out.strip()
    assert catalog == str(tmp_path / "tiny" / "catalog.yaml")

    dest = str(tmp_path / "models")
    assert main(["models", "pull", "--catalog", catalog, "--dest", dest]) == 0
    assert main(["models", "verify", "--catalog", catalog, "--dest", dest]) == 0
    err = capsys.readouterr().err
    assert err.count("fetched ") == 4 and "ok: " in err


def test_pull_only_and_base_url(mirror: Mirror, tiny_dir: Path, tmp_path: Path) -> None:
    argv = ["models", "pull", "--catalog", str(tiny_dir / "catalog.yaml"), "--dest", str(tmp_path)]
    argv += ["--only", "det_10g,w600k_r50", "--only", "gfpgan_1.4", "--base-url", mirror.base_url]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == [
        "det_10g.onnx",
        "gfpgan_1.4.onnx",
        "w600k_r50.onnx",
    ]


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        pytest.param(["--only", "nope"], 2, "unknown model 'nope'", id="unknown-name"),
        pytest.param(["--retries", "0"], 2, "--retries", id="bad-retries"),
        pytest.param(["--base-url", "http://127.0.0.1:9/"], 4, "every source failed", id="down"),
    ],
)
def test_pull_exit_codes(
    extra: list[str],
    code: int,
    message: str,
    tiny_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["models", "pull", "--catalog", str(tiny_dir / "catalog.yaml"), "--dest", str(tmp_path)]
    assert main([*argv, "--retries", "1", *extra]) == code
    assert message in capsys.readouterr().err


def test_verify_lists_problems_and_exits_1(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = str(tiny_dir / "catalog.yaml")
    (tmp_path / "w600k_r50.onnx").write_bytes((tiny_dir / "w600k_r50.onnx").read_bytes()[:-1])

    assert main(["models", "verify", "--catalog", catalog, "--dest", str(tmp_path)]) == 1

    err = capsys.readouterr().err
    assert err.count("problem: ") == 4
    assert "file det_10g.onnx) is missing" in err
    assert "file w600k_r50.onnx) at" in err and "truncated" in err


def test_dest_defaults_to_the_worker_setting(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACEFLEET_MODEL_DIR", str(tmp_path))
    assert main(["models", "pull", "--catalog", str(tiny_dir / "catalog.yaml")]) == 0
    assert (tmp_path / "det_10g.onnx").exists()


def test_convert_without_torch_is_a_clear_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]  # noqa: F401

        pytest.skip("torch is installed here; tests/models/test_convert_gfpgan.py covers it")
    except ImportError:
        pass
    code = main(["models", "convert-gfpgan", str(tmp_path / "in.pth"), str(tmp_path / "o.onnx")])
    assert code == 2
    assert "torch" in capsys.readouterr().err


@pytest.mark.e2e
def test_init_container_pull_loads_no_ml_runtime(tiny_dir: Path, tmp_path: Path) -> None:
    """The init image can be slim: `models pull` imports neither numpy, onnx, ORT nor torch."""
    script = (
        "import sys\n"
        "from facefleet.cli import main\n"
        f"code = main(['models', 'pull', '--catalog', {str(tiny_dir / 'catalog.yaml')!r},"
        f" '--dest', {str(tmp_path)!r}])\n"
        "heavy = {'numpy', 'onnx', 'onnxruntime', 'torch', 'insightface'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FACEFLEET_MODEL_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
