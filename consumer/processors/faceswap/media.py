"""Media in and out: sniffing, limits, bomb-safe image decoding, PyAV video reading and writing.

Every way an input can be bad ends here as a PermanentJobError with a specific code, before the
expensive part of a job starts:

- size 0 or unreadable header -> corrupt_media; over media_max_bytes -> too_large;
- a format we do not sniff or do not allow -> unsupported_media (sniffed from the first bytes by
  facefleet.sniff, the gateway's sniffer too; the file name is never trusted); HEIC/AVIF photos
  without a decoder on this worker -> unsupported_media naming the format;
- width*height over media_max_pixels -> too_large, decided from the header alone (PNG IHDR, JPEG
  SOFn, WebP VP8/VP8L/VP8X, BMP info header; the video codec parameters for a container), so a
  decompression bomb never gets its pixels allocated;
- truncated data (no JPEG EOI after the scan, a PNG without IEND, a decoder refusal) -> corrupt_media.

Pictures come out the way they are shown: a photo's EXIF orientation (all eight) is applied after
decoding, and so is a video's display matrix rotation (what phones write instead of turning the
pixels). OpenCV would apply EXIF itself, but then the decoded size no longer matches the header
(a phone's portrait JPEG failed as corrupt_media), so it decodes as stored and we turn it here.
HEIC (pillow-heif, the `heif` extra) and AVIF (Pillow >= 11.3) decode through Pillow.

Video goes through PyAV (FFmpeg's maintained binding): the output keeps the input's frame count
and frame rate, and the audio stream is copied (re-encoded to AAC only when MP4 cannot hold it).
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Generator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, cast

import cv2
import numpy as np

from facefleet.consumer.errors import PermanentJobError
from facefleet.settings import WorkerSettings
from facefleet.sniff import HEAD_BYTES, MediaKind, sniff
from facefleet.wire import ErrorCode

Role = Literal["source", "target"]
Frame = np.ndarray  # HxWx3 uint8 BGR

IMAGE_FORMATS_WITH_HEADER_PARSER: tuple[str, ...] = ("jpeg", "png", "webp", "bmp")
PILLOW_FORMATS: dict[str, str] = {
    "heic": "HEIF",
    "heif": "HEIF",
    "avif": "AVIF",
}
"""Image formats decoded through Pillow (format -> Pillow plugin), sized from their container."""
_DECODER_HINT = {
    "heic": "pillow-heif (pip install 'facefleet[heif]')",
    "heif": "pillow-heif (pip install 'facefleet[heif]')",
    "avif": "Pillow >= 11.3 built with libavif",
}


@dataclass(frozen=True)
class MediaLimits:
    """The media limits of one worker, taken from WorkerSettings."""

    max_bytes: int = 2_000_000_000
    max_pixels: int = 40_000_000
    max_frames: int = 18_000
    max_duration_s: float = 600.0
    image_formats: frozenset[str] = frozenset({"jpeg", "png", "webp", "bmp", "heic", "avif"})
    video_formats: frozenset[str] = frozenset({"mp4", "mov", "webm", "matroska", "avi"})

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> MediaLimits:
        def names(text: str) -> frozenset[str]:
            return frozenset(x.strip().lower() for x in text.split(",") if x.strip())

        return cls(
            max_bytes=settings.media_max_bytes,
            max_pixels=settings.media_max_pixels,
            max_frames=settings.media_max_frames,
            max_duration_s=settings.media_max_duration_s,
            image_formats=names(settings.media_image_formats),
            video_formats=names(settings.media_video_formats),
        )


@dataclass(frozen=True)
class MediaInfo:
    """What a probe learnt without decoding pixels (a video's first frame aside).

    width and height are the picture as shown, after orientation (an EXIF orientation of 5-8 or
    a video rotated by 90 degrees swaps them); stored_size is as coded, what a decoder returns.
    """

    kind: MediaKind
    format: str
    width: int
    height: int
    frames: int = 1
    fps: Fraction = Fraction(0)
    duration_s: float = 0.0
    has_audio: bool = False
    orientation: int = 1
    """EXIF orientation of an image (1-8; 1 = as stored)."""
    rotation: int = 0
    """Counter-clockwise degrees a video's display matrix turns its frames (0/90/180/-90)."""

    @property
    def stored_size(self) -> tuple[int, int]:
        """(width, height) as coded."""
        if self.orientation >= 5 or self.rotation in (90, -90):
            return self.height, self.width
        return self.width, self.height


def _fail(code: ErrorCode, role: Role, message: str) -> PermanentJobError:
    return PermanentJobError(code, f"{role}: {message}")


# --- image headers ----------------------------------------------------------------------------


class _HeaderError(ValueError):
    pass


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _HeaderError("PNG without an IHDR chunk")
    w, h = struct.unpack(">II", data[16:24])
    return w, h


_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _jpeg_scan(data: bytes) -> tuple[int, int, int]:
    """Walk the JPEG segments up to the first scan; return (width, height, offset of SOS)."""
    pos = 2
    size: tuple[int, int] | None = None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise _HeaderError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            raise _HeaderError("JPEG segment with a bad length")
        if marker in _SOF_MARKERS:
            if pos + 9 > len(data):
                raise _HeaderError("JPEG frame header cut short")
            h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
            size = (w, h)
        if marker == 0xDA:
            if size is None:
                raise _HeaderError("JPEG scan before any frame header")
            return size[0], size[1], pos
        pos += 2 + length
    raise _HeaderError("JPEG header cut short (no scan)")


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        b = data[21:25]
        w = 1 + (((b[1] & 0x3F) << 8) | b[0])
        h = 1 + (((b[3] & 0x0F) << 10) | (b[2] << 2) | ((b[1] & 0xC0) >> 6))
        return w, h
    if chunk == b"VP8X" and len(data) >= 30:
        w = 1 + int.from_bytes(data[24:27], "little")
        h = 1 + int.from_bytes(data[27:30], "little")
        return w, h
    raise _HeaderError("WebP without a VP8/VP8L/VP8X header")


def _bmp_size(data: bytes) -> tuple[int, int]:
    (header_size,) = struct.unpack("<I", data[14:18])
    if header_size == 12:
        w, h = struct.unpack("<HH", data[18:22])
        return w, h
    w, h = struct.unpack("<ii", data[18:26])
    return abs(w), abs(h)


def image_size(data: bytes, fmt: str) -> tuple[int, int]:
    """(width, height) from the header only; raises _HeaderError when it cannot be read."""
    try:
        if fmt == "png":
            return _png_size(data)
        if fmt == "jpeg":
            w, h, _ = _jpeg_scan(data)
            return w, h
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "bmp":
            return _bmp_size(data)
    except struct.error as exc:
        raise _HeaderError(f"{fmt} header cut short") from exc
    raise _HeaderError(f"no header parser for {fmt}")


def _check_complete(data: bytes, fmt: str) -> None:
    """Refuse truncated files that decoders would otherwise pad with grey and accept."""
    if fmt == "jpeg":
        _, _, sos = _jpeg_scan(data)
        if data.rfind(b"\xff\xd9") < sos:
            raise _HeaderError("JPEG data ends before its end-of-image marker (truncated)")
    elif fmt == "png" and data.rfind(b"IEND") < 0:
        raise _HeaderError("PNG without an IEND chunk (truncated)")


# --- probe ------------------------------------------------------------------------------------


def probe(path: Path, limits: MediaLimits, role: Role) -> MediaInfo:
    """Check size, format and dimensions of one input without decoding its pixels."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(HEAD_BYTES)
    except FileNotFoundError as exc:
        raise _fail("media_not_found", role, f"{path.name} does not exist") from exc
    if size == 0:
        raise _fail("corrupt_media", role, "file is empty (0 bytes)")
    if size > limits.max_bytes:
        raise _fail("too_large", role, f"{size} bytes is over the limit of {limits.max_bytes}")
    sniffed = sniff(head)
    if sniffed is None:
        raise _fail("unsupported_media", role, "not an image or video format we recognise")
    kind, fmt = sniffed.kind, sniffed.format
    if kind == "image":
        return _probe_image(path, fmt, limits, role)
    if role == "source":
        raise _fail("unsupported_media", role, "the source must be an image, not a video")
    if fmt not in limits.video_formats:
        raise _fail(
            "unsupported_media",
            role,
            f"{fmt} video is not accepted ({sorted(limits.video_formats)})",
        )
    return _probe_video(path, fmt, limits, role)


def _probe_image(path: Path, fmt: str, limits: MediaLimits, role: Role) -> MediaInfo:
    known = set(IMAGE_FORMATS_WITH_HEADER_PARSER) | set(PILLOW_FORMATS)
    if fmt not in limits.image_formats or fmt not in known:
        allowed = sorted(limits.image_formats & known)
        raise _fail("unsupported_media", role, f"{fmt} images are not accepted ({allowed})")
    if fmt in PILLOW_FORMATS:
        w, h, orientation = _pillow_header(path, fmt, role)
        _check_pixels(w, h, limits, role)
        return _oriented(MediaInfo("image", fmt, w, h), orientation)
    # Headers live in the first few KB, except JPEGs with large EXIF/ICC segments.
    with path.open("rb") as fh:
        data = fh.read(1 << 20)
    try:
        w, h = image_size(data, fmt)
    except _HeaderError as exc:
        raise _fail("corrupt_media", role, str(exc)) from exc
    _check_pixels(w, h, limits, role)
    return _oriented(MediaInfo("image", fmt, w, h), exif_orientation(data))


def _oriented(info: MediaInfo, orientation: int) -> MediaInfo:
    """info as shown: orientations 5-8 turn the picture a quarter, swapping its sides."""
    if orientation >= 5:
        return replace(info, width=info.height, height=info.width, orientation=orientation)
    return replace(info, orientation=orientation)


def _pillow_decoder(fmt: str, role: Role) -> None:
    """Make sure Pillow can decode fmt here, or refuse it as unsupported_media naming it."""
    from PIL import features

    if fmt == "avif":
        ok = bool(features.check("avif"))
    else:
        try:
            import pillow_heif
        except ImportError:
            ok = False
        else:
            pillow_heif.register_heif_opener()
            ok = True
    if not ok:
        raise _fail(
            "unsupported_media",
            role,
            f"{fmt} images need a decoder this worker does not have: {_DECODER_HINT[fmt]}",
        )


def _pillow_open(data: bytes | Path, role: Role) -> Any:
    """Pillow's lazy open (headers only), with its own bomb limit left to _check_pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Image.DecompressionBombError as exc:
        raise _fail("too_large", role, str(exc)) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise _fail("corrupt_media", role, f"cannot read the image header: {exc}") from exc


def _pillow_header(path: Path, fmt: str, role: Role) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of a HEIC/AVIF photo from its container."""
    _pillow_decoder(fmt, role)
    with _pillow_open(path, role) as img:
        if img.format != PILLOW_FORMATS[fmt]:
            raise _fail("corrupt_media", role, f"not a readable {fmt} file")
        w, h = img.size
        return int(w), int(h), _orientation_of(img)


def _orientation_of(img: Any) -> int:
    from PIL import ExifTags

    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError, struct.error):
        return 1  # unreadable EXIF is metadata lost, not a broken picture
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of an encoded image, 1 when it has none or it is unreadable.

    Pillow finds EXIF in a JPEG's APP1, a PNG's eXIf and a WebP's EXIF chunk alike, from the
    headers (no pixels decoded)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return _orientation_of(img)
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError):
        return 1


def apply_orientation(img: Frame, orientation: int) -> Frame:
    """Turn a decoded picture (rows, columns, ...) the way EXIF orientation 1-8 says it is
    shown (TIFF 6.0 / EXIF 2.3 tag 0x0112)."""
    turned = {
        1: img,
        2: img[:, ::-1],
        3: img[::-1, ::-1],
        4: img[::-1],
        5: img.swapaxes(0, 1),
        6: np.rot90(img, -1),
        7: img.swapaxes(0, 1)[::-1, ::-1],
        8: np.rot90(img, 1),
    }[orientation]
    return np.ascontiguousarray(turned)


def _check_pixels(w: int, h: int, limits: MediaLimits, role: Role) -> None:
    if w <= 0 or h <= 0:
        raise _fail("corrupt_media", role, f"header declares a {w}x{h} picture")
    if w * h > limits.max_pixels:
        raise _fail(
            "too_large",
            role,
            f"{w}x{h} = {w * h} pixels is over the limit of {limits.max_pixels} "
            "(refused from the header, before decoding)",
        )


def _probe_video(path: Path, fmt: str, limits: MediaLimits, role: Role) -> MediaInfo:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise _fail("unsupported_media", role, "container has no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            w, h = int(ctx.width or 0), int(ctx.height or 0)
            _check_pixels(w, h, limits, role)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = Fraction(rate) if rate else Fraction(0)
            if fps <= 0:
                raise _fail("corrupt_media", role, "video stream has no frame rate")
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = 0.0
            frames = int(stream.frames or 0) or round(duration * fps)
            has_audio = bool(container.streams.audio)
            rotation = next((_rotation(f) for f in container.decode(stream)), 0)
    except PermanentJobError:
        raise
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise _fail("corrupt_media", role, f"cannot read the {fmt} container: {exc}") from exc
    if duration > limits.max_duration_s:
        raise _fail(
            "too_large", role, f"{duration:.1f} s is over the limit of {limits.max_duration_s} s"
        )
    if frames > limits.max_frames:
        raise _fail("too_large", role, f"{frames} frames is over the limit of {limits.max_frames}")
    if rotation in (90, -90):
        w, h = h, w
    return MediaInfo("video", fmt, w, h, frames, fps, duration, has_audio, rotation=rotation)


def _rotation(frame: Any) -> int:
    """A decoded frame's display rotation, counter-clockwise degrees snapped to 0/90/180/-90
    (PyAV reads it from the frame's DISPLAYMATRIX side data; 0 when there is none). Mirroring
    in a display matrix is not honoured (phones do not write it)."""
    degrees = float(frame.rotation or 0)
    quarter = round(degrees / 90) % 4
    return (0, 90, 180, -90)[quarter]


# --- images -----------------------------------------------------------------------------------


def read_image(path: Path, info: MediaInfo, role: Role) -> Frame:
    """Decode a probed image to BGR uint8 as shown (orientation applied; alpha dropped, 16-bit
    reduced to 8)."""
    data = path.read_bytes()
    img: Frame | None
    if info.format in PILLOW_FORMATS:
        img = _pillow_decode(data, info, role)
    else:
        try:
            _check_complete(data, info.format)
        except _HeaderError as exc:
            raise _fail("corrupt_media", role, str(exc)) from exc
        flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if img is None:
            raise _fail("corrupt_media", role, f"the {info.format} decoder refused the data")
    w, h = info.stored_size
    if img.shape[:2] != (h, w):
        raise _fail("corrupt_media", role, "decoded size differs from the header")
    return apply_orientation(img, info.orientation)


def _pillow_decode(data: bytes, info: MediaInfo, role: Role) -> Frame:
    """HEIC/AVIF pixels as stored (BGR); orientation is left to apply_orientation."""
    _pillow_decoder(info.format, role)
    with _pillow_open(data, role) as img:
        try:
            rgb = np.asarray(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise _fail("corrupt_media", role, f"the {info.format} decoder refused: {exc}") from exc
    return np.ascontiguousarray(rgb[:, :, ::-1])


def write_image(img: Frame, path: Path, fmt: str, quality: int) -> None:
    """Encode with the job's quality: JPEG/WebP quality, PNG compression (lossless anyway)."""
    ext = {"jpg": ".jpg", "png": ".png", "webp": ".webp"}[fmt]
    params: list[int]
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, buf = cv2.imencode(ext, img, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {fmt}")
    path.write_bytes(buf.tobytes())


# --- video ------------------------------------------------------------------------------------


def read_frames(path: Path, limits: MediaLimits) -> Generator[Frame, None, None]:
    """Decode every video frame to BGR, turned upright by its display rotation; enforces
    max_frames again while decoding, since the header's count can lie."""
    import av

    count = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                count += 1
                if count > limits.max_frames:
                    raise _fail(
                        "too_large", "target", f"more than {limits.max_frames} frames decoded"
                    )
                pixels = frame.to_ndarray(format="bgr24")
                rotation = _rotation(frame)
                yield np.ascontiguousarray(np.rot90(pixels, rotation // 90)) if rotation else pixels
    except av.FFmpegError as exc:
        raise _fail(
            "corrupt_media", "target", f"video decode failed at frame {count}: {exc}"
        ) from exc
    if count == 0:
        raise _fail("corrupt_media", "target", "video has no decodable frame")


def crf_for_quality(quality: int) -> int:
    """Map our 1-100 quality to x264's CRF (100 -> 12, 90 -> 16, 1 -> 51)."""
    return min(51, round(12 + (100 - quality) * 0.4))


_MP4_AUDIO_COPY = frozenset({"aac", "mp3", "opus", "ac3", "eac3", "alac", "flac"})


class VideoWriter:
    """H.264 MP4 writer at a fixed frame rate; frame i gets pts i, so count and fps match.

    The bytes are not reproducible: on AVX-512 CPUs libx264's lookahead (MB-tree with adaptive
    quantisation) reads uninitialised memory at some widths (320 px among them, not 256 or 384),
    so equal frames can encode differently depending on what the process allocated and freed
    before. Compare the frames written, or decoded frames with a tolerance, never two files."""

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        fps: Fraction,
        quality: int,
        audio_from: Path | None = None,
    ) -> None:
        import av

        self._path = path
        self._container = cast(Any, av.open(str(path), mode="w", format="mp4"))
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self._stream: Any = self._container.add_stream(codec, rate=fps)
        # 4:2:0 needs even sizes; pad by one replicated pixel rather than drop content.
        self._width, self._height = width, height
        self._stream.width = width + (width % 2)
        self._stream.height = height + (height % 2)
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = Fraction(1) / fps
        if codec == "libx264":
            self._stream.options = {"crf": str(crf_for_quality(quality)), "preset": "veryfast"}
        self._count = 0
        self._audio_in: Any = None
        self._audio_out: Any = None
        self._audio_transcode = False
        if audio_from is not None:
            self._open_audio(audio_from)

    def _open_audio(self, source: Path) -> None:
        import av

        inp = cast(Any, av.open(str(source)))
        if not inp.streams.audio:
            inp.close()
            return
        a_in = inp.streams.audio[0]
        if a_in.codec_context.name in _MP4_AUDIO_COPY:
            self._audio_out = self._container.add_stream_from_template(a_in)
        else:
            self._audio_transcode = True
            self._audio_out = self._container.add_stream("aac", rate=a_in.codec_context.sample_rate)
        self._audio_in = inp

    def write(self, frame: Frame) -> None:
        import av

        if frame.shape[1] != self._stream.width or frame.shape[0] != self._stream.height:
            frame = cv2.copyMakeBorder(
                frame,
                0,
                self._stream.height - frame.shape[0],
                0,
                self._stream.width - frame.shape[1],
                cv2.BORDER_REPLICATE,
            )
        vf = av.VideoFrame.from_ndarray(frame, format="bgr24")
        vf.pts = self._count
        vf.time_base = self._stream.codec_context.time_base
        self._count += 1
        for packet in self._stream.encode(vf):
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder, copy the audio, write the index."""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        if self._audio_in is not None and self._audio_out is not None:
            self._copy_audio()
        self._container.close()

    def abort(self) -> None:
        try:
            self._container.close()
        finally:
            if self._audio_in is not None:
                self._audio_in.close()

    def _copy_audio(self) -> None:
        inp = self._audio_in
        out = self._audio_out
        a_in = inp.streams.audio[0]
        try:
            if not self._audio_transcode:
                for packet in inp.demux(a_in):
                    if packet.dts is None:
                        continue
                    packet.stream = out
                    self._container.mux(packet)
            else:
                for aframe in inp.decode(a_in):
                    aframe.pts = None
                    for packet in out.encode(aframe):
                        self._container.mux(packet)
                for packet in out.encode(None):
                    self._container.mux(packet)
        finally:
            inp.close()
            self._audio_in = None
