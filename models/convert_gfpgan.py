"""GFPGANv1.4 .pth -> ONNX with facefusion's gfpgan_1.4.onnx signature (offline; needs the torch extra).

The enhancer runs on onnxruntime in the worker; this converter is how we make that file from
TencentARC's checkpoint ourselves instead of trusting a third-party export. It builds the
gfpgan package's GFPGANv1Clean with the v1.4 settings GFPGANer uses (arch 'clean',
channel_multiplier 2), loads `params_ema`, and exports `input` [1,3,512,512] RGB in [-1,1] ->
`output` [1,3,512,512] in [-1,1].

The StyleGAN decoder's noise is the checkpoint's fixed noise buffers (randomize_noise=False), so
the ONNX model is deterministic; PyTorch's GFPGANer draws fresh noise on every call, so its
results differ from the ONNX model's by that noise term only.

torch, torchvision and gfpgan are imported inside the functions: importing this module (or
`models.cli`) never loads torch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from models.torch_compat import import_gfpgan_clean

INPUT_NAME = "input"
OUTPUT_NAME = "output"
SIZE = 512
OPSET = 17


class TorchMissing(RuntimeError):
    """The torch extra is not installed (pip install 'facefleet[torch]')."""


def build_gfpgan_v14() -> Any:
    """An untrained GFPGANv1Clean with GFPGANer's v1.4 ('clean', multiplier 2) settings."""
    gfpgan_clean = import_gfpgan_clean()
    return gfpgan_clean(
        out_size=SIZE,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )


def load_state_dict(path: Path) -> dict[str, Any]:
    """The weights GFPGANer loads: `params_ema`, else `params`, else a bare state dict."""
    import torch  # type: ignore[import-not-found,unused-ignore]

    checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path}: not a state dict checkpoint")
    for key in ("params_ema", "params"):
        if key in checkpoint:
            state: dict[str, Any] = checkpoint[key]
            return state
    return checkpoint


def exportable(net: Any) -> Any:
    """Wrap the net so forward(x) is the restored image only, with fixed noise."""
    import torch  # type: ignore[import-not-found,unused-ignore]

    class _Restore(torch.nn.Module):  # type: ignore[misc,unused-ignore]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            image, _ = self.inner(x, return_rgb=False, randomize_noise=False)
            return image

    return _Restore(net).eval()


def convert(pth: Path, onnx_path: Path, *, opset: int = OPSET) -> Path:
    """Convert a GFPGANv1.4 checkpoint; the ONNX file is written atomically."""
    try:
        import torch  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise TorchMissing("convert-gfpgan needs torch: pip install 'facefleet[torch]'") from exc
    net = build_gfpgan_v14()
    net.load_state_dict(load_state_dict(pth), strict=True)
    model = exportable(net)
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_name(f".{onnx_path.name}.tmp")
    example = torch.zeros(1, 3, SIZE, SIZE)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns that int(out.size(1) // 2) becomes a constant: true and intended,
        # the export is for a fixed 1x3x512x512 input.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    tmp.replace(onnx_path)
    return onnx_path
