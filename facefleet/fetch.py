"""Server-side fetches of user-supplied URLs that cannot be turned against our own network.

A job may name an `https://` input, and a webhook names where to POST; both are URLs chosen by
whoever submits work, fetched from inside the cluster. Without a guard that is server-side
request forgery: `http://169.254.169.254/` (cloud credentials), `http://10.0.0.5:15672/`
(the broker's management API), or a public name whose DNS answer is `127.0.0.1`.

How the guard holds:

* Every hop (the first URL and each redirect, which we follow ourselves) is checked before any
  connection: scheme, port, then the host is resolved once and EVERY resolved address must be
  acceptable (a name with one bad address is refused, never "the good one").
* The resolved, validated addresses are pinned for the connection: the httpcore network backend
  (`GuardedBackend.connect_tcp`, the only place a socket is opened) re-validates them and connects
  to the validated IP itself, then checks the peer it actually reached. A second DNS answer (DNS
  rebinding) is never consulted. TLS still verifies the certificate for the URL's hostname and
  sends it as SNI, because httpcore starts TLS with the origin host, not the IP we dialled.
* Addresses are judged as `ipaddress` objects after resolution, so odd literal notations
  (`2130706433`, `0x7f.1`), IPv4-mapped IPv6, NAT64 and 6to4 cannot hide a private target.
* `trust_env=False`: HTTP(S)_PROXY / NO_PROXY cannot route a request around the guard.
* Bodies stream to a temporary file next to the destination, bounded by size and an overall
  deadline; the destination appears only when the whole body arrived.

Error messages name the hop, host and address, never the URL's userinfo or query (presigned
URLs carry their signature there).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import tempfile
import threading
import time
import typing
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import httpcore
import httpx

from facefleet.wire import ErrorCode

__all__ = [
    "DEFAULT_POLICY",
    "AllowRule",
    "FetchError",
    "FetchPolicy",
    "FetchResult",
    "GuardedBackend",
    "GuardedTransport",
    "Reply",
    "classify_address",
    "fetch_to_file",
    "parse_allow",
    "redact",
    "request",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
FetchErrorCode = Literal["fetch_refused", "fetch_failed", "too_large", "media_not_found"]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Headers that must not follow a redirect to another origin (httpx drops them on its own
# redirects; we follow redirects ourselves, so we must too).
_ORIGIN_BOUND = frozenset({"authorization", "cookie", "proxy-authorization"})


class FetchError(Exception):
    """A fetch that did not produce the body; `code` is the job's error code."""

    def __init__(self, code: FetchErrorCode, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.retryable = retryable

    def __repr__(self) -> str:
        return f"FetchError({self.code!r}, {self.message!r}, retryable={self.retryable})"


def _refused(message: str) -> FetchError:
    return FetchError("fetch_refused", message, retryable=False)


# --- address classification ----------------------------------------------------------------


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), why) for net, why in pairs)


# Listed explicitly (most specific first) because `is_global` differs between Python releases
# (3.11.7 calls 224.0.0.0/4, 2002::/16, 64:ff9b::/96 and fec0::/10 global) and so that the
# message can say what the address is. Anything else not globally routable is refused below.
_REFUSED_V4 = _nets(
    ("0.0.0.0/8", "'this network' (0.0.0.0/8)"),
    ("10.0.0.0/8", "private (10.0.0.0/8)"),
    ("100.64.0.0/10", "carrier-grade NAT (100.64.0.0/10)"),
    ("127.0.0.0/8", "loopback (127.0.0.0/8)"),
    ("169.254.169.254/32", "the cloud metadata service (169.254.169.254)"),
    ("169.254.0.0/16", "link-local (169.254.0.0/16)"),
    ("172.16.0.0/12", "private (172.16.0.0/12)"),
    ("192.0.0.0/24", "IETF protocol assignments (192.0.0.0/24)"),
    ("192.0.2.0/24", "documentation (192.0.2.0/24)"),
    ("192.88.99.0/24", "6to4 relay anycast (192.88.99.0/24)"),
    ("192.168.0.0/16", "private (192.168.0.0/16)"),
    ("198.18.0.0/15", "benchmarking (198.18.0.0/15)"),
    ("198.51.100.0/24", "documentation (198.51.100.0/24)"),
    ("203.0.113.0/24", "documentation (203.0.113.0/24)"),
    ("224.0.0.0/4", "multicast (224.0.0.0/4)"),
    ("255.255.255.255/32", "broadcast (255.255.255.255)"),
    ("240.0.0.0/4", "reserved (240.0.0.0/4)"),
)
_REFUSED_V6 = _nets(
    ("::/128", "unspecified (::)"),
    ("::1/128", "loopback (::1)"),
    ("::/96", "IPv4-compatible, deprecated (::/96)"),
    ("64:ff9b::/96", "NAT64 (64:ff9b::/96)"),
    ("64:ff9b:1::/48", "local-use NAT64 (64:ff9b:1::/48)"),
    ("100::/64", "discard-only (100::/64)"),
    ("2001::/32", "Teredo (2001::/32)"),
    ("2001:db8::/32", "documentation (2001:db8::/32)"),
    ("2002::/16", "6to4 (2002::/16)"),
    ("fd00:ec2::254/128", "the cloud metadata service (fd00:ec2::254)"),
    ("fc00::/7", "unique-local (fc00::/7)"),
    ("fe80::/10", "link-local (fe80::/10)"),
    ("fec0::/10", "site-local, deprecated (fec0::/10)"),
    ("ff00::/8", "multicast (ff00::/8)"),
)


