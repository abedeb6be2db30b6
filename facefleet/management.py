"""The RabbitMQ management API's queue rows: the only source of unacknowledged counts.

AMQP's queue.declare-ok reports ready messages only; `facefleet status` and the gateway's
status page read in-progress (unacked) jobs from here when the plugin is enabled, and show
nothing for them otherwise. One place builds the URL and credentials and parses the answer;
the CLI fetches synchronously, the gateway with its own async HTTP client.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlparse

QUEUE_COLUMNS = "name,messages_ready,messages_unacknowledged,consumers"


def default_management_url(amqp_url: str) -> str:
    """http://<broker host>:15672, the management plugin's default listener."""
    return f"http://{urlparse(amqp_url).hostname or '127.0.0.1'}:15672"


def queues_path(vhost: str) -> str:
    """The management API path of a vhost's queue rows (only the columns we read)."""
    return f"/api/queues/{quote(vhost, safe='')}?columns={QUEUE_COLUMNS}"


def queues_request(amqp_url: str, management_url: str) -> tuple[str, tuple[str, str]]:
    """URL of the vhost's queue rows and the basic-auth pair, both from the AMQP URL."""
    vhost, auth = amqp_auth(amqp_url)
    return f"{management_url.rstrip('/')}{queues_path(vhost)}", auth


def rows_by_name(rows: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(rows, list):
        return {}
    return {row["name"]: row for row in rows if isinstance(row, dict) and "name" in row}


ENABLE_HINT = (
    "enable the management plugin on the broker with `rabbitmq-plugins enable "
    "rabbitmq_management` (it listens on port 15672), or point FACEFLEET_MANAGEMENT_URL at it"
)


class ManagementUnavailable(RuntimeError):
    """The management API did not answer with queue rows; the message says why and how to fix."""


def amqp_auth(amqp_url: str) -> tuple[str, tuple[str, str]]:
    """(vhost, (user, password)) of an AMQP URL: the management API takes the same login."""
    parsed = urlparse(amqp_url)
    vhost = unquote(parsed.path[1:]) or "/"
    return vhost, (unquote(parsed.username or "guest"), unquote(parsed.password or "guest"))


def get_json(management_url: str, path: str, auth: tuple[str, str], timeout_s: float = 5.0) -> Any:
    """GET one management API path; raises ManagementUnavailable saying why."""
    req = urllib.request.Request(f"{management_url.rstrip('/')}{path}")
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise ManagementUnavailable(
            f"the management API at {management_url} answered HTTP {exc.code} {exc.reason} "
            f"for {path} (check the AMQP user's credentials and its management tag)"
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ManagementUnavailable(
            f"the management API at {management_url} is not reachable ({reason}); {ENABLE_HINT}"
        ) from exc


def read_queues(
    amqp_url: str, management_url: str, timeout_s: float = 2.0
) -> dict[str, dict[str, Any]]:
    """Queue rows by name; raises ManagementUnavailable when the API does not answer."""
    vhost, auth = amqp_auth(amqp_url)
    rows = get_json(management_url, queues_path(vhost), auth, timeout_s)
    if not isinstance(rows, list):
        raise ManagementUnavailable(f"the management API at {management_url} sent no queue rows")
    return rows_by_name(rows)
