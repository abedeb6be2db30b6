"""Who may do what: API keys for submitting, job-scoped signed tokens for following one job.

A job token is `<job_id>.<iat>.<exp>.<sig>` where sig = base64url(HMAC-SHA256(secret,
"facefleet-job-token-v1\\n<job_id>.<iat>.<exp>")). It is self-contained, so any replica with the
same secret verifies it without shared state; it names exactly one job, so it cannot open another
job's events; it expires. `iat` is the job's creation time: the gateway uses it to bound a
per-job stream replay (start there instead of at the stream's first message).

An upload token (`POST /v1/uploads` on a store that cannot presign) is
`u1.<base64url(JSON claims)>.<sig>` signed under its own domain ("facefleet-upload-token-v1"),
so no upload token can ever pass as a job token or the reverse; it names the upload's stored file
name, optionally the one media kind it may hold, and expires. Like a presigned S3 URL it may be
used more than once before it expires (uploads are content-addressed: a second PUT only stores
bytes again).

Every comparison of a secret is constant-time (hmac.compare_digest over fixed-length digests).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

_DOMAIN = b"facefleet-job-token-v1\n"
_UPLOAD_DOMAIN = b"facefleet-upload-token-v1\n"
_UPLOAD_PREFIX = "u1"
MAX_UPLOAD_TOKEN = 1024


class TokenProblem(enum.StrEnum):
    """Why a token was refused; the value is the close/HTTP reason clients see."""

    MISSING = "missing token"
    MALFORMED = "malformed token"
    BAD_SIGNATURE = "invalid token signature"
    OTHER_JOB = "token is for another job"
    EXPIRED = "token expired"


class TokenError(Exception):
    def __init__(self, problem: TokenProblem) -> None:
        super().__init__(problem.value)
        self.problem = problem


@dataclass(frozen=True)
class JobClaims:
    job_id: str
    iat: int
    exp: int


@dataclass(frozen=True)
class UploadClaims:
    """What an upload token allows: one PUT of a file stored as `name`, of media kind `kind`
    when that is set, until `exp`."""

    upload_id: str
    name: str
    kind: str | None
    exp: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Issues and verifies job tokens with one shared secret."""

    def __init__(self, secret: str | bytes, ttl_s: int) -> None:
        self._key = secret.encode() if isinstance(secret, str) else secret
        self.ttl_s = ttl_s

    @classmethod
    def ephemeral(cls, ttl_s: int) -> TokenSigner:
        """A random secret for dev: tokens die with the process."""
        return cls(secrets.token_bytes(32), ttl_s)

    def _sign(self, payload: str, domain: bytes = _DOMAIN) -> str:
        return _b64(hmac.new(self._key, domain + payload.encode(), hashlib.sha256).digest())

    def issue(self, job_id: str, *, iat: int | None = None, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        payload = f"{job_id}.{iat if iat is not None else issued}.{issued + self.ttl_s}"
        return f"{payload}.{self._sign(payload)}"

    def verify(self, token: str | None, job_id: str, *, now: float | None = None) -> JobClaims:
        """Claims of a valid token for `job_id`; raises TokenError naming the problem."""
        if not token:
            raise TokenError(TokenProblem.MISSING)
        parts = token.split(".")
        if len(parts) != 4 or len(token) > 512:
            raise TokenError(TokenProblem.MALFORMED)
        tok_job, iat_s, exp_s, sig = parts
        expected = self._sign(f"{tok_job}.{iat_s}.{exp_s}")
        if not hmac.compare_digest(sig.encode(), expected.encode()):
            raise TokenError(TokenProblem.BAD_SIGNATURE)
        try:
            iat, exp = int(iat_s), int(exp_s)
        except ValueError:
            raise TokenError(TokenProblem.MALFORMED) from None
        if not hmac.compare_digest(tok_job.encode(), job_id.encode()):
            raise TokenError(TokenProblem.OTHER_JOB)
        if exp <= (now if now is not None else time.time()):
            raise TokenError(TokenProblem.EXPIRED)
        return JobClaims(tok_job, iat, exp)

    @staticmethod
    def looks_like_token(value: str) -> bool:
        return value.count(".") == 3

    def issue_upload(
        self, name: str, kind: str | None, expires_s: int, *, now: float | None = None
    ) -> str:
        """A token for `PUT /v1/uploads/{token}`, valid `expires_s` seconds."""
        exp = int(now if now is not None else time.time()) + expires_s
        claims = {"id": uuid.uuid4().hex, "name": name, "kind": kind, "exp": exp}
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{_UPLOAD_PREFIX}.{payload}.{self._sign(payload, _UPLOAD_DOMAIN)}"

    def verify_upload(self, token: str | None, *, now: float | None = None) -> UploadClaims:
        """Claims of a valid upload token; raises TokenError naming the problem."""
        if not token:
            raise TokenError(TokenProblem.MISSING)
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != _UPLOAD_PREFIX or len(token) > MAX_UPLOAD_TOKEN:
            raise TokenError(TokenProblem.MALFORMED)
        _, payload, sig = parts
        if not hmac.compare_digest(sig.encode(), self._sign(payload, _UPLOAD_DOMAIN).encode()):
            raise TokenError(TokenProblem.BAD_SIGNATURE)
        try:
            data = json.loads(_unb64(payload))
            claims = UploadClaims(
                str(data["id"]),
                str(data["name"]),
                None if data["kind"] is None else str(data["kind"]),
                int(data["exp"]),
            )
        except (ValueError, KeyError, TypeError):
            raise TokenError(TokenProblem.MALFORMED) from None
        if claims.exp <= (now if now is not None else time.time()):
            raise TokenError(TokenProblem.EXPIRED)
        return claims


def key_id(key: str) -> str:
    """An API key's public id: the first 16 hex digits of its SHA-256. Jobs, usage, limits and
    metrics name keys by it; it reveals nothing usable of a random key, and the key itself is
    never stored or sent anywhere."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeys:
    """The set of valid API keys, compared in constant time (digests of equal length)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys if k]

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def ids(self) -> tuple[str, ...]:
        """The key ids (key_id) of the configured keys."""
        return tuple(d.hex()[:16] for d in self._digests)

    def valid(self, presented: str | None) -> bool:
        return self.identify(presented) is not None

    def identify(self, presented: str | None) -> str | None:
        """The key id of a valid key, or None."""
        if not presented:
            return None
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for known in self._digests:  # no early exit: time does not depend on which key matched
            if hmac.compare_digest(digest, known):
                found = known
        return None if found is None else found.hex()[:16]


def bearer(authorization: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` header."""
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()