def _unmap(ip: IPAddress) -> IPAddress:
    """`::ffff:a.b.c.d` is a.b.c.d on a dual-stack socket: judge (and dial) it as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def classify_address(address: str | IPAddress) -> str | None:
    """Why `address` is no place for a server-side request, or None for a public unicast address.

    IPv4-mapped addresses are judged by their IPv4 address. Anything Python does not consider
    globally routable, and every multicast/reserved/unspecified address, is refused.
    """
    ip = _unmap(ipaddress.ip_address(address) if isinstance(address, str) else address)
    table = _REFUSED_V4 if isinstance(ip, ipaddress.IPv4Address) else _REFUSED_V6
    for net, why in table:
        if ip in net:
            if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded_v4(ip)) is not None:
                inner_why = classify_address(inner)
                return f"{why}, embedding {inner}" + (f" which is {inner_why}" if inner_why else "")
            return why
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_reserved:
        return "reserved"
    if ip.is_private:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def _never(ip: IPAddress) -> str | None:
    """Addresses no allow entry can admit: they are not one host (0.0.0.0 dials ourselves)."""
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if ip == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast"
    return None


# --- allow list -------------------------------------------------------------------------------

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _norm_host(host: str) -> str:
    """Compare names the way DNS does: case-insensitively and without the root dot."""
    return host.lower().rstrip(".")


@dataclass(frozen=True)
class AllowRule:
    """One allow-list entry: a network (any port) or an exact host and port.

    A network admits an address inside it, on any port. `host:port` with a name admits exactly
    that URL host (compared after IDNA, case and root dot aside) on that port, with whatever it
    resolves to: the operator vouches for the name, e.g. `minio.internal:9000`. `host:port` with
    an IP admits that endpoint (address and port), whatever URL spelling or name reaches it.
    """

    network: IPNetwork | None = None
    host: str | None = None
    port: int | None = None

    def admits(self, host: str, port: int, ip: IPAddress) -> bool:
        """Whether this entry lets a request for `host:port`, dialled at `ip`, through."""
        if self.network is not None:
            return ip.version == self.network.version and ip in self.network
        if self.host is None or port != self.port:
            return False
        try:
            literal: IPAddress | None = _unmap(ipaddress.ip_address(self.host))
        except ValueError:
            literal = None
        if literal is not None:
            return ip == literal
        return _norm_host(host) == self.host

    def __str__(self) -> str:
        if self.network is not None:
            return str(self.network)
        return (
            f"[{self.host}]:{self.port}" if ":" in (self.host or "") else f"{self.host}:{self.port}"
        )


def _parse_rule(entry: str) -> AllowRule:
    if "/" in entry:
        try:
            return AllowRule(network=ipaddress.ip_network(entry, strict=True))
        except ValueError as exc:
            raise ValueError(f"allow entry {entry!r} is not a CIDR network: {exc}") from None
    try:  # a bare address is its own /32 or /128
        ip = ipaddress.ip_address(entry)
    except ValueError:
        pass
    else:
        return AllowRule(network=ipaddress.ip_network(_unmap(ip)))
    if entry.startswith("["):
        host, sep, port_text = entry[1:].partition("]:")
        if not sep:
            raise ValueError(f"allow entry {entry!r}: write an IPv6 host:port as [addr]:port")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"allow entry {entry!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = entry.rpartition(":")
        if not sep or not host:
            raise ValueError(
                f"allow entry {entry!r} is neither a CIDR (10.0.0.0/8) nor host:port "
                "(minio.internal:9000)"
            )
        host = _norm_host(host)
        if not all(_LABEL.match(label) for label in host.split(".")):
            raise ValueError(f"allow entry {entry!r}: {host!r} is not a host name or address")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"allow entry {entry!r}: port {port_text!r} is not in 1-65535")
    return AllowRule(host=host, port=int(port_text))


def parse_allow(text: str) -> tuple[AllowRule, ...]:
    """Parse a comma-separated allow list (`127.0.0.1/32, minio.internal:9000, [::1]:8443`).

    Raises ValueError naming the bad entry, so a typo fails at startup rather than refusing (or
    worse, admitting) targets at run time. Empty entries are ignored.
    """
    return tuple(_parse_rule(entry.strip()) for entry in text.split(",") if entry.strip())


@dataclass(frozen=True)
class FetchPolicy:
    """What a fetch may reach and how long and how much it may take.

    `allow` targets may be private and may use plain http; `allow_http` permits plain http to
    public targets too (and https->http redirects, which are otherwise refused as a downgrade).
    `ports`, when set, limits public targets to those ports (allow-listed ones are exempt).
    `ca_file` replaces the public CA bundle, for an internal endpoint with a private CA.
    """

    allow: tuple[AllowRule, ...] = ()
    allow_http: bool = False
    max_bytes: int = 512 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    deadline: float = 300.0
    max_redirects: int = 5
    ports: frozenset[int] | None = None
    ca_file: str | None = None
    user_agent: str = "facefleet-fetch/1"


DEFAULT_POLICY = FetchPolicy()


@dataclass(frozen=True)
class FetchResult:
    """A completed download. `final_url` is redacted (no userinfo, query or fragment)."""

    size: int
    content_type: str | None
    final_url: str


class Reply(NamedTuple):
    """The answer to `request()`: status and (lower-cased, comma-joined) headers."""

    status: int
    headers: dict[str, str]


# --- URLs -------------------------------------------------------------------------------------


def redact(url: httpx.URL | str) -> str:
    """`scheme://host:port/path` with userinfo, query and fragment dropped: safe for messages."""
    if isinstance(url, str):
        raw = url
        try:
            url = httpx.URL(raw)
        except httpx.InvalidURL:
            try:
                parts = urllib.parse.urlsplit(raw)
                return f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
            except ValueError:
                return "<unparseable URL>"
    path = url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
    return f"{url.scheme}://{url.netloc.decode('ascii', 'replace')}{path}"


def _scrub(text: str, raw: str) -> str:
    """Blank the userinfo and query of `raw` out of a library's message about it."""
    try:
        parts = urllib.parse.urlsplit(raw)
    except ValueError:
        return "(details withheld)"
    secrets = [parts.query, parts.fragment]
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        secrets += [userinfo, *userinfo.split(":")]
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _parse_url(raw: str) -> httpx.URL:
    try:
        url = httpx.URL(raw)
    except httpx.InvalidURL as exc:
        raise _refused(f"invalid URL {redact(raw)}: {_scrub(str(exc), raw)}") from None
    if not url.raw_host:
        raise _refused(f"URL {redact(url)} names no host")
    return url


