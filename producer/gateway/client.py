"""Follow a job through the gateway's WebSocket, for `facefleet watch` / `submit --wait`.

Same contract as `facefleet.producer.watch.watch_events`: yields JobEvents in seq order, once each, stops
after the terminal event, raises WatchTimeout. The token goes in the first message (not the
URL). A dropped connection (gateway restart, slow-client close, network) is resumed with
after_seq = the last seq received, so the caller never sees a gap or a duplicate. A normal
close (1000) ends the iteration: the gateway sends it after the terminal event, or at once when
after_seq is already at or past it. After a `dead_lettered` the iteration goes on until that
close: the gateway keeps the socket open for a `replayed` (`EndOfWatch`), and ends it when none
follows.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import connect

from facefleet.producer.errors import SubmitError
from facefleet.producer.watch import EndOfWatch, WatchTimeout
from facefleet.settings import GatewayClientSettings, ProducerSettings
from facefleet.wire import DecodeError, JobEvent

FINAL_CLOSE_CODES = {1008: "refused", 4400: "bad request"}


class GatewayError(SubmitError):
    """The gateway refused or could not serve the watch (exit code 4 in the CLI)."""


def job_token(base: str, job_id: str, client: GatewayClientSettings) -> str:
    if client.gateway_token is not None:
        return client.gateway_token.get_secret_value()
    if client.gateway_api_key is None:
        raise GatewayError(
            "following through the gateway needs FACEFLEET_GATEWAY_API_KEY (or a job token in "
            "FACEFLEET_GATEWAY_TOKEN)"
        )
    try:
        resp = httpx.post(
            f"{base}/v1/jobs/{job_id}/token",
            headers={"Authorization": f"Bearer {client.gateway_api_key.get_secret_value()}"},
            timeout=10,
        )
    except httpx.HTTPError as exc:
        raise GatewayError(f"gateway {base} unreachable: {exc!r}") from exc
    if resp.status_code != 200:
        raise GatewayError(
            f"gateway refused a token for job {job_id}: {resp.status_code} {resp.text}"
        )
    token: str = resp.json()["token"]
    return token


def events_url(base: str, job_id: str) -> str:
    scheme, sep, rest = base.partition("://")
    ws_scheme = {"http": "ws", "https": "wss"}.get(scheme, scheme)
    return f"{ws_scheme}{sep}{rest}/v1/jobs/{job_id}/events"


def watch_via_gateway(
    settings: ProducerSettings,
    job_id: str,
    *,
    after_seq: int = 0,
    timeout_s: float | None = None,
    client: GatewayClientSettings | None = None,
) -> Iterator[JobEvent]:
    """Yield the job's events with seq > after_seq from the gateway; stops after the terminal
    event. Raises WatchTimeout, or GatewayError when refused or unreachable."""
    if not settings.gateway_url:
        raise GatewayError("FACEFLEET_GATEWAY_URL is not set")
    client = client or GatewayClientSettings.load()
    base = settings.gateway_url.rstrip("/")
    token = job_token(base, job_id, client)
    url = events_url(base, job_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = after_seq
    failures = 0
    end = EndOfWatch()
    while True:
        try:
            with connect(url, open_timeout=10, close_timeout=5, max_size=1 << 20) as ws:
                ws.send(json.dumps({"token": token, "after_seq": last}))
                while True:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise WatchTimeout(
                            f"no terminal event for job {job_id} within {timeout_s} s"
                        )
                    try:
                        raw = ws.recv(timeout=left)
                    except TimeoutError:
                        continue
                    event = JobEvent.decode(raw if isinstance(raw, bytes) else raw.encode())
                    if event.seq <= last:
                        continue
                    if event.seq != last + 1:
                        break  # never expected; resume from what we have
                    last = event.seq
                    failures = 0
                    yield event
                    if end.saw(event):  # a dead letter: the gateway's close 1000 ends it
                        return
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
            if code == 1000:
                return  # the job ended at or before `last`: there is nothing more to yield
            if code in FINAL_CLOSE_CODES:
                raise GatewayError(
                    f"gateway {FINAL_CLOSE_CODES[code]} the watch: {reason}"
                ) from exc
            failures += 1
            if failures > client.gateway_reconnects:
                raise GatewayError(f"gateway closed the watch ({code} {reason})") from exc
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            failures += 1
            if failures > client.gateway_reconnects:
                raise GatewayError(f"gateway {base} unreachable: {exc!r}") from exc
        except DecodeError as exc:
            raise GatewayError(f"gateway sent something that is not an event: {exc}") from exc
        time.sleep(min(0.2 * 2**failures, 5.0))
