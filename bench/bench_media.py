"""Media store throughput: S3MediaStore against boto3 used directly, on one moto_server.

Both sides move the same 200 MB file (random bytes, in a temp dir deleted after) to and from
the same loopback moto_server, in the same run, rounds interleaved:

- ours:   S3MediaStore.put_file (SHA-256 content addressing + HEAD, then a multipart upload)
          and S3MediaStore.download (HEAD + size check, then ranged GETs with If-Match);
- boto3:  client.upload_file + client.download_file with the default TransferConfig.

Prints MB/s for each direction and both together (medians of the rounds), the ratios (goal:
>= 0.9x, reported, not failed), and the process's peak RSS while each side ran. The absolute
numbers are moto's (a Python server sharing this 2-core machine), not an object store's.
Usage: .venv/bin/python bench/bench_media.py [--mb 200] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from facefleet.media import S3MediaStore
from tests.s3server import AMBIENT_AWS, aws_test_env, start_moto

GOAL = 0.9
MB = 1_000_000


def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """Peak RSS back to the current RSS (Linux clear_refs 5), so each side's peak is its own."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


@dataclass
class Side:
    name: str
    up_s: list[float] = field(default_factory=list)
    down_s: list[float] = field(default_factory=list)
    peak_rss_kb: int = 0

    def mb_s(self, size: int, which: str) -> float:
        if which == "up":
            return size / MB / statistics.median(self.up_s)
        if which == "down":
            return size / MB / statistics.median(self.down_s)
        both = [u + d for u, d in zip(self.up_s, self.down_s, strict=True)]
        return 2 * size / MB / statistics.median(both)


def make_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left:
            block = os.urandom(min(1 << 20, left))
            fh.write(block)
            left -= len(block)


def run_round(
    side: Side,
    upload: Callable[[], str],
    download: Callable[[str], None],
    delete: Callable[[str], None],
) -> None:
    _reset_peak()
    t0 = time.perf_counter()
    key = upload()
    t1 = time.perf_counter()
    download(key)
    t2 = time.perf_counter()
    side.peak_rss_kb = max(side.peak_rss_kb, _status_kb("VmHWM"))
    side.up_s.append(t1 - t0)
    side.down_s.append(t2 - t1)
    delete(key)  # the next round uploads again (put_file would find the bytes there)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="file size in MB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    args = parser.parse_args(argv)
    size = args.mb * MB

    server = start_moto()
    for key in AMBIENT_AWS:
        os.environ.pop(key, None)
    os.environ.update(aws_test_env(server.endpoint))
    import boto3

    try:
        with tempfile.TemporaryDirectory(prefix="bench-media-") as tmp:
            src = Path(tmp) / "media.bin"
            dest = Path(tmp) / "media.out"
            make_file(src, size)
            client = boto3.session.Session().client("s3")
            bucket = f"bench-{uuid.uuid4().hex[:12]}"
            client.create_bucket(Bucket=bucket)
            store = S3MediaStore(bucket, "bench")

            def ours_down(uri: str) -> None:
                store.download(uri, dest)

            def ours_delete(uri: str) -> None:
                client.delete_object(Bucket=bucket, Key=uri.removeprefix(f"s3://{bucket}/"))

            def boto_up() -> str:
                key = f"direct/{uuid.uuid4().hex}"
                client.upload_file(str(src), bucket, key)
                return key

            def boto_down(key: str) -> None:
                client.download_file(bucket, key, str(dest))

            def boto_delete(key: str) -> None:
                client.delete_object(Bucket=bucket, Key=key)

            def same_up() -> str:
                key = f"direct/{uuid.uuid4().hex}"
                client.upload_file(str(src), bucket, key, Config=store.transfer_config())
                return key

            def same_down(key: str) -> None:
                client.download_file(bucket, key, str(dest), Config=store.transfer_config())

            ours, boto = Side("S3MediaStore"), Side("boto3 direct")
            same = Side("boto3, our TransferConfig")
            sides = [
                (ours, lambda: store.put_file(src), ours_down, ours_delete),
                (boto, boto_up, boto_down, boto_delete),
                (same, same_up, same_down, boto_delete),
            ]
            # Warm both (imports, connections, endpoint rules) outside the timings.
            for _, *calls in sides:
                run_round(Side("warm"), *calls)  # type: ignore[arg-type]
            for r in range(args.rounds):
                order = sides[r % 3 :] + sides[: r % 3]
                for side, up, down, delete in order:
                    run_round(side, up, down, delete)
                if not args.json:
                    line = "   ".join(
                        f"{x.name} up {size / MB / x.up_s[-1]:6.1f} "
                        f"down {size / MB / x.down_s[-1]:6.1f}"
                        for x in (ours, boto, same)
                    )
                    print(f"round {r + 1} (MB/s): {line}", flush=True)
            assert dest.stat().st_size == size
    finally:
        server.stop()

    result = {
        "size_mb": args.mb,
        "rounds": args.rounds,
        "server": "moto_server (loopback)",
        "goal": GOAL,
    }
    for which in ("up", "down", "both"):
        o, b = ours.mb_s(size, which), boto.mb_s(size, which)
        result[which] = {"ours_mb_s": round(o, 1), "boto3_mb_s": round(b, 1), "ratio": o / b}
        s = same.mb_s(size, which)
        result[which]["boto3_our_config_mb_s"] = round(s, 1)  # type: ignore[index]
        result[which]["ratio_same_config"] = o / s  # type: ignore[index]
    result["peak_rss_mb"] = {
        "ours": round(ours.peak_rss_kb / 1024, 1),
        "boto3": round(boto.peak_rss_kb / 1024, 1),
        "boto3_our_config": round(same.peak_rss_kb / 1024, 1),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"\n{args.mb} MB file, moto_server on loopback, median of {args.rounds} rounds "
        "(ours: put_file with SHA-256 + HEAD, download with HEAD + size check; boto3: "
        "upload_file/download_file, default TransferConfig):"
    )
    labels = {"up": "upload", "down": "download", "both": "up + down"}
    for which, label in labels.items():
        row = result[which]
        assert isinstance(row, dict)
        print(
            f"  {label:10s} ours {row['ours_mb_s']:7.1f} MB/s   boto3 {row['boto3_mb_s']:7.1f} "
            f"MB/s   = {row['ratio']:.2f}x (goal >= {GOAL}x)"
        )
    print(
        "what the wrapper itself costs (boto3 given our TransferConfig, "
        f"{store.transfer_config().multipart_chunksize >> 20} MiB parts/ranges):"
    )
    for which, label in labels.items():
        row = result[which]
        assert isinstance(row, dict)
        print(
            f"  {label:10s} ours {row['ours_mb_s']:7.1f} MB/s   boto3 "
            f"{row['boto3_our_config_mb_s']:7.1f} MB/s   = {row['ratio_same_config']:.2f}x"
        )
    print(
        f"  peak RSS of this process: ours {ours.peak_rss_kb / 1024:.0f} MiB, "
        f"boto3 {boto.peak_rss_kb / 1024:.0f} MiB, boto3 with our config "
        f"{same.peak_rss_kb / 1024:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