def _port(url: httpx.URL) -> int:
    return url.port if url.port is not None else (443 if url.scheme == "https" else 80)


def _host(url: httpx.URL) -> str:
    """The host exactly as httpcore will hand it to the network backend (IDNA, no brackets)."""
    return url.raw_host.decode("ascii")


# --- resolution and the connect-time guard ----------------------------------------------------


def _literal(host: str) -> IPAddress | None:
    """An IP literal in standard notation (zone id allowed); odd notations go to the resolver."""
    try:
        return ipaddress.ip_address(urllib.parse.unquote(host))
    except ValueError:
        return None


def _resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """All addresses for `host`, deduplicated, within `timeout` (getaddrinfo has none itself)."""
    if (literal := _literal(host)) is not None:
        return [literal]
    box: list[list[IPAddress] | BaseException] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            found: list[IPAddress] = []
            for _family, _type, _proto, _name, sockaddr in infos:
                ip = ipaddress.ip_address(str(sockaddr[0]))
                if ip not in found:
                    found.append(ip)
            box.append(found)
        except BaseException as exc:
            box.append(exc)

    worker = threading.Thread(target=lookup, name=f"fetch-dns-{host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if not box:
        raise FetchError("fetch_failed", f"DNS lookup of {host} timed out after {timeout:g}s", True)
    result = box[0]
    if isinstance(result, socket.gaierror):
        transient = result.errno in (socket.EAI_AGAIN, getattr(socket, "EAI_SYSTEM", None))
        raise FetchError("fetch_failed", f"DNS lookup of {host} failed: {result}", transient)
    if isinstance(result, BaseException):
        raise FetchError("fetch_failed", f"DNS lookup of {host} failed: {result}", True)
    if not result:
        raise FetchError("fetch_failed", f"DNS lookup of {host} returned no address", True)
    return result


def _vet_addresses(
    policy: FetchPolicy, host: str, port: int, addresses: list[IPAddress]
) -> tuple[list[IPAddress], bool]:
    """Validate every address; return them (unmapped, ready to dial) and whether all are
    allow-listed. One refused address refuses the host: DNS answers rotate, so "skip the bad
    one" would still let an attacker's record reach the private address some of the time."""
    literal = _literal(host) is not None
    vetted: list[IPAddress] = []
    all_allowed = True
    for original in addresses:
        ip = _unmap(original)
        where = f"address {original}" if literal else f"{host} resolves to {original}, which"
        if (never := _never(ip)) is not None:
            raise _refused(f"{where} is {never}: not a single host")
        if any(rule.admits(host, port, ip) for rule in policy.allow):
            vetted.append(ip)
            continue
        all_allowed = False
        if (why := classify_address(ip)) is not None:
            raise _refused(f"{where} is {why}; not in the allow list")
        if policy.ports is not None and port not in policy.ports:
            raise _refused(f"port {port} of {host} is not an allowed port for public targets")
        vetted.append(ip)
    return vetted, all_allowed


class GuardedBackend(httpcore.SyncBackend):
    """The only way our HTTP stack opens a socket: to a validated IP, never to a name.

    `pin()` records the addresses the hop check resolved and validated; `connect_tcp` (called by
    httpcore for every new connection, with the URL's host) re-validates the pinned addresses, or
    resolves and validates itself if nothing was pinned, dials a validated IP, and checks the
    peer it reached. httpcore then starts TLS with `server_hostname` = the URL's host, so SNI and
    certificate verification stay on the hostname.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._pins: dict[tuple[str, int], list[IPAddress]] = {}

    def pin(self, host: str, port: int, addresses: list[IPAddress]) -> None:
        """Use these (already validated) addresses for connections to `host:port`."""
        self._pins[(_norm_host(host), port)] = list(addresses)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Validate, then dial the validated IP (connect-time check, defeats DNS rebinding)."""
        addresses = self._pins.get((_norm_host(host), port))
        if addresses is None:
            limit = self._policy.connect_timeout if timeout is None else timeout
            addresses = _resolve(host, port, limit)
        try:
            vetted, _ = _vet_addresses(self._policy, host, port, addresses)
        except FetchError as exc:
            raise _refused(f"connect to {host}:{port} refused: {exc.message}") from None
        options = list(socket_options or ())
        last: Exception | None = None
        for ip in vetted:
            try:
                stream = super().connect_tcp(str(ip), port, timeout, local_address, options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            sock = stream.get_extra_info("socket")
            peer = _unmap(ipaddress.ip_address(sock.getpeername()[0]))
            if peer != ip:  # belt and braces: what we reached is what we validated
                stream.close()
                raise _refused(f"connect to {host}:{port} reached {peer}, not the vetted {ip}")
            return stream
        assert last is not None
        raise last

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        """Unix sockets are local by definition: never."""
        raise _refused(f"unix socket {path} refused")


# --- the httpx transport ----------------------------------------------------------------------

# Most specific first: the first match wins.
_EXC_MAP: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.ProxyError, httpx.ProxyError),
)


