"""What the async watch makes of its stream channel closing under it (producer.aio.channel_loss):
a lost link it reconnects from, a stream member not ready it waits out, or the broker's refusal
the caller sees. The reasons are the ones aiormq hands the channel's close callbacks; the
single-broker test in test_aio.py and tests/reliability see them on real brokers."""

from __future__ import annotations

import asyncio

import aiormq.exceptions
import pytest

from facefleet.amqp import AIO_LINK_ERRORS
from facefleet.producer.aio import channel_loss
from facefleet.producer.watch import stream_member_unready

UNREADY = (
    "PRECONDITION_FAILED - queue 'facefleet.events.log' in vhost '/' does not have a running "
    "replica on the local node"
)


def verdict(exc: BaseException) -> str:
    if stream_member_unready(exc):
        return "wait out"
    if isinstance(exc, AIO_LINK_ERRORS):
        return "reconnect"
    return "raise"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        pytest.param(None, "reconnect", id="no reason given"),
        pytest.param(
            asyncio.CancelledError("[Errno 320] CONNECTION_FORCED - closed by an operator"),
            "reconnect",
            id="connection closed by the broker (arrives as a cancellation)",
        ),
        pytest.param(
            aiormq.exceptions.AMQPConnectionError("Server connection unexpectedly closed"),
            "reconnect",
            id="TCP link cut",
        ),
        pytest.param(ConnectionResetError(104, "reset"), "reconnect", id="connection reset"),
        pytest.param(
            aiormq.exceptions.ChannelPreconditionFailed(UNREADY),
            "wait out",
            id="stream member on this node not running",
        ),
        pytest.param(
            aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no queue 'facefleet.events.log'"),
            "raise",
            id="no stream",
        ),
        pytest.param(
            aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED - invalid arg"),
            "raise",
            id="bad argument",
        ),
    ],
)
def test_channel_loss(reason: BaseException | None, expected: str) -> None:
    loss = channel_loss(reason)
    assert verdict(loss) == expected
    if reason is not None and expected != "reconnect":
        assert loss is reason  # the broker's own error reaches the caller
