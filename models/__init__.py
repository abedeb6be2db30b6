"""Model weights: the catalogue, the init container's puller, tiny test stand-ins, conversions.

Importing `facefleet.models` loads nothing heavy; onnx is needed only by `facefleet.models.tiny`, torch only by
`facefleet.models.convert_gfpgan`.
"""

if __name__ != "facefleet.models":  # the folder models/ is the package facefleet.models
    raise ImportError(f"import facefleet.models, not {__name__} (see README 'Packaging')")