@contextmanager
def _httpx_errors() -> Iterator[None]:
    """httpcore's exceptions as httpx's, as httpx's own transport does (FetchError passes)."""
    try:
        yield
    except Exception as exc:
        for source, target in _EXC_MAP:
            if isinstance(exc, source):
                raise target(str(exc)) from exc
        raise


class _Body(httpx.SyncByteStream):
    def __init__(self, stream: typing.Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _httpx_errors():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class GuardedTransport(httpx.BaseTransport):
    """An httpx transport over an httpcore pool whose only network backend is `GuardedBackend`.

    httpx.HTTPTransport cannot take a network backend, so this is its `handle_request` over a
    pool we build. It does no hop checks itself: use it through `fetch_to_file` / `request`, or
    pin validated addresses first (unpinned hosts are still resolved and validated on connect).
    """

    def __init__(self, backend: GuardedBackend, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            network_backend=backend,
            max_connections=4,
            max_keepalive_connections=2,
            http1=True,
            http2=False,
            retries=0,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _httpx_errors():
            response = self._pool.handle_request(core_request)
        assert isinstance(response.stream, typing.Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def _ssl_context(policy: FetchPolicy) -> ssl.SSLContext:
    """Certificate and hostname verification always on; a private CA only if configured."""
    if policy.ca_file is not None:
        return ssl.create_default_context(cafile=policy.ca_file)
    return httpx.create_ssl_context(verify=True, trust_env=False)


class _Session:
    """One fetch: a client whose transport can only reach what this session pinned."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self.deadline = time.monotonic() + policy.deadline
        self.backend = GuardedBackend(policy)
        self.client = httpx.Client(
            transport=GuardedTransport(self.backend, _ssl_context(policy)),
            trust_env=False,  # no proxy from the environment can carry us around the guard
            follow_redirects=False,  # every hop is ours to validate and count
            headers={"User-Agent": policy.user_agent, "Accept-Encoding": "identity"},
        )

    def remaining(self, url: httpx.URL) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchError(
                "fetch_failed",
                f"{redact(url)}: overall deadline of {self.policy.deadline:g}s exceeded",
                retryable=True,
            )
        return left

    def timeout(self, url: httpx.URL) -> httpx.Timeout:
        left = self.remaining(url)
        connect = min(self.policy.connect_timeout, left)
        read = min(self.policy.read_timeout, left)
        return httpx.Timeout(connect=connect, read=read, write=read, pool=connect)

    def vet(self, url: httpx.URL, previous: httpx.URL | None) -> None:
        """The hop check: scheme, downgrade, port, then every resolved address; pins them."""
        where = redact(url)
        if url.scheme not in ("http", "https"):
            raise _refused(f"{where}: scheme {url.scheme!r} refused (only https, or http)")
        downgrade = previous is not None and previous.scheme == "https" and url.scheme == "http"
        if downgrade and not self.policy.allow_http:
            assert previous is not None
            raise _refused(
                f"redirect from {redact(previous)} to {where} refused: https->http downgrade"
            )
        host, port = _host(url), _port(url)
        if not 1 <= port <= 65535:
            raise _refused(f"{where}: port {port} refused")
        addresses = _resolve(host, port, min(self.policy.connect_timeout, self.remaining(url)))
        try:
            vetted, all_allowed = _vet_addresses(self.policy, host, port, addresses)
        except FetchError as exc:
            hop = "redirect target " if previous is not None else ""
            raise _refused(f"{hop}{where} refused: {exc.message}") from None
        if url.scheme == "http" and not (all_allowed or self.policy.allow_http):
            raise _refused(f"{where} refused: plain http only to allow-listed targets (use https)")
        self.backend.pin(host, port, vetted)

    def send(
        self, method: str, url: httpx.URL, headers: Mapping[str, str], content: bytes | None
    ) -> httpx.Response:
        built = self.client.build_request(
            method, url, headers=headers, content=content, timeout=self.timeout(url)
        )
        try:
            return self.client.send(built, stream=True)
        except httpx.HTTPError as exc:
            raise _transport_error(url, exc) from None

    def close(self) -> None:
        self.client.close()


def _transport_error(url: httpx.URL, exc: httpx.HTTPError) -> FetchError:
    where = redact(url)
    if isinstance(exc, httpx.TimeoutException):
        phase = {
            httpx.ConnectTimeout: "connect",
            httpx.ReadTimeout: "read",
            httpx.WriteTimeout: "write",
            httpx.PoolTimeout: "pool",
        }.get(type(exc), "request")
        return FetchError("fetch_failed", f"{where}: {phase} timed out", retryable=True)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return FetchError(
                "fetch_failed",
                f"{where}: TLS certificate verification failed: {cause.verify_message}",
                retryable=False,
            )
        if isinstance(cause, ssl.SSLError):
            return FetchError("fetch_failed", f"{where}: TLS error: {cause}", retryable=False)
        cause = cause.__cause__ or cause.__context__
    kind = "connection failed" if isinstance(exc, httpx.ConnectError) else "transport error"
    return FetchError("fetch_failed", f"{where}: {kind}: {exc}", retryable=True)


def _status_error(url: httpx.URL, status: int) -> FetchError:
    where = redact(url)
    if status in (404, 410):
        return FetchError("media_not_found", f"{where}: HTTP {status}", retryable=False)
    retryable = status == 429 or status >= 500
    return FetchError("fetch_failed", f"{where}: HTTP {status}", retryable=retryable)


def _next_headers(headers: dict[str, str], current: httpx.URL, target: httpx.URL) -> dict[str, str]:
    """Credentials meant for one origin do not follow a redirect to another."""
    same = (current.scheme, current.raw_host, _port(current)) == (
        target.scheme,
        target.raw_host,
        _port(target),
    )
    return headers if same else {k: v for k, v in headers.items() if k.lower() not in _ORIGIN_BOUND}


def _stream_body(session: _Session, url: httpx.URL, response: httpx.Response, dest: Path) -> int:
    """Write the body to a temp file beside `dest`, then rename; nothing partial is left."""
    policy = session.policy
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    size = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                for chunk in response.iter_raw():
                    size += len(chunk)
                    if size > policy.max_bytes:
                        raise FetchError(
                            "too_large",
                            f"{redact(url)}: body exceeds the limit of {policy.max_bytes} bytes",
                        )
                    out.write(chunk)
                    session.remaining(url)
            except httpx.HTTPError as exc:
                raise _transport_error(url, exc) from None
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def fetch_to_file(
    url: str,
    dest: Path,
    policy: FetchPolicy = DEFAULT_POLICY,
    *,
    headers: Mapping[str, str] | None = None,
) -> FetchResult:
    """GET `url` into `dest`, following (and re-validating) up to `policy.max_redirects` hops.

    Raises FetchError; on any failure `dest` is untouched and no partial file remains. Local
    file-system errors (no such directory, disk full) propagate as OSError: they are ours, not
    the URL's.
    """
    session = _Session(policy)
    try:
        current = _parse_url(url)
        previous: httpx.URL | None = None
        sent = dict(headers or {})
        for _hop in range(policy.max_redirects + 1):
            session.vet(current, previous)
            response = session.send("GET", current, sent, None)
            try:
                status = response.status_code
                if status in _REDIRECTS:
                    location = response.headers.get("location")
                    if not location:
                        raise FetchError(
                            "fetch_failed", f"{redact(current)}: HTTP {status} without Location"
                        )
                    try:
                        target = current.join(location)
                    except httpx.InvalidURL as exc:
                        raise _refused(
                            f"{redact(current)}: redirect to an invalid URL: "
                            f"{_scrub(str(exc), location)}"
                        ) from None
                    sent = _next_headers(sent, current, target)
                    previous, current = current, target
                    continue
                if status >= 400:
                    raise _status_error(current, status)
                if not 200 <= status < 300:
                    raise FetchError("fetch_failed", f"{redact(current)}: unexpected HTTP {status}")
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding not in ("", "identity"):
                    # Decoding would let a small body expand without bound before we count it.
                    raise FetchError(
                        "fetch_failed",
                        f"{redact(current)}: Content-Encoding {encoding!r} despite "
                        "Accept-Encoding: identity",
                    )
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > policy.max_bytes:
                    raise FetchError(
                        "too_large",
                        f"{redact(current)}: Content-Length {declared} exceeds the limit of "
                        f"{policy.max_bytes} bytes",
                    )
                size = _stream_body(session, current, response, dest)
                return FetchResult(
                    size=size,
                    content_type=response.headers.get("content-type"),
                    final_url=redact(current),
                )
            finally:
                response.close()
        raise FetchError(
            "fetch_failed",
            f"{redact(url)}: more than {policy.max_redirects} redirects (last {redact(current)})",
        )
    finally:
        session.close()


def request(
    method: str,
    url: str,
    *,
    content: bytes = b"",
    headers: Mapping[str, str] | None = None,
    policy: FetchPolicy = DEFAULT_POLICY,
) -> Reply:
    """Send one request (a webhook POST) through the same guard; redirects are not followed.

    Returns whatever status the target answered (3xx included): the caller decides what a
    webhook's 4xx or 5xx means. Raises FetchError only for refusals and transport failures.
    The response body is not read.
    """
    session = _Session(policy)
    try:
        target = _parse_url(url)
        session.vet(target, None)
        response = session.send(method.upper(), target, dict(headers or {}), content)
        try:
            return Reply(response.status_code, dict(response.headers.items()))
        finally:
            response.close()
    finally:
        session.close()
