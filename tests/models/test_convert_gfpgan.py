"""convert-gfpgan: a random GFPGANv1Clean gives the same output in torch and onnxruntime.

Needs the torch extra (torch, torchvision, gfpgan); skipped cleanly without it. `make test`
runs it in its own venv (`make torch-check`), so CI always runs it. Slow: the v1.4
architecture is ~85M parameters, so building, saving and exporting takes a minute or two on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facefleet.models.torch_compat import install_functional_tensor_shim

torch = pytest.importorskip(
    "torch", reason="needs the torch extra; `make test` runs this file in `make torch-check`"
)
pytest.importorskip("torchvision")
install_functional_tensor_shim()  # gfpgan cannot be imported on torchvision>=0.17 without it
pytest.importorskip("gfpgan")

pytestmark = [
    pytest.mark.slow,
    # torch's TorchScript exporter and basicsr/gfpgan warn on import and trace; not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def test_shim_lets_gfpgan_import_on_current_torchvision() -> None:
    from facefleet.models.torch_compat import SHIM_NAME, import_gfpgan_clean

    assert import_gfpgan_clean().__name__ == "GFPGANv1Clean"
    import sys

    assert SHIM_NAME in sys.modules


def test_random_checkpoint_converts_and_matches_torch(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from facefleet.models.convert_gfpgan import build_gfpgan_v14, convert, exportable

    torch.manual_seed(0)
    net = build_gfpgan_v14()
    with torch.no_grad():  # the noise-injection weights start at 0; make the noise path count
        for name, param in net.named_parameters():
            if name.endswith(".weight") and param.numel() == 1:
                param.fill_(0.1)
    pth = tmp_path / "GFPGANv1.4.pth"
    torch.save({"params_ema": net.state_dict()}, str(pth))

    out = convert(pth, tmp_path / "gfpgan_1.4.onnx")

    model = onnx.load(str(out))
    dims = [
        [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*model.graph.input, *model.graph.output)
    ]
    assert [v.name for v in model.graph.input] == ["input"]
    assert [v.name for v in model.graph.output] == ["output"]
    assert dims == [["batch", 3, 512, 512]] * 2  # a symbolic batch axis: the enhancer batches
    # The unpatched torch net (grouped modulated convs) is the reference, at batch 1 and 2.
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 512, 512)).astype(np.float32)
    with torch.no_grad():
        expected = exportable(net)(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    (first,) = session.run(None, {"input": x[:1]})
    assert got.shape == (2, 3, 512, 512)
    assert np.abs(got - expected).max() < 1e-3
    assert np.abs(first - expected[:1]).max() < 1e-3
