"""Job options of the faceswap processor: allowed values declared once, parsed strictly.

A typo in an option name or an out-of-range value fails the job at once with `invalid_option`
and a message naming the option, instead of silently running with a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from facefleet.consumer.errors import PermanentJobError

FaceSelector = Literal["one", "many", "reference"]
FACE_SELECTORS: tuple[str, ...] = get_args(FaceSelector)
ImageFormat = Literal["jpg", "png", "webp"]
IMAGE_FORMATS: tuple[str, ...] = get_args(ImageFormat)
VideoFormat = Literal["mp4"]
VIDEO_FORMATS: tuple[str, ...] = get_args(VideoFormat)
OutputFormat = Literal["jpg", "png", "webp", "mp4"]

OPTION_NAMES: tuple[str, ...] = (
    "face_selector",
    "reference_face_index",
    "reference_frame",
    "reference_distance",
    "enhance",
    "enhance_blend",
    "output_format",
    "quality",
)


@dataclass(frozen=True)
class FaceSwapOptions:
    """Validated options; see the package docstring for what each one means."""

    face_selector: FaceSelector = "one"
    reference_face_index: int = 0
    reference_frame: int = 0
    reference_distance: float = 0.3
    enhance: bool = False
    enhance_blend: int = 80
    output_format: OutputFormat | None = None
    """None: the target's own format for images (jpg if it has none of ours), mp4 for video."""
    quality: int = 90

    def resolved_format(self, is_video: bool, target_format: str) -> OutputFormat:
        """Pick the output format for this target, refusing image formats for video and back."""
        if is_video:
            if self.output_format is None:
                return "mp4"
            if self.output_format not in VIDEO_FORMATS:
                raise PermanentJobError(
                    "invalid_option",
                    f"output_format {self.output_format!r} is for images; the target is a video "
                    f"(use one of {', '.join(VIDEO_FORMATS)})",
                )
            return self.output_format
        if self.output_format is None:
            fmt = {"jpeg": "jpg", "png": "png", "webp": "webp"}.get(target_format, "jpg")
            return fmt  # type: ignore[return-value]
        if self.output_format not in IMAGE_FORMATS:
            raise PermanentJobError(
                "invalid_option",
                f"output_format {self.output_format!r} is for video; the target is an image "
                f"(use one of {', '.join(IMAGE_FORMATS)})",
            )
        return self.output_format


def _bad(name: str, expected: str, value: object) -> PermanentJobError:
    return PermanentJobError("invalid_option", f"option {name}: expected {expected}, got {value!r}")


def _int(opts: Mapping[str, object], name: str, default: int, lo: int, hi: int) -> int:
    value = opts.get(name)
    if value is None:
        return default
    # bool is an int subclass; True as a quality is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _bad(name, f"an integer in [{lo}, {hi}]", value)
    try:
        number = float(value)
    except ValueError:
        raise _bad(name, f"an integer in [{lo}, {hi}]", value) from None
    if not number.is_integer() or not lo <= number <= hi:
        raise _bad(name, f"an integer in [{lo}, {hi}]", value)
    return int(number)


def _float(opts: Mapping[str, object], name: str, default: float, lo: float, hi: float) -> float:
    value = opts.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _bad(name, f"a number in [{lo}, {hi}]", value)
    try:
        number = float(value)
    except ValueError:
        raise _bad(name, f"a number in [{lo}, {hi}]", value) from None
    if not lo <= number <= hi:  # also refuses NaN
        raise _bad(name, f"a number in [{lo}, {hi}]", value)
    return number


def _bool(opts: Mapping[str, object], name: str, default: bool) -> bool:
    value = opts.get(name)
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _bad(name, "a boolean", value)


def _choice(opts: Mapping[str, object], name: str, choices: tuple[str, ...]) -> str | None:
    value = opts.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or value.lower() not in choices:
        raise _bad(name, f"one of {', '.join(choices)}", value)
    return value.lower()


def parse_options(opts: Mapping[str, object]) -> FaceSwapOptions:
    """Validate a job's flat options dict; raise PermanentJobError('invalid_option') on the first
    problem."""
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        hint = ""
        if "reference_uri" in unknown:
            hint = (
                " (a separate reference file is not supported: the reference face is taken from "
                "the target with reference_face_index / reference_frame)"
            )
        raise PermanentJobError(
            "invalid_option",
            f"unknown option(s) {', '.join(unknown)}{hint}; known: {', '.join(OPTION_NAMES)}",
        )
    selector = _choice(opts, "face_selector", FACE_SELECTORS) or "one"
    fmt = _choice(opts, "output_format", (*IMAGE_FORMATS, *VIDEO_FORMATS, "jpeg"))
    if fmt == "jpeg":
        fmt = "jpg"
    return FaceSwapOptions(
        face_selector=selector,  # type: ignore[arg-type]
        reference_face_index=_int(opts, "reference_face_index", 0, 0, 1000),
        reference_frame=_int(opts, "reference_frame", 0, 0, 10_000_000),
        reference_distance=_float(opts, "reference_distance", 0.3, 0.0, 1.0),
        enhance=_bool(opts, "enhance", False),
        enhance_blend=_int(opts, "enhance_blend", 80, 0, 100),
        output_format=fmt,  # type: ignore[arg-type]
        quality=_int(opts, "quality", 90, 1, 100),
    )
