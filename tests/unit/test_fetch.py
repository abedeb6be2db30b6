"""The SSRF-guarded fetcher against real loopback servers (127.0.0.1 only, counted connections).

"Public" names are made to resolve to loopback by replacing socket.getaddrinfo, so no test needs
DNS; where a refused target must never be dialled, socket.create_connection and
socket.socket.connect are replaced by tripwires for the duration of the fetch.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from facefleet.fetch import (
    DEFAULT_POLICY,
    AllowRule,
    FetchError,
    FetchPolicy,
    GuardedBackend,
    classify_address,
    fetch_to_file,
    parse_allow,
    request,
)

pytestmark = pytest.mark.timeout(30)

BODY = bytes(range(256)) * 1200  # 300 KiB, every byte value
PUBLIC_V4 = "93.184.216.34"


# --- a counting loopback server ------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10
    server: _Server

    def setup(self) -> None:
        super().setup()
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers.items())))
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_error(599, "no such route in this test")
            return
        self.close_connection = True
        route(self)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.server.posted.append(self.rfile.read(length))
        self.do_GET()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.connections = 0
        self.routes: dict[str, Callable[[_Handler], None]] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.posted: list[bytes] = []
        self.release = threading.Event()
        self.tls = tls
        self._lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        with self._lock:
            self.connections += 1
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hang up on purpose (too large, timeouts, bad certificates)


def _reply(
    status: int = 200, body: bytes = b"", headers: dict[str, str] | None = None
) -> Callable[[_Handler], None]:
    def route(h: _Handler) -> None:
        h.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(body)

    return route


def _redirect(location: str, status: int = 302) -> Callable[[_Handler], None]:
    return _reply(status, headers={"Location": location})


def _chunked(total: int) -> Callable[[_Handler], None]:
    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        chunk = b"x" * 65536
        for _ in range(total // len(chunk)):
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        h.wfile.write(b"0\r\n\r\n")

    return route


def _until_close(total: int) -> Callable[[_Handler], None]:
    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(b"y" * total)

    return route


def _declares_then_stalls(length: int) -> Callable[[_Handler], None]:
    def route(h: _Handler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.flush()
        h.server.release.wait(10)

    return route


def _stalls(h: _Handler) -> None:
    h.server.release.wait(10)


def _drips(h: _Handler) -> None:
    h.send_response(200)
    h.send_header("Content-Length", "100")
    h.end_headers()
    for _ in range(100):
        h.wfile.write(b"d")
        h.wfile.flush()
        if h.server.release.wait(0.1):
            return


def _echo_host(h: _Handler) -> None:
    _reply(200, h.headers.get("Host", "").encode())(h)


@pytest.fixture
def serve() -> Iterator[Callable[..., _Server]]:
    started: list[_Server] = []

    def start(tls: ssl.SSLContext | None = None) -> _Server:
        server = _Server(tls)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.release.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def server(serve: Callable[..., _Server]) -> _Server:
    s: _Server = serve()
    s.routes.update(
        {
            "/ok": _reply(200, BODY, {"Content-Type": "image/png"}),
            "/host": _echo_host,
            "/404": _reply(404),
            "/410": _reply(410),
            "/403": _reply(403),
            "/400": _reply(400),
            "/429": _reply(429),
            "/500": _reply(500),
            "/503": _reply(503),
            "/loop": _redirect("/loop"),
            "/r1": _redirect("/r2", 301),
            "/r2": _redirect("/ok", 307),
            "/nolocation": _reply(302),
            "/big-declared": _declares_then_stalls(10_000_000),
            "/chunked": _chunked(1024 * 1024),
            "/until-close": _until_close(1024 * 1024),
            "/stall": _stalls,
            "/drip": _drips,
            "/gzip": _reply(200, b"\x1f\x8b", {"Content-Encoding": "gzip"}),
            "/post": _reply(202, b"thanks", {"X-Reply": "1"}),
        }
    )
    return s


# --- DNS and socket doubles ------------------------------------------------------------------

_real_getaddrinfo = socket.getaddrinfo


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Names -> address lists (or a callable returning one); other names use the real resolver.

    `calls` counts lookups per name.
    """
    table: dict[str, Any] = {}
    calls: dict[str, int] = {}

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in table:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        calls[name] = calls.get(name, 0) + 1
        entry = table[name]
        addresses = entry() if callable(entry) else entry
        out: list[Any] = []
        for address in addresses:
            if ":" in address:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)))
        return out

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    table["__calls__"] = calls
    return table


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Tripwires: any outgoing connect fails the test (and is recorded in case it is swallowed)."""
    attempts: list[Any] = []

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(address)
        raise AssertionError(f"create_connection({address!r}) on a refused target")

    def connect(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise AssertionError(f"socket.connect({address!r}) on a refused target")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def _allow_loopback(**kwargs: Any) -> FetchPolicy:
    return FetchPolicy(allow=parse_allow("127.0.0.1/32"), **kwargs)


def _fetch_error(url: str, dest: Path, policy: FetchPolicy = DEFAULT_POLICY) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch_to_file(url, dest, policy)
    return info.value


# --- the address classifier ------------------------------------------------------------------

REFUSED = [
    ("0.0.0.0", "this network"),
    ("0.1.2.3", "this network"),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.0.0.1", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("169.254.0.1", "link-local"),
    ("169.254.169.254", "metadata"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "broadcast"),
    ("192.0.0.8", "IETF"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("::", "unspecified"),
    ("::1", "loopback"),
    ("fe80::1", "link-local"),
    ("fe80::1%1", "link-local"),
    ("fc00::1", "unique-local"),
    ("fd12:3456::1", "unique-local"),
    ("fd00:ec2::254", "metadata"),
    ("ff02::1", "multicast"),
    ("ff0e::1", "multicast"),
    ("64:ff9b::7f00:1", "embedding 127.0.0.1 which is loopback"),
    ("64:ff9b::a9fe:a9fe", "embedding 169.254.169.254 which is the cloud metadata"),
    ("64:ff9b::808:808", "NAT64"),
    ("64:ff9b:1::1", "NAT64"),
    ("2002:7f00:1::1", "embedding 127.0.0.1 which is loopback"),
    ("2002:a9fe:a9fe::", "embedding 169.254.169.254"),
    ("2002:c0a8:101::", "embedding 192.168.1.1 which is private"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:169.254.169.254", "metadata"),
    ("::ffff:10.0.0.1", "private"),
    ("::ffff:0.0.0.0", "this network"),
    ("::ffff:100.64.0.1", "carrier-grade NAT"),
    ("::127.0.0.1", "IPv4-compatible"),
    ("2001::1", "Teredo"),
    ("2001:db8::1", "documentation"),
    ("fec0::1", "site-local"),
    ("100::1", "discard"),
]
ACCEPTED = [
    "8.8.8.8",
    "1.1.1.1",
    PUBLIC_V4,
    "172.32.0.1",
    "100.128.0.1",
    "11.0.0.1",
    "2606:4700::1111",
    "2001:4860:4860::8888",
    "::ffff:8.8.8.8",
]


@pytest.mark.parametrize(("address", "why"), [pytest.param(a, w, id=a) for a, w in REFUSED])
def test_classifier_refuses_non_public_addresses(address: str, why: str) -> None:
    reason = classify_address(address)
    assert reason is not None
    assert why in reason
    assert classify_address(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", [pytest.param(a, id=a) for a in ACCEPTED])
def test_classifier_accepts_public_unicast(address: str) -> None:
    assert classify_address(address) is None


# --- the allow list --------------------------------------------------------------------------


def test_parse_allow_reads_networks_and_host_ports() -> None:
    rules = parse_allow(
        " 127.0.0.1/32, 10.0.0.0/8 ,::1/128,, 127.0.0.1:8443, MinIO.Internal.:9000,"
        "[::1]:8443, 192.168.1.7"
    )
    assert [str(r) for r in rules] == [
        "127.0.0.1/32",
        "10.0.0.0/8",
        "::1/128",
        "127.0.0.1:8443",
        "minio.internal:9000",
        "[::1]:8443",
        "192.168.1.7/32",
    ]
    assert parse_allow("") == ()
    assert parse_allow(" , ") == ()


def test_allow_rules_match_address_or_exact_host_and_port() -> None:
    loop = ipaddress.ip_address("127.0.0.1")
    (net,) = parse_allow("10.0.0.0/8")
    assert net.admits("anything", 1, ipaddress.ip_address("10.2.3.4"))
    assert not net.admits("anything", 1, loop)
    (named,) = parse_allow("minio.internal:9000")
    assert named.admits("MINIO.internal.", 9000, ipaddress.ip_address("10.9.9.9"))
    assert not named.admits("minio.internal", 9001, ipaddress.ip_address("10.9.9.9"))
    assert not named.admits("minio.internal.evil.test", 9000, loop)
    (literal,) = parse_allow("127.0.0.1:8443")
    assert literal == AllowRule(host="127.0.0.1", port=8443)
    assert literal.admits("2130706433", 8443, loop)  # by address, whatever the notation
    assert not literal.admits("127.0.0.1", 8444, loop)
    (v6,) = parse_allow("::1/128")
    assert v6.admits("x", 1, ipaddress.ip_address("::1"))
    assert not v6.admits("x", 1, loop)


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        pytest.param("10.0.0.1/8", "10.0.0.1/8", id="host-bits-set"),
        pytest.param("10.0.0.0/33", "10.0.0.0/33", id="prefix-too-long"),
        pytest.param("127.0.0.1/32, minio.internal", "minio.internal", id="name-without-port"),
        pytest.param("minio.internal:0", "minio.internal:0", id="port-zero"),
        pytest.param("minio.internal:70000", "minio.internal:70000", id="port-too-big"),
        pytest.param("minio.internal:http", "minio.internal:http", id="port-not-a-number"),
        pytest.param("bad host:80", "bad host:80", id="space-in-host"),
        pytest.param("-bad.example:80", "-bad.example:80", id="leading-hyphen"),
        pytest.param(":80", ":80", id="no-host"),
        pytest.param("[::1]8443", "[::1]8443", id="ipv6-without-colon"),
        pytest.param("[nothost]:80", "[nothost]:80", id="ipv6-not-an-address"),
        pytest.param("10.0.0.0/8, *.internal:443", "*.internal:443", id="wildcard"),
    ],
)
def test_parse_allow_names_the_bad_entry(text: str, bad: str) -> None:
    with pytest.raises(ValueError, match="allow entry") as info:
        parse_allow(text)
    assert repr(bad) in str(info.value)


# --- refusals: nothing is ever dialled -------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "why"),
    [
        pytest.param("http://127.0.0.1:{port}/ok", "loopback", id="ipv4-literal"),
        pytest.param("http://localhost:{port}/ok", "loopback", id="localhost"),
        pytest.param("http://2130706433:{port}/ok", "loopback", id="decimal"),
        pytest.param("http://0x7f.1:{port}/ok", "loopback", id="hex-short"),
        pytest.param("http://0x7f000001:{port}/ok", "loopback", id="hex"),
        pytest.param("http://127.1:{port}/ok", "loopback", id="short-form"),
        pytest.param("http://0177.0.0.1:{port}/ok", "invalid URL", id="octal"),
        pytest.param("http://[::ffff:127.0.0.1]:{port}/ok", "loopback", id="ipv4-mapped"),
        pytest.param("http://[::1]:{port}/ok", "loopback", id="ipv6-loopback"),
        pytest.param("http://0.0.0.0:{port}/ok", "unspecified", id="unspecified"),
        pytest.param("https://127.0.0.1:{port}/ok", "loopback", id="https-loopback"),
        pytest.param("http://evil.test:{port}/ok", "evil.test resolves to 127.0.0.1", id="name"),
        pytest.param("http://rebind.test:{port}/ok", "127.0.0.1", id="public-plus-loopback"),
        pytest.param("http://v6.test:{port}/ok", "::1", id="name-to-v6-loopback"),
    ],
)
def test_default_policy_refuses_loopback_without_connecting(
    server: _Server,
    fake_dns: dict[str, Any],
    no_connect: list[Any],
    tmp_path: Path,
    template: str,
    why: str,
) -> None:
    fake_dns["evil.test"] = ["127.0.0.1"]
    fake_dns["rebind.test"] = [PUBLIC_V4, "127.0.0.1"]  # never "pick the good one"
    fake_dns["v6.test"] = ["2606:4700::1111", "::1"]
    err = _fetch_error(template.format(port=server.port), tmp_path / "out")
    assert err.code == "fetch_refused"
    assert not err.retryable
    assert why in err.message
    assert server.connections == 0
    assert no_connect == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://169.254.169.254/latest/meta-data/", id="aws-v4"),
        pytest.param("http://[fd00:ec2::254]/latest/meta-data/", id="aws-v6"),
        pytest.param("http://[::ffff:169.254.169.254]/latest/", id="mapped"),
        pytest.param("http://[64:ff9b::a9fe:a9fe]/latest/", id="nat64"),
        pytest.param("http://[2002:a9fe:a9fe::1]/latest/", id="6to4"),
        pytest.param("https://metadata.test/computeMetadata/v1/", id="name"),
        pytest.param("https://metadata6.test/latest/", id="name-v6"),
    ],
)
@pytest.mark.parametrize("policy", [DEFAULT_POLICY, _allow_loopback()], ids=["default", "allow"])
def test_cloud_metadata_is_refused_before_any_socket(
    fake_dns: dict[str, Any], no_connect: list[Any], tmp_path: Path, url: str, policy: FetchPolicy
) -> None:
    fake_dns["metadata.test"] = ["169.254.169.254"]
    fake_dns["metadata6.test"] = ["fd00:ec2::254"]
    err = _fetch_error(url, tmp_path / "out", policy)
    assert err.code == "fetch_refused"
    assert "metadata" in err.message
    assert no_connect == []


@pytest.mark.parametrize(
    ("url", "why"),
    [
        pytest.param("ftp://public.test/x", "scheme 'ftp'", id="ftp"),
        pytest.param("file:///etc/passwd", "", id="file"),
        pytest.param("http://public.test/x", "plain http", id="http-to-public"),
        pytest.param("https://public.test:0/x", "port 0", id="port-zero"),
    ],
)
def test_scheme_and_port_refusals(
    fake_dns: dict[str, Any], no_connect: list[Any], tmp_path: Path, url: str, why: str
) -> None:
    fake_dns["public.test"] = [PUBLIC_V4]
    err = _fetch_error(url, tmp_path / "out")
    assert err.code == "fetch_refused"
    assert why in err.message
    assert no_connect == []


def test_public_ports_can_be_restricted(
    fake_dns: dict[str, Any], no_connect: list[Any], tmp_path: Path
) -> None:
    fake_dns["public.test"] = [PUBLIC_V4]
    policy = FetchPolicy(ports=frozenset({443}))
    err = _fetch_error("https://public.test:8443/x", tmp_path / "out", policy)
    assert err.code == "fetch_refused"
    assert "port 8443" in err.message


def test_redirect_to_a_refused_target_is_not_followed(
    serve: Callable[..., _Server], tmp_path: Path
) -> None:
    a, b = serve(), serve()
    a.routes["/to-b"] = _redirect(b.url("/ok"))
    a.routes["/to-localhost"] = _redirect(b.url("/ok", host="localhost"))
    a.routes["/to-metadata"] = _redirect("http://169.254.169.254/latest/meta-data/")
    b.routes["/ok"] = _reply(200, BODY)
    policy = FetchPolicy(allow=parse_allow(f"127.0.0.1:{a.port}"))
    for path, why in [
        ("/to-b", "127.0.0.1"),
        ("/to-localhost", "localhost resolves to"),
        ("/to-metadata", "metadata"),
    ]:
        before = a.connections
        err = _fetch_error(a.url(path), tmp_path / "out", policy)
        assert err.code == "fetch_refused"
        assert "redirect target" in err.message
        assert why in err.message
        assert a.connections == before + 1  # exactly the one allowed hop
    assert b.connections == 0


def test_a_name_resolving_to_any_refused_address_is_refused(
    fake_dns: dict[str, Any], no_connect: list[Any], tmp_path: Path
) -> None:
    fake_dns["mixed.test"] = [PUBLIC_V4, "10.1.2.3"]
    err = _fetch_error("https://mixed.test/a.jpg", tmp_path / "out")
    assert err.code == "fetch_refused"
    assert "mixed.test resolves to 10.1.2.3" in err.message


def test_rebinding_cannot_swap_the_address_after_validation(
    fake_dns: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """First answer public, every later one loopback: we dial the validated public IP only."""
    answers = iter([[PUBLIC_V4]])
    fake_dns["rebind.test"] = lambda: next(answers, ["127.0.0.1"])
    dialled: list[Any] = []

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> Any:
        dialled.append(address)
        raise ConnectionRefusedError("test double: no real connection")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    err = _fetch_error("https://rebind.test/a.jpg", tmp_path / "out")
    assert err.code == "fetch_failed"
    assert err.retryable
    assert dialled == [(PUBLIC_V4, 443)]
    assert fake_dns["__calls__"]["rebind.test"] == 1


def test_the_backend_checks_at_connect_time(server: _Server, fake_dns: dict[str, Any]) -> None:
    """GuardedBackend.connect_tcp validates by itself, pinned or not, before dialling."""
    fake_dns["evil.test"] = ["127.0.0.1"]
    with pytest.raises(FetchError) as info:
        GuardedBackend(DEFAULT_POLICY).connect_tcp("evil.test", server.port, timeout=1)
    assert info.value.code == "fetch_refused"
    assert "connect to evil.test" in info.value.message
    pinned = GuardedBackend(DEFAULT_POLICY)
    pinned.pin("evil.test", server.port, [ipaddress.ip_address("127.0.0.1")])
    with pytest.raises(FetchError, match="loopback"):
        pinned.connect_tcp("evil.test", server.port, timeout=1)
    assert server.connections == 0
    stream = GuardedBackend(_allow_loopback()).connect_tcp("evil.test", server.port, timeout=1)
    try:
        assert stream.get_extra_info("socket").getpeername()[0] == "127.0.0.1"
    finally:
        stream.close()


def test_messages_never_echo_credentials(
    server: _Server, fake_dns: dict[str, Any], tmp_path: Path
) -> None:
    fake_dns["evil.test"] = ["127.0.0.1"]
    for url in [
        f"http://user:s3cret@evil.test:{server.port}/x?token=t0ken",
        "http://user:s3cret@0177.0.0.1/x?token=t0ken",
        "http://user:s3cret@[::1/x?token=t0ken",
    ]:
        err = _fetch_error(url, tmp_path / "out")
        assert err.code == "fetch_refused", err
        assert "s3cret" not in err.message
        assert "t0ken" not in err.message
    err = _fetch_error(
        f"http://user:s3cret@127.0.0.1:{server.port}/404?X-Amz-Signature=t0ken",
        tmp_path / "out",
        _allow_loopback(),
    )
    assert err.code == "media_not_found"
    assert err.message == f"http://127.0.0.1:{server.port}/404: HTTP 404"


# --- allowed targets: downloads, limits, statuses, timeouts ------------------------------------


def test_streamed_download_is_byte_identical(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "in.png"
    result = fetch_to_file(server.url("/ok?sig=abc"), dest, _allow_loopback())
    assert dest.read_bytes() == BODY
    assert result.size == len(BODY)
    assert result.content_type == "image/png"
    assert result.final_url == server.url("/ok")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
    assert server.seen[0][1]["Accept-Encoding"] == "identity"


def test_host_rule_and_odd_notation_reach_the_allowed_address(
    server: _Server, tmp_path: Path
) -> None:
    policy = FetchPolicy(allow=parse_allow(f"127.0.0.1:{server.port}"))
    fetch_to_file(f"http://2130706433:{server.port}/ok", tmp_path / "a", policy)
    assert (tmp_path / "a").read_bytes() == BODY


def test_the_host_header_keeps_the_name_while_the_validated_ip_is_dialled(
    server: _Server, fake_dns: dict[str, Any], tmp_path: Path
) -> None:
    fake_dns["media.test"] = ["127.0.0.1"]
    dest = tmp_path / "host"
    fetch_to_file(server.url("/host", host="media.test"), dest, _allow_loopback())
    assert dest.read_bytes() == f"media.test:{server.port}".encode()
    assert fake_dns["__calls__"]["media.test"] == 1


def test_declared_length_over_the_limit_is_refused_before_the_body(
    server: _Server, tmp_path: Path
) -> None:
    dest = tmp_path / "big"
    started = time.monotonic()
    err = _fetch_error(server.url("/big-declared"), dest, _allow_loopback(max_bytes=1000))
    assert time.monotonic() - started < 2  # the server never sends a body; we did not wait
    assert err.code == "too_large"
    assert "Content-Length 10000000" in err.message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", ["/chunked", "/until-close"])
def test_streamed_body_over_the_limit_is_cut_and_removed(
    server: _Server, tmp_path: Path, path: str
) -> None:
    dest = tmp_path / "big"
    dest.write_bytes(b"previous result")
    err = _fetch_error(server.url(path), dest, _allow_loopback(max_bytes=100_000))
    assert err.code == "too_large"
    assert not err.retryable
    assert dest.read_bytes() == b"previous result"  # never clobbered by a partial body
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]  # no .part left behind


@pytest.mark.parametrize(
    ("path", "code", "retryable"),
    [
        pytest.param("/404", "media_not_found", False, id="404"),
        pytest.param("/410", "media_not_found", False, id="410"),
        pytest.param("/500", "fetch_failed", True, id="500"),
        pytest.param("/503", "fetch_failed", True, id="503"),
        pytest.param("/429", "fetch_failed", True, id="429"),
        pytest.param("/403", "fetch_failed", False, id="403"),
        pytest.param("/400", "fetch_failed", False, id="400"),
        pytest.param("/nolocation", "fetch_failed", False, id="redirect-without-location"),
        pytest.param("/gzip", "fetch_failed", False, id="content-encoding"),
    ],
)
def test_http_statuses_map_to_codes(
    server: _Server, tmp_path: Path, path: str, code: str, retryable: bool
) -> None:
    err = _fetch_error(server.url(path), tmp_path / "out", _allow_loopback())
    assert (err.code, err.retryable) == (code, retryable)
    assert list(tmp_path.iterdir()) == []


def test_a_stalled_server_times_out_within_the_read_timeout(
    server: _Server, tmp_path: Path
) -> None:
    started = time.monotonic()
    err = _fetch_error(server.url("/stall"), tmp_path / "out", _allow_loopback(read_timeout=0.5))
    assert time.monotonic() - started < 2
    assert err.code == "fetch_failed"
    assert err.retryable
    assert "read timed out" in err.message


def test_a_dripping_server_hits_the_overall_deadline(server: _Server, tmp_path: Path) -> None:
    started = time.monotonic()
    err = _fetch_error(
        server.url("/drip"), tmp_path / "out", _allow_loopback(read_timeout=5, deadline=0.5)
    )
    assert time.monotonic() - started < 2
    assert err.code == "fetch_failed"
    assert err.retryable
    assert "deadline" in err.message
    assert list(tmp_path.iterdir()) == []


def test_redirects_are_followed_up_to_the_limit(server: _Server, tmp_path: Path) -> None:
    result = fetch_to_file(server.url("/r1"), tmp_path / "ok", _allow_loopback())
    assert result.final_url == server.url("/ok")
    assert (tmp_path / "ok").read_bytes() == BODY
    before = server.connections
    err = _fetch_error(server.url("/loop"), tmp_path / "loop", _allow_loopback(max_redirects=3))
    assert err.code == "fetch_failed"
    assert not err.retryable
    assert "more than 3 redirects" in err.message
    assert server.connections - before == 4  # the first request and three followed redirects


def test_credentials_do_not_follow_a_redirect_to_another_origin(
    serve: Callable[..., _Server], tmp_path: Path
) -> None:
    a, b = serve(), serve()
    a.routes["/go"] = _redirect(b.url("/ok"))
    b.routes["/ok"] = _reply(200, b"fine")
    fetch_to_file(
        a.url("/go"), tmp_path / "out", _allow_loopback(), headers={"Authorization": "Bearer x"}
    )
    assert a.seen[0][1]["Authorization"] == "Bearer x"
    assert "Authorization" not in b.seen[0][1]


# --- TLS: SNI and verification by hostname; no downgrade ---------------------------------------


@pytest.fixture
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for fetch.test only (no IP SAN), and its key."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fetch.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("fetch.test")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(key_file, 0o600)
    return cert_file, key_file


@pytest.fixture
def tls_server(
    serve: Callable[..., _Server], tls_files: tuple[Path, Path], fake_dns: dict[str, Any]
) -> tuple[_Server, list[str | None]]:
    cert_file, key_file = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    sni: list[str | None] = []

    def on_sni(sock: Any, server_name: str | None, ctx: Any) -> None:
        sni.append(server_name)

    context.sni_callback = on_sni
    fake_dns["fetch.test"] = ["127.0.0.1"]
    fake_dns["other.test"] = ["127.0.0.1"]
    server: _Server = serve(context)
    server.routes["/ok"] = _reply(200, BODY, {"Content-Type": "image/jpeg"})
    return server, sni


def test_tls_verifies_the_hostname_while_dialling_the_ip(
    tls_server: tuple[_Server, list[str | None]], tls_files: tuple[Path, Path], tmp_path: Path
) -> None:
    server, sni = tls_server
    policy = _allow_loopback(ca_file=str(tls_files[0]))
    result = fetch_to_file(
        server.url("/ok", host="fetch.test", scheme="https"), tmp_path / "a", policy
    )
    assert (tmp_path / "a").read_bytes() == BODY
    assert result.final_url == server.url("/ok", host="fetch.test", scheme="https")
    assert sni == ["fetch.test"]
    err = _fetch_error(server.url("/ok", host="other.test", scheme="https"), tmp_path / "b", policy)
    assert err.code == "fetch_failed"
    assert not err.retryable
    assert "certificate" in err.message
    err = _fetch_error(server.url("/ok", scheme="https"), tmp_path / "c", policy)
    assert err.code == "fetch_failed"  # the IP is not in the certificate: no IP fallback
    err = _fetch_error(
        server.url("/ok", host="fetch.test", scheme="https"), tmp_path / "d", _allow_loopback()
    )
    assert err.code == "fetch_failed"  # self-signed is not trusted without ca_file
    assert "certificate" in err.message


def test_https_to_http_downgrade_is_refused_unless_http_is_allowed(
    tls_server: tuple[_Server, list[str | None]],
    tls_files: tuple[Path, Path],
    serve: Callable[..., _Server],
    tmp_path: Path,
) -> None:
    server, _ = tls_server
    plain = serve()
    plain.routes["/ok"] = _reply(200, b"plain")
    server.routes["/down"] = _redirect(plain.url("/ok"))
    url = server.url("/down", host="fetch.test", scheme="https")
    err = _fetch_error(url, tmp_path / "a", _allow_loopback(ca_file=str(tls_files[0])))
    assert err.code == "fetch_refused"
    assert "downgrade" in err.message
    assert plain.connections == 0
    policy = _allow_loopback(ca_file=str(tls_files[0]), allow_http=True)
    fetch_to_file(url, tmp_path / "b", policy)
    assert (tmp_path / "b").read_bytes() == b"plain"


# --- request(): the webhook path --------------------------------------------------------------


def test_request_posts_through_the_guard(server: _Server) -> None:
    reply = request(
        "POST",
        server.url("/post"),
        content=b'{"job": 1}',
        headers={"Content-Type": "application/json"},
        policy=_allow_loopback(),
    )
    assert reply.status == 202
    assert reply.headers["x-reply"] == "1"
    assert server.posted == [b'{"job": 1}']


def test_request_does_not_follow_redirects(server: _Server) -> None:
    server.routes["/post-redirect"] = _redirect("http://169.254.169.254/")
    status, headers = request("POST", server.url("/post-redirect"), policy=_allow_loopback())
    assert status == 302
    assert headers["location"] == "http://169.254.169.254/"
    assert server.connections == 1


def test_request_refuses_private_targets_without_connecting(
    server: _Server, no_connect: list[Any]
) -> None:
    with pytest.raises(FetchError) as info:
        request("POST", server.url("/post"), content=b"x")
    assert info.value.code == "fetch_refused"
    assert server.connections == 0
    assert no_connect == []
