"""Model weights: the catalogue, the init container's puller, tiny test stand-ins, conversions.

Importing `models` loads nothing heavy; onnx is needed only by `models.tiny`, torch only by
`models.convert_gfpgan`.
"""
