"""GFPGANv1.4 .pth -> ONNX with facefusion's gfpgan_1.4.onnx signature (offline; needs the torch extra).

The enhancer runs on onnxruntime in the worker; this converter is how we make that file from
TencentARC's checkpoint ourselves instead of trusting a third-party export. It builds the
gfpgan package's GFPGANv1Clean with the v1.4 settings GFPGANer uses (arch 'clean',
channel_multiplier 2), loads `params_ema`, and exports `input` [batch,3,512,512] RGB in [-1,1]
-> `output` [batch,3,512,512] in [-1,1]: facefusion's names, with a symbolic batch axis so the
worker's enhancer restores all faces of a frame batch in one call (facefusion's own file is fixed
at batch 1, which the worker also accepts, one face per call).

The batch axis needs one export-time rewrite. StyleGAN2's ModulatedConv2d folds the batch into
the channels and runs a grouped convolution with groups=batch, so its kernel's shape depends on
the batch: with a dynamic batch axis torch.onnx refuses it ("convolution for kernel of unknown
shape"), and without one the graph is fixed at batch 1. During the export only,
each ModulatedConv2d computes the same thing without groups (scale the input channels by the
style, convolve with the shared weight, scale the output channels by the demodulation factor),
the "unfused" form of StyleGAN2's modulated convolution; the test compares the ONNX model with
the unpatched torch network.

The StyleGAN decoder's noise is the checkpoint's fixed noise buffers (randomize_noise=False), so
the ONNX model is deterministic; PyTorch's GFPGANer draws fresh noise on every call, so its
results differ from the ONNX model's by that noise term only.

torch, torchvision and gfpgan are imported inside the functions: importing this module (or
`facefleet.models.cli`) never loads torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from facefleet.models.torch_compat import import_gfpgan_clean

INPUT_NAME = "input"
OUTPUT_NAME = "output"
SIZE = 512
OPSET = 17
BATCH_AXIS = "batch"
DYNAMIC_AXES = {INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}}


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


def _ungrouped_forward(conv: Any) -> Callable[[Any, Any], Any]:
    """ModulatedConv2d.forward without the batch-sized grouped convolution (see module doc)."""
    import torch  # type: ignore[import-not-found,unused-ignore]
    from torch.nn import functional  # type: ignore[import-not-found,unused-ignore]

    def forward(x: Any, style: Any) -> Any:
        s = conv.modulation(style)  # (b, c_in)
        weight = conv.weight[0]  # (c_out, c_in, k, k), shared by the batch
        if conv.sample_mode == "upsample":
            x = functional.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        elif conv.sample_mode == "downsample":
            x = functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        # Per-channel scaling commutes with the per-channel bilinear resize above.
        out = functional.conv2d(x * s[:, :, None, None], weight, padding=conv.padding)
        if conv.demodulate:
            # rsqrt(sum over c_in, k, k of (w * s)^2): the modulated weight's norm per output.
            demod = torch.rsqrt(s.pow(2) @ weight.pow(2).sum([2, 3]).t() + conv.eps)
            out = out * demod[:, :, None, None]
        return out

    return forward


@contextmanager
def batch_free_modulated_convs(net: Any) -> Iterator[int]:
    """Give every ModulatedConv2d of `net` the ungrouped forward for the duration; yields how
    many were patched. The class is matched by name: gfpgan's clean and bilinear archs share it."""
    patched = []
    for module in net.modules():
        if type(module).__name__ == "ModulatedConv2d" and hasattr(module, "modulation"):
            module.forward = _ungrouped_forward(module)
            patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward


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
    with torch.no_grad(), warnings.catch_warnings(), batch_free_modulated_convs(net) as count:
        if count == 0:
            raise ValueError("no ModulatedConv2d found: not a GFPGANv1Clean network")
        # The tracer warns that int(out.size(1) // 2) becomes a constant: true and intended,
        # it is a channel count; the batch axis stays symbolic (DYNAMIC_AXES).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=DYNAMIC_AXES,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    _declare_output_shape(tmp)
    tmp.replace(onnx_path)
    return onnx_path


def _declare_output_shape(path: Path) -> None:
    """Write `output`'s shape as [batch,3,512,512]: the tracer leaves the spatial dims as
    made-up symbols, and readers of the signature (the reference, our tests) expect numbers."""
    import onnx  # type: ignore[import-untyped,unused-ignore]

    model = onnx.load(str(path))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    for dim, value in zip(dims, (BATCH_AXIS, 3, SIZE, SIZE), strict=True):
        if isinstance(value, str):
            dim.dim_param = value
        else:
            dim.dim_value = value
    onnx.save_model(model, str(path))
