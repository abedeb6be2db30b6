"""The shared media sniffer (facefleet.sniff): the gateway and the worker both name formats here.

Heads are cut from files real encoders wrote (Pillow, pillow-heif, PyAV) where one installs, and
written by hand for the ftyp brand variants phones and other encoders produce.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from facefleet.sniff import EXTENSIONS, HEAD_BYTES, IMAGE_FORMATS, VIDEO_FORMATS, Sniffed, sniff


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x01\x00meta"


def _pillow(fmt: str, **params: object) -> Callable[[], bytes]:
    def encode() -> bytes:
        if fmt == "HEIF":
            pillow_heif = pytest.importorskip("pillow_heif")
            pillow_heif.register_heif_opener()
        img = Image.fromarray(np.full((16, 24, 3), 128, np.uint8))
        buf = io.BytesIO()
        img.save(buf, fmt, **params)
        return buf.getvalue()

    return encode


def _video(container: str, codec: str) -> Callable[[], bytes]:
    def encode() -> bytes:
        import av

        buf = io.BytesIO()
        with av.open(buf, mode="w", format=container) as out:
            stream = out.add_stream(codec, rate=10)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            for i in range(2):
                frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), "bgr24")
                frame.pts = i
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        return buf.getvalue()

    return encode


def _bytes(data: bytes) -> Callable[[], bytes]:
    return lambda: data


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(_pillow("JPEG"), Sniffed("image", "jpeg"), id="jpeg"),
        pytest.param(_pillow("PNG"), Sniffed("image", "png"), id="png"),
        pytest.param(_pillow("WEBP"), Sniffed("image", "webp"), id="webp"),
        pytest.param(_pillow("BMP"), Sniffed("image", "bmp"), id="bmp"),
        pytest.param(_pillow("GIF"), Sniffed("image", "gif"), id="gif"),
        pytest.param(_pillow("TIFF"), Sniffed("image", "tiff"), id="tiff"),
        pytest.param(_pillow("AVIF"), Sniffed("image", "avif"), id="avif-pillow"),
        pytest.param(_pillow("HEIF"), Sniffed("image", "heic"), id="heic-pillow-heif"),
        pytest.param(_bytes(_ftyp(b"heic", b"mif1", b"heic")), Sniffed("image", "heic"), id="heic"),
        pytest.param(_bytes(_ftyp(b"heix", b"mif1")), Sniffed("image", "heic"), id="heix"),
        pytest.param(_bytes(_ftyp(b"mif1", b"mif1", b"heic")), Sniffed("image", "heic"), id="mif1"),
        pytest.param(_bytes(_ftyp(b"msf1", b"hevc")), Sniffed("image", "heic"), id="msf1-hevc"),
        pytest.param(_bytes(_ftyp(b"mif1", b"miaf")), Sniffed("image", "heif"), id="heif-other"),
        pytest.param(_bytes(_ftyp(b"avif", b"mif1")), Sniffed("image", "avif"), id="avif"),
        pytest.param(_bytes(_ftyp(b"avis", b"msf1")), Sniffed("image", "avif"), id="avis"),
        pytest.param(_bytes(_ftyp(b"mif1", b"avif")), Sniffed("image", "avif"), id="mif1-avif"),
        pytest.param(_video("mp4", "mpeg4"), Sniffed("video", "mp4"), id="mp4-pyav"),
        pytest.param(_video("mov", "mpeg4"), Sniffed("video", "mov"), id="mov-pyav"),
        pytest.param(_video("matroska", "mpeg4"), Sniffed("video", "matroska"), id="mkv-pyav"),
        pytest.param(_video("avi", "mpeg4"), Sniffed("video", "avi"), id="avi-pyav"),
        pytest.param(_video("webm", "libvpx"), Sniffed("video", "webm"), id="webm-pyav"),
        pytest.param(_bytes(_ftyp(b"isom", b"iso2", b"mp41")), Sniffed("video", "mp4"), id="isom"),
        pytest.param(_bytes(_ftyp(b"qt  ")), Sniffed("video", "mov"), id="qt"),
        pytest.param(_bytes(_ftyp(b"3gp5", b"isom")), Sniffed("video", "mp4"), id="3gp"),
        pytest.param(_bytes(b"FLV\x01\x05"), Sniffed("video", "flv"), id="flv"),
        pytest.param(_bytes(b"#!/bin/sh\nrm -rf /"), None, id="script"),
        pytest.param(_bytes(b""), None, id="empty"),
        pytest.param(_bytes(b"\x00\x00\x00\x18ftyp"), None, id="ftyp-cut-short"),
    ],
)
def test_sniff(make: Callable[[], bytes], expected: Sniffed | None) -> None:
    assert sniff(make()[:HEAD_BYTES]) == expected


def test_every_format_has_a_kind_and_an_extension() -> None:
    assert IMAGE_FORMATS.isdisjoint(VIDEO_FORMATS)
    assert set(EXTENSIONS) == IMAGE_FORMATS | VIDEO_FORMATS
