"""Checksums and verified-stamps: how a model file is known good without re-reading a gigabyte.

A stamp is a small JSON sidecar in `<model_dir>/.verified/<file>.json` written right after a
file's SHA-256 was checked. It records the file's size, mtime_ns, ctime_ns and inode; while all
four are unchanged the recorded digest is trusted, so a cache hit costs a stat() instead of a
hash. Anything that rewrites the file (even with a restored mtime) changes ctime or the inode
and forces a re-hash. The stamp lives in a hidden directory so `*.onnx` globs never see it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

STAMP_DIR = ".verified"
CHUNK = 4 * 1024 * 1024

Hasher = Callable[[Path], str]
"""Returns a file's lowercase hex SHA-256; injectable so tests can count calls."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def stamp_path(model_dir: Path, file: str) -> Path:
    return model_dir / STAMP_DIR / f"{file}.json"


@dataclass(frozen=True)
class Stamp:
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    sha256: str

    @classmethod
    def of(cls, st: os.stat_result, sha256: str) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, sha256)

    def matches(self, st: os.stat_result) -> bool:
        """True when the file is, by every cheap measure, the one that was hashed."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )


def read_stamp(model_dir: Path, file: str) -> Stamp | None:
    """The stamp, or None when absent or unreadable (a bad stamp only costs a re-hash)."""
    try:
        raw = json.loads(stamp_path(model_dir, file).read_text())
        return Stamp(
            size=int(raw["size"]),
            mtime_ns=int(raw["mtime_ns"]),
            ctime_ns=int(raw["ctime_ns"]),
            inode=int(raw["inode"]),
            sha256=str(raw["sha256"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_stamp(model_dir: Path, file: str, stamp: Stamp) -> None:
    """Atomically replace the stamp; a crash leaves the old stamp or none, never half of one."""
    path = stamp_path(model_dir, file)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(stamp), sort_keys=True) + "\n")
    os.replace(tmp, path)


def remove_stamp(model_dir: Path, file: str) -> None:
    stamp_path(model_dir, file).unlink(missing_ok=True)


def trusted_digest(model_dir: Path, file: str, st: os.stat_result) -> str | None:
    """The digest recorded for this exact file, or None when it has to be hashed again."""
    stamp = read_stamp(model_dir, file)
    if stamp is None or not stamp.matches(st):
        return None
    return stamp.sha256
