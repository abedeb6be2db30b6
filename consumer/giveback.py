"""Giving a job back on purpose: SIGTERM drain, shutdown, a claim still busy, a retry that would
outlast the consumer timeout, the job store gone away.

The worker publishes a fresh confirmed copy of the delivery to the jobs exchange (same body and
properties, without the broker's headers) and acks the original only after the confirm; if the
copy is not confirmed, the original is nack-requeued instead. Why not simply nack-requeue: up to
RabbitMQ 4.2 every requeue counts towards x-delivery-limit (anchors.md B7), so requeueing on
purpose would spend the limit that exists to stop crash loops. Only crashes spend it.
"""

from __future__ import annotations

import logging

import pika

from facefleet.amqp import ThreadedPublisher
from facefleet.consumer.delivery import Action, Delivery
from facefleet.consumer.metrics import WorkerMetrics
from facefleet.wire import CONTENT_TYPE, JOBS_EXCHANGE

log = logging.getLogger(__name__)

BROKER_HEADERS = ("x-delivery-count", "x-death", "x-first-death-", "x-last-death-")
"""Headers (or prefixes) the broker sets on a delivery; a given-back copy starts without them."""


def fresh_properties(props: pika.BasicProperties) -> pika.BasicProperties:
    """The properties of a given-back copy: the job's own, without the broker's headers."""
    headers = {
        k: v
        for k, v in (props.headers or {}).items()
        if not any(k == h or (h.endswith("-") and k.startswith(h)) for h in BROKER_HEADERS)
    }
    return pika.BasicProperties(
        content_type=props.content_type or CONTENT_TYPE,
        delivery_mode=props.delivery_mode or pika.DeliveryMode.Persistent,
        message_id=props.message_id,
        timestamp=props.timestamp,
        headers=headers,
    )


def give_back(
    publisher: ThreadedPublisher, tier: str, delivery: Delivery, metrics: WorkerMetrics
) -> Action:
    """Return a job on purpose without spending its delivery limit: publish a fresh copy (same
    body and properties) to the tier with confirm; then the original is to be acked ('ack'). If
    the copy is not confirmed: 'requeue' (nack-requeue the original; that one counts towards
    the limit). Runs on a job thread: it waits for the confirm."""
    try:
        publisher.publish(JOBS_EXCHANGE, tier, delivery.body, fresh_properties(delivery.properties))
    except Exception as exc:
        log.warning(
            "could not republish a given-back job (%s: %s); requeueing the delivery instead",
            type(exc).__name__,
            exc,
        )
        return "requeue"
    metrics.jobs.labels(tier, "given_back").inc()
    return "ack"
