"""Which broker answers a watch retries (producer.watch.stream_member_unready): the 406 a node
gives while its stream member is still starting after a failover passes; anything else is the
caller's to see. One rule for pika's channel close (sync watch) and aiormq's (async SDK)."""

from __future__ import annotations

import aiormq.exceptions
import pika.exceptions
import pytest

from facefleet.producer.watch import stream_member_unready


@pytest.mark.parametrize(
    ("code", "text", "retried"),
    [
        pytest.param(
            406,
            "PRECONDITION_FAILED - queue 'queue 'facefleet.events.log' in vhost '/'' does not "
            "have a replica on the local node",
            True,
            id="member on this node not running yet",
        ),
        pytest.param(
            404, "NOT_FOUND - no queue 'facefleet.events.log' in vhost '/'", False, id="no stream"
        ),
        pytest.param(
            406,
            "PRECONDITION_FAILED - invalid arg 'x-stream-offset' for queue",
            False,
            id="bad offset argument",
        ),
        pytest.param(403, "ACCESS_REFUSED - access to queue refused", False, id="no permission"),
    ],
)
def test_stream_member_unready(code: int, text: str, retried: bool) -> None:
    assert stream_member_unready(pika.exceptions.ChannelClosedByBroker(code, text)) is retried


UNREADY_TEXT = (
    "PRECONDITION_FAILED - queue 'facefleet.events.log' in vhost '/' does not have a running "
    "replica on the local node"
)


@pytest.mark.parametrize(
    ("exc", "retried"),
    [
        pytest.param(
            aiormq.exceptions.ChannelPreconditionFailed(UNREADY_TEXT),
            True,
            id="aio: member on this node not running yet",
        ),
        pytest.param(
            aiormq.exceptions.ChannelPreconditionFailed(
                "PRECONDITION_FAILED - invalid arg 'x-stream-offset' for queue"
            ),
            False,
            id="aio: bad offset argument",
        ),
        pytest.param(
            aiormq.exceptions.ChannelNotFoundEntity(
                "NOT_FOUND - no queue 'facefleet.events.log' in vhost '/'"
            ),
            False,
            id="aio: no stream",
        ),
        pytest.param(
            aiormq.exceptions.ChannelAccessRefused(
                "ACCESS_REFUSED - replica access to queue refused"
            ),
            False,
            id="aio: no permission, even naming a replica",
        ),
        pytest.param(aiormq.exceptions.ChannelPreconditionFailed(), False, id="aio: no text"),
        pytest.param(ConnectionResetError(UNREADY_TEXT), False, id="not a channel close"),
    ],
)
def test_stream_member_unready_aio(exc: BaseException, retried: bool) -> None:
    assert stream_member_unready(exc) is retried
