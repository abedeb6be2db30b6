"""bench_gpu_duty's measurement as a test: the same photo stream through a real worker process,
sequential (pipeline depth 1) and pipelined (depth 3). Asserted: every job completed exactly
once (run_once checks each job's events), and the pipelined worker beats the sequential one on
jobs/s and duty cycle. The timing goals (95% / 85% duty) are the bench's, not a test's: this
machine's CPUs are shared."""

from __future__ import annotations

import pytest

from bench.bench_gpu_duty import PIPELINED_DEPTH, run_once

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
