"""bench/floor.py really does the contract's work on the real broker (it backs a README claim)."""

from __future__ import annotations

import pytest

from bench import floor

pytestmark = pytest.mark.integration


def test_floor_runs_every_part_and_counts_its_cpu(amqp_url: str) -> None:
    calls: list[float] = []

    def broker_cpu() -> float:
        calls.append(0.0)
        return 0.0  # a remote broker reads as free: only the clients and files count

    low = floor.measure(amqp_url, 120, broker_cpu)
    assert len(calls) == 2
    assert low.broker_ms == 0.0
    assert low.clients_ms > 0 and low.files_ms > 0
    assert low.total_ms == pytest.approx(low.clients_ms + low.files_ms)
