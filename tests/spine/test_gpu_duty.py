"""bench_gpu_duty's measurement as a test: the same photo stream through a real worker process,
sequential (pipeline depth 1), pipelined (bench's depth), and pipelined in two worker processes
sharing the device. Asserted: every job completed exactly once (run_once checks each job's
events), the pipelined worker beats the sequential one on jobs/s and duty cycle, and two
processes sharing the device spend each job's model time on it (that their holds never overlap
is tests/unit/test_device.py's). The timing goals (95% / 85% duty) are the bench's, not a test's: this
machine's CPUs are shared."""

from __future__ import annotations

import pytest

from bench.bench_gpu_duty import PIPELINED_DEPTH, PROCESSES, run_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_pipelined_worker_keeps_the_device_busier_and_completes_each_job_once(
    amqp_url: str,
) -> None:
    sequential = run_once(amqp_url, jobs=30, per_job_ms=30.0, depth=1)
    pipelined = run_once(amqp_url, jobs=30, per_job_ms=30.0, depth=PIPELINED_DEPTH)
    for run in (sequential, pipelined):
        # each job's model time was spent on the device (sleep may oversleep under load)
        assert 30 * 0.030 * 0.95 <= run.held_s <= 30 * 0.030 * 1.5, run
        assert 0 < run.duty <= run.held_duty <= 1.0, run
    assert pipelined.jobs_per_s > sequential.jobs_per_s * 1.2, (sequential, pipelined)
    assert pipelined.duty > sequential.duty, (sequential, pipelined)


def test_worker_processes_share_one_device_and_complete_each_job_once(amqp_url: str) -> None:
    shared = run_once(
        amqp_url, jobs=30, per_job_ms=30.0, depth=PIPELINED_DEPTH, processes=PROCESSES
    )
    assert 30 * 0.030 * 0.95 <= shared.held_s <= 30 * 0.030 * 1.5, shared
    assert 0 < shared.duty <= shared.held_duty <= 1.0, shared
