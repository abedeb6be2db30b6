"""The device's inference lanes: first come first served, at most `lanes` holders, and the held
time is the union of the holds (what duty cycle = held / wall time needs)."""

from __future__ import annotations

import threading
import time

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
