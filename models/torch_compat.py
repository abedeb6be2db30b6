"""The one place that papers over basicsr's import of a module torchvision removed.

basicsr (pulled in by gfpgan) does `from torchvision.transforms.functional_tensor import
rgb_to_grayscale`; torchvision deprecated that module in 0.15 and removed it in 0.17, so
`import gfpgan` fails with ModuleNotFoundError on any current torchvision, and basicsr has had no
fixed release (XPixelGroup/BasicSR#649). We register a stand-in module that re-exports the
function from its new home before gfpgan is imported. Only the offline `convert-gfpgan` path
imports this; the worker's hot path never imports torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

SHIM_NAME = "torchvision.transforms.functional_tensor"


def install_functional_tensor_shim() -> bool:
    """Make the removed module importable again; returns True if a shim was registered."""
    if SHIM_NAME in sys.modules:
        return False
    try:
        importlib.import_module(SHIM_NAME)
        return False  # an old torchvision still ships it
    except ModuleNotFoundError:
        pass
    functional = importlib.import_module("torchvision.transforms.functional")
    shim = types.ModuleType(SHIM_NAME)
    shim.__doc__ = "facefleet shim: torchvision>=0.17 moved these to transforms.functional"
    shim.rgb_to_grayscale = functional.rgb_to_grayscale  # type: ignore[attr-defined]
    sys.modules[SHIM_NAME] = shim
    return True


def import_gfpgan_clean() -> Any:
    """The GFPGANv1Clean class (gfpgan.archs), importable on current torchvision."""
    install_functional_tensor_shim()
    module = importlib.import_module("gfpgan.archs.gfpganv1_clean_arch")
    return module.GFPGANv1Clean
