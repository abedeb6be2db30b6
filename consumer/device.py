"""The accelerator as a worker's jobs share it: lanes for model calls, and how long it was held.

Why: with several jobs in flight (FACEFLEET_PIPELINE_DEPTH > 1) the CPU steps of one job
(fetch, decode, encode, commit) overlap the model calls of another, but the model calls
themselves must not pile onto the GPU in any order: each GPU slot is one inference lane, taken
first come first served, so job N's calls run while job N+1 decodes and job N-1 commits.

`held_s` is the time at least one lane was held (the union of the holds, not their sum). The
worker exports it as `facefleet_device_held_seconds_total`; duty cycle = held / wall time, the
figure bench_gpu_duty reports. On a real GPU "held" is an upper bound on busy (a lane holder
may still be copying inputs); with the emulated backend (consumer/processors/faceswap/
emulated.py) it is exactly the emulated model time.

Several worker processes can share one device (`shared_lock`, FACEFLEET_EMULATED_DEVICE_LOCK for
the emulated backend): what one process's GIL cannot feed, two can, as two worker pods share a
GPU through the device plugin's time-slicing or MPS. Each hold then also takes an flock(2) on a
common file, so the processes' holds never overlap and their held_s add up to the device's.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class Device:
    """`lanes` model calls at once, granted in arrival order (a ticket queue: Python's locks and
    semaphores promise no order, and a late job overtaking an early one only adds latency)."""

    def __init__(self, lanes: int = 1, *, shared_lock: Path | None = None) -> None:
        if lanes < 1:
            raise ValueError(f"a device has at least one lane, not {lanes}")
        self.lanes = lanes
        self._shared_fd: int | None = None
        if shared_lock is not None:
            if lanes != 1:
                raise ValueError("a device shared across processes has one lane")
            # One device for several processes (worker processes sharing a GPU): a hold also
            # takes an exclusive flock(2) on this file, so holds never overlap across them and
            # each process's held_s is its own share of the device's busy time.
            self._shared_fd = os.open(shared_lock, os.O_RDWR | os.O_CREAT, 0o644)
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()
        self._lanes_taken = 0
        """Lanes granted (a holder may still wait for the other processes' flock)."""
        self._holders = 0
        """Holders holding the device now (held_s counts while this is above 0)."""
        self._since = 0.0
        self._held = 0.0
        self.calls = 0
        """Holds granted so far (model calls)."""

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Take a lane for one model call (waiting in line), let go after it."""
        with self._lane(), self._other_processes_out(), self._timed():
            yield

    @contextlib.contextmanager
    def _lane(self) -> Iterator[None]:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or self._lanes_taken >= self.lanes:
                self._cond.wait()
            self._queue.popleft()
            self._lanes_taken += 1
            self.calls += 1
            self._cond.notify_all()  # the next in line may take another free lane
        try:
            yield
        finally:
            with self._cond:
                self._lanes_taken -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def _other_processes_out(self) -> Iterator[None]:
        """The shared device's flock (outside the condition: only this process's next in line
        waits for it); nothing for a device of this process's own."""
        if self._shared_fd is None:
            yield
            return
        fcntl.flock(self._shared_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._shared_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        """Count the hold into held_s (the union of overlapping holds)."""
        with self._cond:
            if self._holders == 0:
                self._since = time.monotonic()
            self._holders += 1
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                if self._holders == 0:
                    self._held += time.monotonic() - self._since

    def occupy(self, seconds: float) -> None:
        """Hold a lane for `seconds` without using CPU (the emulated backend's model call)."""
        with self.hold():
            if seconds > 0:
                time.sleep(seconds)

    @property
    def held_s(self) -> float:
        """Seconds at least one lane was held so far (a running hold counts up to now)."""
        with self._cond:
            running = time.monotonic() - self._since if self._holders else 0.0
            return self._held + running
