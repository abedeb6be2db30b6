"""FaceFleet's shared kernel: the wire contract, settings, storage and the CLI entry point.

Producer and consumer both import from here; nothing here imports either of them (checked by
import-linter, see pyproject.toml).
"""

__version__ = "0.1.0"
