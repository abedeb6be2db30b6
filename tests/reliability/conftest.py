"""The three-node cluster the reliability tests run against (tests/cluster.py), once per session.

Only these tests raise alarms and kill nodes, and only on this cluster: the machine's shared
broker on 5672 is never touched. Without a local rabbitmq-server the tests are skipped on a
laptop and fail in CI (CI=true), like the other broker tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster import Cluster, ClusterUnavailable, start_cluster


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    try:
        found = start_cluster(3)
    except ClusterUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs a three-node cluster: {exc}")
        pytest.skip(str(exc))
    print(f"\ncluster of 3 nodes up in {found.start_s:.1f} s: {found.amqp_url}")
    try:
        yield found
    finally:
        found.teardown()


@pytest.fixture
def healthy(cluster: Cluster) -> Cluster:
    """The cluster with every node running and no alarm, whatever an earlier test left."""
    for node in cluster.nodes:
        if node.alive():
            cluster.resume(node)
        else:
            cluster.start(node)
    seed = cluster.nodes[0]
    cluster.set_memory_alarm(seed, False)
    cluster.set_disk_alarm(seed, False)
    return cluster
