"""`make bench`: every benchmark, each printing FaceFleet beside its same-run baseline.

Bounded in count and time, loopback only. Absolute numbers on a 2-core machine move about
±30% between runs; read the ratios.
"""

from __future__ import annotations

import subprocess
import sys

BENCHES: tuple[tuple[str, list[str]], ...] = (
    ("spine vs Celery", ["-m", "bench.bench_spine", "--jobs", "2000", "--rounds", "3"]),
    (
        "spine, job state in PostgreSQL, vs Celery",
        ["-m", "bench.bench_spine", "--jobs", "2000", "--rounds", "3", "--store", "postgres"],
    ),
    ("video pipeline vs naive loop", ["bench/bench_video.py"]),
    ("gateway: 10,000 WebSockets", ["bench/bench_gateway.py", "--client-procs", "2"]),
    ("media store vs boto3 (moto_server)", ["bench/bench_media.py"]),
    ("GPU duty cycle: pipelined vs sequential (emulated device)", ["-m", "bench.bench_gpu_duty"]),
)


def main() -> int:
    failed = 0
    for title, args in BENCHES:
        print(f"\n=== {title} ===", flush=True)
        failed += subprocess.call([sys.executable, *args]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
