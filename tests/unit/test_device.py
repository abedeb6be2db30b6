"""The device's inference lanes: first come first served, at most `lanes` holders, and the held
time is the union of the holds (what duty cycle = held / wall time needs)."""

from __future__ import annotations

import itertools
import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from facefleet.consumer.device import Device


def test_holds_are_granted_in_arrival_order() -> None:
    device = Device(1)
    order: list[int] = []
    gate = threading.Event()

    def first() -> None:
        with device.hold():
            gate.wait(5)
            order.append(0)

    threads = [threading.Thread(target=first)]
    threads[0].start()
    while device.calls < 1:
        time.sleep(0.001)
    for n in range(1, 6):

        def later(n: int = n) -> None:
            with device.hold():
                order.append(n)

        t = threading.Thread(target=later)
        t.start()
        threads.append(t)
        while len(device._queue) < n:  # queued in this order before the next one starts
            time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("lanes", "holders", "expected_max"),
    [
        pytest.param(1, 4, 1, id="exclusive"),
        pytest.param(2, 4, 2, id="two-lanes"),
    ],
)
def test_at_most_lanes_holders_at_once(lanes: int, holders: int, expected_max: int) -> None:
    device = Device(lanes)
    now = [0]
    peak = [0]
    lock = threading.Lock()

    def work() -> None:
        with device.hold():
            with lock:
                now[0] += 1
                peak[0] = max(peak[0], now[0])
            time.sleep(0.05)
            with lock:
                now[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(holders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert peak[0] == expected_max
    assert device.calls == holders


def test_held_time_is_the_union_of_overlapping_holds() -> None:
    device = Device(2)
    threads = [threading.Thread(target=device.occupy, args=(0.2,)) for _ in range(2)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    wall = time.monotonic() - t0
    assert 0.19 <= device.held_s <= wall  # two overlapping 0.2 s holds: not 0.4 s
    time.sleep(0.05)
    assert device.held_s <= wall  # idle time does not count


def test_occupy_uses_no_cpu() -> None:
    device = Device(1)
    cpu0 = time.process_time()
    device.occupy(0.2)
    assert time.process_time() - cpu0 < 0.05
    assert device.held_s >= 0.2


def _hold_in_process(lock: str, holds: int, seconds: float, out: str) -> None:
    """A child process's holds of the shared device, each written as 'start end' (monotonic)."""
    device = Device(1, shared_lock=Path(lock))
    with open(out, "w") as f:
        for _ in range(holds):
            with device.hold():
                start = time.monotonic()
                time.sleep(seconds)
                f.write(f"{start} {time.monotonic()}\n")
    print(device.held_s)


def test_a_shared_device_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    """Two processes (as two worker pods on one GPU) each hold the shared device five times;
    no two holds overlap, and each process's held_s is its own share."""
    lock = tmp_path / "device.lock"
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"holds-{n}" for n in range(2)]
    procs = [
        ctx.Process(target=_hold_in_process, args=(str(lock), 5, 0.03, str(out))) for out in outs
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    holds = sorted(
        tuple(map(float, line.split())) for out in outs for line in out.read_text().splitlines()
    )
    assert len(holds) == 10
    for (_, end), (start, _) in itertools.pairwise(holds):
        assert start >= end, holds  # the next hold began after the previous one ended


@pytest.mark.parametrize(
    ("shared", "expect_overlap"),
    [
        pytest.param(True, False, id="two-devices-on-one-lock-file-never-overlap"),
        pytest.param(False, True, id="two-own-devices-overlap"),
    ],
)
def test_two_devices_on_one_lock_file(tmp_path: Path, shared: bool, expect_overlap: bool) -> None:
    """flock(2) excludes per open file, so two Device objects in one process behave as two
    processes would (and the test can fail: without the lock they overlap)."""
    lock = tmp_path / "device.lock" if shared else None
    devices = [Device(1, shared_lock=lock), Device(1, shared_lock=lock)]
    spans: list[tuple[float, float]] = []

    def work(device: Device) -> None:
        with device.hold():
            start = time.monotonic()
            time.sleep(0.1)
            spans.append((start, time.monotonic()))

    threads = [threading.Thread(target=work, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    (_, end), (start, _) = sorted(spans)
    assert (start < end) == expect_overlap
    assert all(d.held_s >= 0.1 for d in devices)


def test_a_shared_device_has_one_lane(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one lane"):
        Device(2, shared_lock=tmp_path / "device.lock")
