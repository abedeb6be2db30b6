"""Offline tests of the gateway's pure parts: job tokens, API keys, media sniffing, settings."""

from __future__ import annotations

import time
import uuid

import pytest

from facefleet.producer.gateway.auth import ApiKeys, TokenError, TokenProblem, TokenSigner, bearer
from facefleet.producer.gateway.uploads import UploadRejected, check_media
from facefleet.settings import GatewaySettings, SettingsError
from tests.gateway.conftest import png

JOB = str(uuid.uuid4())
SIGNER = TokenSigner("k" * 40, ttl_s=600)


def test_token_round_trip_carries_the_creation_time() -> None:
    token = SIGNER.issue(JOB, iat=1_700_000_000)
    claims = SIGNER.verify(token, JOB)
    assert (claims.job_id, claims.iat) == (JOB, 1_700_000_000)
    assert claims.exp > time.time()


def _flip_last(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


@pytest.mark.parametrize(
    ("token", "job", "problem"),
    [
        pytest.param(None, JOB, TokenProblem.MISSING, id="missing"),
        pytest.param("", JOB, TokenProblem.MISSING, id="empty"),
        pytest.param("not-a-token", JOB, TokenProblem.MALFORMED, id="malformed"),
        pytest.param(
            _flip_last(SIGNER.issue(JOB)), JOB, TokenProblem.BAD_SIGNATURE, id="forged-signature"
        ),
        pytest.param(
            SIGNER.issue(JOB).replace(".", ".9", 1),
            JOB,
            TokenProblem.BAD_SIGNATURE,
            id="edited-claims",
        ),
        pytest.param(
            TokenSigner("z" * 40, 600).issue(JOB),
            JOB,
            TokenProblem.BAD_SIGNATURE,
            id="other-secret",
        ),
        pytest.param(
            SIGNER.issue(str(uuid.uuid4())), JOB, TokenProblem.OTHER_JOB, id="another-job"
        ),
        pytest.param(
            SIGNER.issue(JOB, now=time.time() - 601), JOB, TokenProblem.EXPIRED, id="expired"
        ),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(
    token: str | None, job: str, problem: TokenProblem
) -> None:
    with pytest.raises(TokenError) as err:
        SIGNER.verify(token, job)
    assert err.value.problem is problem


@pytest.mark.parametrize(
    ("presented", "ok"),
    [
        pytest.param("alpha", True, id="first-key"),
        pytest.param("beta", True, id="second-key"),
        pytest.param("alph", False, id="prefix"),
        pytest.param("", False, id="empty"),
        pytest.param(None, False, id="none"),
    ],
)
def test_api_keys(presented: str | None, ok: bool) -> None:
    assert ApiKeys(["alpha", "beta", ""]).valid(presented) is ok


@pytest.mark.parametrize(
    ("header", "value"),
    [
        pytest.param("Bearer abc", "abc", id="bearer"),
        pytest.param("bearer  abc ", "abc", id="case-and-spaces"),
        pytest.param("Basic abc", None, id="basic"),
        pytest.param("Bearer ", None, id="empty"),
        pytest.param(None, None, id="absent"),
    ],
)
def test_bearer(header: str | None, value: str | None) -> None:
    assert bearer(header) == value


ALL = ("jpeg", "png", "mp4")


@pytest.mark.parametrize(
    ("role", "head", "size", "status"),
    [
        pytest.param("source", png(), 0, 400, id="empty"),
        pytest.param("source", png(), 10_001, 413, id="too-large"),
        pytest.param("source", b"hello", 5, 415, id="unknown"),
        pytest.param("source", b"\x00\x00\x00\x18ftypisom", 100, 415, id="video-source"),
        pytest.param("target", b"RIFF\x00\x00\x00\x00WEBPVP8 ", 100, 415, id="kind-not-allowed"),
    ],
)
def test_check_media_refusals(role: str, head: bytes, size: int, status: int) -> None:
    with pytest.raises(UploadRejected) as err:
        check_media(role, head, size, max_bytes=10_000, allowed=ALL)
    assert err.value.status == status


def test_check_media_accepts_a_video_target() -> None:
    assert (
        check_media("target", b"\x00\x00\x00\x18ftypisom", 100, max_bytes=10_000, allowed=ALL)
        == "mp4"
    )


HEIC = b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00mif1heicmiaf"


def test_a_heic_photo_is_an_image_not_an_mp4() -> None:
    allowed = ("jpeg", "heic", "mp4")
    assert check_media("source", HEIC, 100, max_bytes=10_000, allowed=allowed) == "heic"
    with pytest.raises(UploadRejected, match="heic is not accepted"):
        check_media("source", HEIC, 100, max_bytes=10_000, allowed=ALL)


def test_a_recognised_format_is_named_when_refused() -> None:
    with pytest.raises(UploadRejected, match="gif is not accepted") as err:
        check_media("source", b"GIF89a\x01\x00", 100, max_bytes=10_000, allowed=ALL)
    assert err.value.status == 415


def test_settings_need_a_long_token_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("FACEFLEET_TOKEN_SECRET", "FACEFLEET_DEV_INSECURE_SECRET"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SettingsError, match="FACEFLEET_TOKEN_SECRET"):
        GatewaySettings.load()
    monkeypatch.setenv("FACEFLEET_TOKEN_SECRET", "short")
    with pytest.raises(SettingsError, match="too short"):
        GatewaySettings.load()
    monkeypatch.delenv("FACEFLEET_TOKEN_SECRET")
    monkeypatch.setenv("FACEFLEET_DEV_INSECURE_SECRET", "true")
    assert GatewaySettings.load().token_secret is None


def test_settings_parse_lists_and_derive_the_management_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FACEFLEET_TOKEN_SECRET", "x" * 32)
    monkeypatch.setenv("FACEFLEET_API_KEYS", " a , b,,")
    monkeypatch.setenv("FACEFLEET_UPLOAD_TYPES", "jpeg,png")
    monkeypatch.setenv("AMQP_URL", "amqp://u:p@rabbit.svc:5672/%2F")
    monkeypatch.delenv("FACEFLEET_MANAGEMENT_URL", raising=False)
    s = GatewaySettings.load()
    assert [k.get_secret_value() for k in s.api_keys] == ["a", "b"]
    assert s.upload_types == ("jpeg", "png")
    assert s.management_url == "http://rabbit.svc:15672"
    assert (s.gateway_host, s.gateway_port) == ("127.0.0.1", 8080)
    monkeypatch.setenv("FACEFLEET_UPLOAD_TYPES", "jpeg,exe")
    with pytest.raises(SettingsError, match="FACEFLEET_UPLOAD_TYPES"):
        GatewaySettings.load()
