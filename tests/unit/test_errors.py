"""How a broker nack becomes an error: "tier full" only when the queue really is at its limit."""

from __future__ import annotations

import pytest

from facefleet.producer.errors import PublishNackedError, TierFullError, refused


@pytest.mark.parametrize(
    ("depth", "max_length", "error"),
    [
        pytest.param(10_000, 10_000, TierFullError, id="at-max-length-is-full"),
        pytest.param(10_003, 10_000, TierFullError, id="quorum-overshoot-is-full"),
        pytest.param(9_950, 10_000, TierFullError, id="workers-took-a-few-since-the-nack"),
        pytest.param(3, 10_000, PublishNackedError, id="nearly-empty-is-another-nack"),
        pytest.param(1, 2, PublishNackedError, id="small-tier-below-its-limit"),
        pytest.param(2, 2, TierFullError, id="small-tier-at-its-limit"),
        pytest.param(None, 10_000, PublishNackedError, id="depth-unreadable"),
        pytest.param(10_000, None, PublishNackedError, id="tier-unknown-to-the-settings"),
    ],
)
def test_a_nack_is_tier_full_only_at_the_tiers_max_length(
    depth: int | None, max_length: int | None, error: type[Exception]
) -> None:
    got = refused("standard", "job-1", depth, max_length)
    assert type(got) is error
    if isinstance(got, TierFullError):
        assert got.depth == depth and "retry later" in str(got)
    else:
        assert "broker refused job job-1" in str(got)
