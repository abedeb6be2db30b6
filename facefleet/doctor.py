"""`facefleet doctor`: check a broker or cluster for what FaceFleet needs, and say what to fix.

Checks, each printed as ok / warn / FAIL with the fix:
- every address of AMQP_URL answers AMQP, all nodes run the same version;
- what that version supports (per-queue consumer timeout, at-least-once dead-lettering, stream
  filtering, leader locator), and the consumer_timeout line a broker before 3.12 needs;
- the management plugin answers (status and these checks need it); the stream plugin (optional:
  FaceFleet reads the events stream over AMQP 0-9-1);
- resource alarms (memory, disk) and network partitions on any node;
- every queue topology apply declares exists, with the arguments this build declares, with
  enough replicas and all of them online.

Exit 0 when nothing FAILs (warnings allowed), 1 otherwise, 2 on a settings error.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import pika.exceptions

from facefleet.amqp import connect, features
from facefleet.management import ManagementUnavailable, amqp_auth, get_json
from facefleet.settings import ProducerSettings, SettingsError, die
from facefleet.wire import (
    CONTROL_PENDING_ARGUMENTS,
    DEAD_QUEUE,
    DEAD_QUEUE_ARGUMENTS,
    EVENTS_STREAM,
    EVENTS_STREAM_ARGUMENTS,
    BrokerFeatures,
    consumer_timeout_advice,
    control_pending_queue,
    dead_notify_queue,
    job_queue,
    job_queue_arguments,
)

Level = Literal["ok", "warn", "fail"]
DEFAULT_REPLICAS = 3
"""Replicas a quorum queue should have on a cluster when FACEFLEET_QUORUM_GROUP_SIZE is unset
(RabbitMQ 4's default; a majority survives one node's loss)."""


@dataclass(frozen=True)
class Finding:
    level: Level
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        tag = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.level]
        fix = f"\n       fix: {self.fix}" if self.fix else ""
        return f"{tag} {self.check}: {self.message}{fix}"


def declared_queues(settings: ProducerSettings, feats: BrokerFeatures) -> dict[str, dict[str, Any]]:
    """Every queue topology apply declares, with the arguments this build declares for it."""
    place = settings.placement()
    quorum = place.quorum_arguments(feats)
    out: dict[str, dict[str, Any]] = {
        DEAD_QUEUE: {**DEAD_QUEUE_ARGUMENTS, **quorum},
        EVENTS_STREAM: {**EVENTS_STREAM_ARGUMENTS, **place.stream_arguments(feats)},
    }
    for tier in settings.tiers():
        out[job_queue(tier.name)] = job_queue_arguments(tier, feats, place)
        out[dead_notify_queue(tier.name)] = {**DEAD_QUEUE_ARGUMENTS, **quorum}
        out[control_pending_queue(tier.name)] = {**CONTROL_PENDING_ARGUMENTS, **quorum}
    return out


def argument_differences(declared: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    """`key: broker has X, this build declares Y` for each argument that differs."""
    out = []
    for key in sorted(set(declared) | set(actual)):
        want, have = declared.get(key), actual.get(key)
        if want != have and str(want) != str(have):
            out.append(f"{key}: broker has {have!r}, this build declares {want!r}")
    return out


def check(settings: ProducerSettings) -> list[Finding]:
    found: list[Finding] = []
    feats_by_url: dict[str, BrokerFeatures] = {}
    for url in settings.amqp_urls:
        shown = url.split("@")[-1]
        try:
            conn = connect([url], "facefleet-doctor")
        except pika.exceptions.AMQPError as exc:
            found.append(
                Finding(
                    "fail",
                    "amqp",
                    f"{shown} does not answer ({exc!r})",
                    "start that node or remove it from AMQP_URL",
                )
            )
            continue
        feats_by_url[shown] = features(conn)
        conn.close()
        found.append(Finding("ok", "amqp", f"{shown} answers"))
    if not feats_by_url:
        return found
    versions = {".".join(map(str, f.version)) for f in feats_by_url.values()}
    feats = min(feats_by_url.values(), key=lambda f: f.version)
    version = ".".join(map(str, feats.version))
    if len(versions) > 1:
        found.append(
            Finding(
                "warn",
                "version",
                f"nodes run different versions ({', '.join(sorted(versions))}); features "
                f"are those of the oldest, {version}",
                "finish the rolling upgrade",
            )
        )
    found.append(Finding("ok", "version", f"{feats.product} {version}"))
    found.append(_features(feats, settings))
    found += _management(settings, feats)
    return found


def _features(feats: BrokerFeatures, settings: ProducerSettings) -> Finding:
    have = {
        "per-queue consumer timeout (3.12)": feats.queue_consumer_timeout,
        "at-least-once dead-lettering (3.10)": feats.at_least_once_dead_lettering,
        "stream filtering (3.13)": feats.stream_filtering,
        "leader locator (3.10)": feats.leader_locator,
    }
    listed = ", ".join(f"{name}: {'yes' if ok else 'no'}" for name, ok in have.items())
    if not feats.at_least_once_dead_lettering:
        return Finding(
            "fail", "features", listed, "upgrade RabbitMQ to 3.10 or later (3.13+ recommended)"
        )
    if not feats.queue_consumer_timeout:
        return Finding(
            "warn",
            "consumer_timeout",
            f"{listed}. {consumer_timeout_advice(settings.tiers(), feats)}",
            "set consumer_timeout in rabbitmq.conf as above (this check cannot read it)",
        )
    return Finding("ok", "features", listed)


def _management(settings: ProducerSettings, feats: BrokerFeatures) -> list[Finding]:
    api = settings.management_url or ""
    vhost, auth = amqp_auth(settings.amqp_urls[0])
    found: list[Finding] = []
    try:
        overview = get_json(api, "/api/overview", auth)
        nodes = get_json(api, "/api/nodes", auth)
        rows = get_json(api, f"/api/queues/{quote(vhost, safe='')}", auth)
    except ManagementUnavailable as exc:
        return [
            Finding(
                "fail",
                "management",
                str(exc),
                "enable rabbitmq_management (status, unacked counts and these checks need it)",
            )
        ]
    found.append(Finding("ok", "management", f"API at {api} answers"))
    protocols = {str(lis.get("protocol")) for lis in overview.get("listeners", [])}
    if any(p.startswith("stream") for p in protocols):
        found.append(Finding("ok", "stream plugin", "enabled"))
    else:
        found.append(
            Finding(
                "ok",
                "stream plugin",
                "not enabled; not needed: FaceFleet reads the events stream over AMQP 0-9-1",
            )
        )
    running = [n for n in nodes if n.get("running")]
    found.append(
        Finding(
            "ok" if len(running) == len(nodes) else "fail",
            "nodes",
            f"{len(running)} of {len(nodes)} running: {', '.join(n['name'] for n in running)}",
            "" if len(running) == len(nodes) else "start the stopped nodes",
        )
    )
    for node in nodes:
        for key, what, fix in (
            (
                "mem_alarm",
                "memory alarm",
                "free memory (drain queues, more RAM) or raise vm_memory_high_watermark",
            ),
            (
                "disk_free_alarm",
                "disk alarm",
                "free disk space or lower disk_free_limit",
            ),
        ):
            if node.get(key):
                found.append(
                    Finding(
                        "fail",
                        "alarms",
                        f"{what} on {node['name']}: every publisher of the cluster is blocked",
                        fix,
                    )
                )
        if node.get("partitions"):
            found.append(
                Finding(
                    "fail",
                    "partitions",
                    f"{node['name']} sees a partition from {node['partitions']}",
                    "see rabbitmq.com/docs/partitions",
                )
            )
    if not any(f.check == "alarms" for f in found):
        found.append(Finding("ok", "alarms", "no memory or disk alarm"))
    by_name = {r["name"]: r for r in rows if isinstance(r, dict) and "name" in r}
    cluster_size = max(len(nodes), 1)
    place = settings.placement()
    want_replicas = min(place.group_size or DEFAULT_REPLICAS, cluster_size)
    for name, declared in declared_queues(settings, feats).items():
        row = by_name.get(name)
        if row is None:
            found.append(
                Finding("fail", f"queue {name}", "missing", "run `facefleet topology apply`")
            )
            continue
        diffs = argument_differences(declared, row.get("arguments") or {})
        if diffs:
            found.append(
                Finding(
                    "fail",
                    f"queue {name}",
                    "arguments differ: " + "; ".join(diffs),
                    "apply the change as a policy, or drain the queue, delete it and run "
                    "`facefleet topology apply`",
                )
            )
        members = row.get("members") or []
        online = row.get("online") or []
        if members and len(online) < len(members):
            down = sorted(set(members) - set(online))
            found.append(
                Finding(
                    "fail",
                    f"queue {name}",
                    f"replicas offline on {', '.join(down)} ({len(online)} of {len(members)})",
                    "start those nodes; a quorum queue stops when a majority is offline",
                )
            )
        elif members and len(members) < want_replicas:
            found.append(
                Finding(
                    "warn",
                    f"queue {name}",
                    f"{len(members)} replica(s), fewer than {want_replicas}",
                    f"rabbitmq-queues grow <node> all --queue-pattern '{name}'",
                )
            )
        elif not diffs:
            replicas = f"{len(members)} replicas, leader on {row.get('leader') or row.get('node')}"
            found.append(Finding("ok", f"queue {name}", replicas))
    return found


def register(sub: Any, name: str) -> None:
    p = sub.add_parser(
        name, help="check the broker or cluster for what FaceFleet needs; print what to fix"
    )
    p.add_argument("--quiet", action="store_true", help="print only warnings and failures")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    try:
        settings = ProducerSettings.load()
        settings.tiers()
    except SettingsError as exc:
        die(exc)
        return 2
    findings = check(settings)
    for f in findings:
        if not (args.quiet and f.level == "ok"):
            print(f.line())
    fails = sum(f.level == "fail" for f in findings)
    warns = sum(f.level == "warn" for f in findings)
    print(f"doctor: {fails} problem(s), {warns} warning(s)", file=sys.stderr)
    return 1 if fails else 0
