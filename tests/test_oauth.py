"""OAuth 2.0 access tokens for gmail and ms365 (dripd.channels.oauth): the refresh-token
grant as Google and Microsoft document it (RFC 6749 §6, providers.md §9), its cache and
lock, rotated refresh tokens, refusals, and the host application's token provider."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import httpx
import pytest
import structlog
from httpmock import Answer, Endless, Mock, Trickle, build, form_of, make_adapter, message

from dripd.channels import registry
from dripd.channels.base import AdapterError, ChannelContext, TransientError
from dripd.channels.oauth import (
    DEFAULT_LIFETIME,
    MAX_GRANT_LIFETIME,
    MAX_TOKEN_ANSWER_BYTES,
    RefreshGrant,
    TokenProvider,
    token_source,
)
from dripd.clock import ManualClock
from dripd.errors import ConfigError

CLIENT_ID = "1234-client.apps.googleusercontent.example"
CLIENT_SECRET = "GOCSPX-client-secret-9f8e7d"
REFRESH = "1//0refresh-token-a1b2c3d4"
GRANT = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "refresh_token": REFRESH}

GOOGLE = {"access_token": "ya29.first", "expires_in": 3599, "token_type": "Bearer"}


class Gated(httpx.AsyncBaseTransport):
    """Answers like `Mock`, but only once `open` is set: requests in flight overlap."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock
        self.open = asyncio.Event()
        self.arrived = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.arrived.set()
        await self.open.wait()
        return await self.mock.handle_async_request(request)


async def overlapping(source: Any, gate: Gated, calls: int, **kwargs: Any) -> list[Any]:
    """`calls` concurrent `source.token(**kwargs)`, all started before any answer comes."""
    tasks = [asyncio.create_task(source.token(**kwargs)) for _ in range(calls)]
    await gate.arrived.wait()
    for _ in range(10):  # let every task reach the lock
        await asyncio.sleep(0)
    gate.open.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


def grant(provider: str = "gmail", config: Mapping[str, Any] | None = None, **context: Any) -> Any:
    clock = context.pop("clock", None) or ManualClock()
    adapter = make_adapter(provider, "email", {"from": "a@x.example", **(config or {})}, GRANT)
    return RefreshGrant(adapter, ChannelContext(**context), clock=clock)


# -- the refresh request --------------------------------------------------------------------


async def test_google_refresh_is_the_documented_form_post() -> None:
    mock = Mock(Answer(200, json=GOOGLE))
    source = grant(transport=mock)
    assert await source.token() == "ya29.first"
    await source.aclose()

    [request] = mock.requests
    assert request.method == "POST"
    assert str(request.url) == "https://oauth2.googleapis.com/token"
    assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert not request.content.startswith(b"{")  # a form, not JSON
    assert form_of(request) == {
        "grant_type": ["refresh_token"],
        "refresh_token": [REFRESH],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }
    # The client authenticates in the body (client_secret_post), not with Basic as well.
    assert "authorization" not in request.headers


async def test_microsoft_refresh_sends_tenant_and_space_separated_scope() -> None:
    answer = {"access_token": "eyJ0.ms", "token_type": "Bearer", "expires_in": 4000}
    mock = Mock(Answer(200, json=answer))
    source = grant("ms365", {"user": "m@contoso.example"}, transport=mock)
    assert await source.token() == "eyJ0.ms"

    [request] = mock.requests
    assert str(request.url) == "https://login.microsoftonline.com/common/oauth2/v2.0/token"
    assert form_of(request) == {
        "grant_type": ["refresh_token"],
        "refresh_token": [REFRESH],
        "scope": ["https://graph.microsoft.com/Mail.Send offline_access"],
        "client_id": [CLIENT_ID],
        "client_secret": [CLIENT_SECRET],
    }


async def test_microsoft_tenant_scope_and_token_url_are_configurable() -> None:
    tenant = "0c1d2e3f-aaaa-bbbb-cccc-123456789abc"
    mock = Mock(Answer(200, json={"access_token": "t", "expires_in": 3600}))
    scope = "https://graph.microsoft.com/Mail.Send   offline_access"
    await grant("ms365", {"user": "u", "tenant": tenant, "scope": scope}, transport=mock).token()
    assert str(mock.last.url) == f"https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
    assert form_of(mock.last)["scope"] == ["https://graph.microsoft.com/Mail.Send offline_access"]

    cloud = "https://login.microsoftonline.us/contoso.example/oauth2/v2.0/token"
    await grant("ms365", {"user": "u", "token_url": cloud}, transport=mock).token()
    assert str(mock.last.url) == cloud


# -- the cache and the lock ---------------------------------------------------------------


async def test_token_is_cached_until_sixty_seconds_before_expiry() -> None:
    clock = ManualClock()
    mock = Mock(
        Answer(200, json={"access_token": "one", "expires_in": 3600}),
        Answer(200, json={"access_token": "two", "expires_in": 3600}),
    )
    source = grant(transport=mock, clock=clock)
    assert await source.token() == "one"
    clock.advance(3539)
    assert await source.token() == "one"
    assert len(mock.requests) == 1
    clock.advance(2)  # 59 s before expiry: inside the margin
    assert await source.token() == "two"
    assert len(mock.requests) == 2


async def test_a_short_lived_token_keeps_half_its_lifetime() -> None:
    clock = ManualClock()
    mock = Mock(Answer(200, json={"access_token": "short", "expires_in": 40}))
    source = grant(transport=mock, clock=clock)
    await source.token()
    clock.advance(19)
    await source.token()
    assert len(mock.requests) == 1
    clock.advance(2)
    await source.token()
    assert len(mock.requests) == 2


async def test_concurrent_callers_share_one_refresh() -> None:
    mock = Mock(Answer(200, json=GOOGLE))
    gate = Gated(mock)
    source = grant(transport=gate)
    tokens = await overlapping(source, gate, 8)
    assert tokens == ["ya29.first"] * 8
    assert len(mock.requests) == 1


async def test_a_rejected_token_is_refreshed_once_even_when_many_callers_reject_it() -> None:
    mock = Mock(
        Answer(200, json={"access_token": "old", "expires_in": 3600}),
        Answer(200, json={"access_token": "new", "expires_in": 3600}),
    )
    gate = Gated(mock)
    source = grant(transport=gate)
    gate.open.set()
    old = await source.token()
    gate.open.clear()
    gate.arrived.clear()
    tokens = await overlapping(source, gate, 5, rejected=old)
    assert tokens == ["new"] * 5
    assert len(mock.requests) == 2


# -- rotated refresh tokens ---------------------------------------------------------------


async def test_rotated_refresh_token_is_saved_and_used_next() -> None:
    clock = ManualClock()
    saved: list[dict[str, Any]] = []

    async def save(credentials: Mapping[str, Any]) -> None:
        saved.append(dict(credentials))

    mock = Mock(
        Answer(200, json={"access_token": "a1", "expires_in": 3600, "refresh_token": "0.rt-2"}),
        Answer(200, json={"access_token": "a2", "expires_in": 3600}),
    )
    source = grant("ms365", {"user": "u"}, transport=mock, clock=clock, save_credentials=save)
    await source.token()
    assert saved == [
        {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "refresh_token": "0.rt-2"}
    ]

    clock.advance(3600)
    assert await source.token() == "a2"
    assert form_of(mock.last)["refresh_token"] == ["0.rt-2"]
    assert len(saved) == 1  # the same token echoed back is not a rotation


async def test_unchanged_refresh_token_in_the_answer_is_not_saved() -> None:
    saved: list[Mapping[str, Any]] = []

    async def save(credentials: Mapping[str, Any]) -> None:
        saved.append(credentials)

    mock = Mock(Answer(200, json={"access_token": "a", "expires_in": 60, "refresh_token": REFRESH}))
    await grant(transport=mock, save_credentials=save).token()
    assert saved == []


async def test_rotation_without_a_store_is_kept_in_memory_and_logged_once() -> None:
    clock = ManualClock()
    mock = Mock(
        Answer(200, json={"access_token": "a1", "expires_in": 3600, "refresh_token": "rt-2"}),
        Answer(200, json={"access_token": "a2", "expires_in": 3600, "refresh_token": "rt-3"}),
        Answer(200, json={"access_token": "a3", "expires_in": 3600}),
    )
    source = grant("ms365", {"user": "u"}, transport=mock, clock=clock)
    with structlog.testing.capture_logs() as logs:
        await source.token()
        clock.advance(3600)
        await source.token()
        clock.advance(3600)
        await source.token()
    assert [form_of(r)["refresh_token"] for r in mock.requests] == [[REFRESH], ["rt-2"], ["rt-3"]]
    warnings = [e for e in logs if "memory only" in e["event"]]
    assert len(warnings) == 1
    assert "rt-2" not in repr(logs)
    assert "rt-3" not in repr(logs)


async def test_a_failing_store_does_not_fail_the_refresh() -> None:
    async def save(credentials: Mapping[str, Any]) -> None:
        raise OSError("database gone")

    mock = Mock(Answer(200, json={"access_token": "a1", "expires_in": 60, "refresh_token": "rt-2"}))
    with structlog.testing.capture_logs() as logs:
        assert await grant(transport=mock, save_credentials=save).token() == "a1"
    assert any(e["event"].startswith("could not store") for e in logs)
    assert "rt-2" not in repr(logs)


# -- refusals and failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        "invalid_grant",
        "interaction_required",
        "consent_required",
        "invalid_client",
        "unauthorized_client",
    ],
)
async def test_refused_grant_is_an_adapter_error_without_secrets(code: str) -> None:
    description = f"AADSTS70008: The refresh token has expired. {'x' * 400}"
    mock = Mock(Answer(400, json={"error": code, "error_description": description}))
    source = grant(transport=mock)
    with pytest.raises(AdapterError) as caught:
        await source.token()
    text = caught.value.message
    assert text.startswith(f"gmail: oauth refresh refused: {code}: AADSTS70008: The refresh")
    assert len(text) < 300  # the description is clipped
    for secret in (REFRESH, CLIENT_SECRET):
        assert secret not in text
    assert len(mock.requests) == 1  # one try, not a loop


async def test_refused_grant_is_tried_once_per_caller_and_shared_by_waiters() -> None:
    mock = Mock(Answer(400, json={"error": "invalid_grant", "error_description": "Bad Request"}))
    gate = Gated(mock)
    source = grant(transport=gate)
    results = await overlapping(source, gate, 4)
    assert all(isinstance(r, AdapterError) for r in results)
    assert len(mock.requests) == 1
    # A later call (after `resume-adapter`, say) tries again, once.
    with pytest.raises(AdapterError):
        await source.token()
    assert len(mock.requests) == 2


async def test_description_echoing_a_secret_is_redacted_by_the_channel() -> None:
    echo = f"refresh token {REFRESH} was revoked for client secret {CLIENT_SECRET}"
    mock = Mock(Answer(400, json={"error": "invalid_grant", "error_description": echo}))
    channel = build("gmail", "email", {"from": "a@x.example"}, GRANT, mock)
    with pytest.raises(AdapterError) as caught:
        await channel.send(message())
    assert "invalid_grant" in caught.value.message
    assert REFRESH not in caught.value.message
    assert CLIENT_SECRET not in caught.value.message
    assert len(mock.requests) == 1  # no send without a token
    await channel.aclose()


@pytest.mark.parametrize(
    ("answer", "retry"),
    [
        (Answer(400, json={"error": "temporarily_unavailable", "error_description": "busy"}), None),
        (Answer(503, text="<html>down</html>", headers={"Retry-After": "30"}), 30.0),
        (Answer(500, json={"error": "server_error"}), None),
        (Answer(429, json={"error": "invalid_grant"}, headers={"Retry-After": "5"}), 5.0),
        (httpx.ConnectError("connection refused"), None),
        (httpx.ReadTimeout("timed out"), None),
        (Answer(200, text="<html>captive portal</html>"), None),
        (Answer(200, json={"token_type": "Bearer"}), None),
    ],
)
async def test_unavailable_token_endpoint_is_transient_provider_wide(
    answer: Answer | Exception, retry: float | None
) -> None:
    mock = Mock(answer)
    with pytest.raises(TransientError) as caught:
        await grant(transport=mock).token()
    assert caught.value.provider_wide
    assert caught.value.retry_after == retry
    assert REFRESH not in caught.value.message
    assert CLIENT_SECRET not in caught.value.message
    assert len(mock.requests) == 1


MINUTE = timedelta(minutes=1)


def token_answer(expiry: bytes) -> Answer:
    return Answer(
        200,
        content=b'{"access_token":"ya29.t","token_type":"Bearer",' + expiry + b"}",
        headers={"content-type": "application/json"},
    )


@pytest.mark.parametrize(
    ("expiry", "lifetime"),
    [
        (b'"expires_in":1e308', MAX_GRANT_LIFETIME),  # huge: capped
        (b'"expires_in":1' + b"0" * 400, MAX_GRANT_LIFETIME),  # a huge integer
        (b'"expires_in":"1e308"', MAX_GRANT_LIFETIME),
        (b'"expires_in":"3600"', timedelta(hours=1)),
        (b'"expires_in":1e999', MAX_GRANT_LIFETIME),  # read as infinity
        (b'"expires_in":Infinity', MAX_GRANT_LIFETIME),
        (b'"expires_in":NaN', DEFAULT_LIFETIME),
        (b'"expires_in":-Infinity', DEFAULT_LIFETIME),
        (b'"expires_in":-30', DEFAULT_LIFETIME),
        (b'"expires_in":0', DEFAULT_LIFETIME),
        (b'"expires_in":"soon"', DEFAULT_LIFETIME),
        (b'"expires_in":[3600]', DEFAULT_LIFETIME),
        (b'"expires_in":true', DEFAULT_LIFETIME),
        (b'"expires_in":3600,"expires_at":"never"', timedelta(hours=1)),
        (b'"expires_at":1e999', DEFAULT_LIFETIME),
        (b'"expires_at":NaN', DEFAULT_LIFETIME),
    ],
)
async def test_an_unusable_or_huge_expiry_is_handled_sanely(
    expiry: bytes, lifetime: timedelta
) -> None:
    clock = ManualClock()
    mock = Mock(token_answer(expiry))
    source = grant(transport=mock, clock=clock)
    with structlog.testing.capture_logs() as logs:
        assert await source.token() == "ya29.t"
        clock.advance(lifetime - 2 * MINUTE)
        assert await source.token() == "ya29.t"
        assert len(mock.requests) == 1  # still fresh
        clock.advance(3 * MINUTE)
        assert await source.token() == "ya29.t"
        assert len(mock.requests) == 2  # expired: fetched again
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]


async def test_a_trickling_token_endpoint_ends_at_the_adapters_timeout() -> None:
    trickle = Trickle(b"{", pause=0.02)
    mock = Mock(Answer(200, stream=trickle, headers={"content-type": "application/json"}))
    adapter = make_adapter("gmail", "email", {"from": "a@x.example"}, GRANT)
    source = RefreshGrant(adapter, ChannelContext(transport=mock), clock=ManualClock(), timeout=0.2)
    with pytest.raises(TransientError) as caught:
        await asyncio.wait_for(source.token(), 60)
    await source.aclose()
    assert caught.value.provider_wide
    assert "0.2 s" in caught.value.message
    assert "timeout" in caught.value.message
    assert trickle.sent < trickle.count


@pytest.mark.parametrize("status", [200, 400])
async def test_a_huge_token_endpoint_answer_is_not_read(status: int) -> None:
    endless = Endless(64 * 1024 * 1024, fill=b" ")
    mock = Mock(Answer(status, stream=endless, headers={"content-type": "application/json"}))
    with pytest.raises(TransientError, match="larger than 1024 KiB") as caught:
        await grant(transport=mock).token()
    assert caught.value.provider_wide
    assert endless.sent <= MAX_TOKEN_ANSWER_BYTES + endless.chunk


async def test_a_rotated_refresh_token_that_is_not_printable_ascii_is_not_kept() -> None:
    # Stored, it would fail the adapter's credential check at the next start.
    clock = ManualClock()
    saved: list[Mapping[str, Any]] = []

    async def save(credentials: Mapping[str, Any]) -> None:
        saved.append(credentials)

    mock = Mock(
        Answer(200, json={"access_token": "a1", "expires_in": 3600, "refresh_token": "rt-\u00e9"}),
        Answer(200, json={"access_token": "a2", "expires_in": 3600}),
    )
    source = grant("ms365", {"user": "u"}, transport=mock, clock=clock, save_credentials=save)
    with structlog.testing.capture_logs() as logs:
        assert await source.token() == "a1"
    assert saved == []
    assert any("not usable" in e["event"] for e in logs)
    clock.advance(3600)
    assert await source.token() == "a2"
    assert form_of(mock.last)["refresh_token"] == [REFRESH]


async def test_a_non_oauth_client_error_pauses_the_adapter() -> None:
    mock = Mock(Answer(404, text="<html>Not Found</html>"))
    with pytest.raises(AdapterError, match=r"oauth refresh refused: HTTP 404"):
        await grant(transport=mock).token()


# -- the token provider -------------------------------------------------------------------

#: What `provide` answers next (popped in turn), and the calls it got.
ANSWERS: list[Any] = []
CALLS: list[tuple[str, str]] = []


async def provide(adapter_name: str, provider: str) -> Any:
    CALLS.append((adapter_name, provider))
    answer = ANSWERS.pop(0) if len(ANSWERS) > 1 else ANSWERS[0]
    if isinstance(answer, BaseException):
        raise answer
    return answer


def not_async(adapter_name: str, provider: str) -> str:
    return "token"


@pytest.fixture
def answers() -> list[Any]:
    ANSWERS.clear()
    CALLS.clear()
    return ANSWERS


def provider_source(clock: ManualClock, provider: str = "gmail") -> Any:
    config = {"from": "a@x.example", "token_provider": "test_oauth:provide"}
    if provider == "ms365":
        config["user"] = "u"
    return token_source(
        make_adapter(provider, "email", config, name="mail"), ChannelContext(), clock=clock
    )


async def test_token_provider_string_is_cached_five_minutes(answers: list[Any]) -> None:
    clock = ManualClock()
    answers.extend(["tok-1", "tok-2"])
    source = provider_source(clock, "ms365")
    assert isinstance(source, TokenProvider)
    assert await source.token() == "tok-1"
    clock.advance(299)
    assert await source.token() == "tok-1"
    clock.advance(2)
    assert await source.token() == "tok-2"
    assert CALLS == [("mail", "ms365"), ("mail", "ms365")]


@pytest.mark.parametrize(
    ("answer", "fresh_for"),
    [
        ({"access_token": "m", "expires_in": 600}, 540),
        ({"access_token": "m", "expires_in": 100}, 50),
        ({"access_token": "m", "expires_in": 36_000}, 3600),  # at most an hour
        ({"access_token": "m", "expires_at": "+900"}, 840),  # epoch seconds, set below
        ({"access_token": "m", "expires_at": "datetime+900"}, 840),
        ({"access_token": "m"}, 300),
    ],
)
async def test_token_provider_mapping_expiry(
    answers: list[Any], answer: dict[str, Any], fresh_for: int
) -> None:
    clock = ManualClock()
    if answer.get("expires_at") == "+900":
        answer = {**answer, "expires_at": clock.now().timestamp() + 900}
    elif answer.get("expires_at") == "datetime+900":
        answer = {**answer, "expires_at": clock.now() + timedelta(seconds=900)}
    answers.append(answer)
    source = provider_source(clock)
    await source.token()
    clock.advance(fresh_for - 1)
    await source.token()
    assert len(CALLS) == 1
    clock.advance(2)
    await source.token()
    assert len(CALLS) == 2


@pytest.mark.parametrize("answer", ["revoked", {"access_token": "revoked"}])
async def test_token_provider_revoked_pauses_the_adapter(answers: list[Any], answer: Any) -> None:
    answers.append(answer)
    with pytest.raises(
        AdapterError, match="token provider test_oauth:provide says the grant is revoked"
    ):
        await provider_source(ManualClock()).token()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (42, "answered a int, not a token or a mapping"),
        ("", "unusable token"),
        ("two words", "unusable token"),
        ({"expires_in": 60}, "no usable `access_token`"),
        ({"access_token": "t", "expires_in": "never"}, "`expires_in` must be a number of seconds"),
    ],
)
async def test_token_provider_wrong_answers_pause_the_adapter(
    answers: list[Any], answer: Any, error: str
) -> None:
    answers.append(answer)
    with pytest.raises(AdapterError, match=error):
        await provider_source(ManualClock()).token()


async def test_token_provider_exception_is_transient_and_hides_its_text(answers: list[Any]) -> None:
    answers.append(RuntimeError("vault said no for token s3cr3t"))
    with pytest.raises(TransientError) as caught:
        await provider_source(ManualClock()).token()
    assert caught.value.provider_wide
    assert "RuntimeError" in caught.value.message
    assert "s3cr3t" not in caught.value.message


@pytest.mark.parametrize(
    ("path", "error"),
    [
        (
            "test_oauth:not_async",
            "`token_provider` 'test_oauth:not_async': is not an async function",
        ),
        (
            "test_oauth:missing",
            "`token_provider` 'test_oauth:missing': 'test_oauth' has no attribute",
        ),
        ("no_such_module_x:fn", "`token_provider` 'no_such_module_x:fn': cannot import"),
    ],
)
async def test_token_provider_that_cannot_load_is_a_config_error_at_build(
    path: str, error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        build("gmail", "email", {"from": "a@x.example", "token_provider": path}, {}, Mock())


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "config", "credentials", "error"),
    [
        ("gmail", {}, {}, "credential `refresh_token` .* or config `token_provider` is required"),
        ("gmail", {}, {"refresh_token": "r"}, "credential `client_id` is required"),
        ("gmail", {"token_provider": "m:f"}, {"refresh_token": "r"}, "`refresh_token` is not used"),
        ("ms365", {"token_provider": "m:f", "scope": "x"}, {}, "config `scope` is not used"),
        (
            "gmail",
            {"token_provider": "not a path"},
            {},
            "`token_provider` 'not a path' is not a Python",
        ),
        ("gmail", {"tenant": "common"}, GRANT, "key 'tenant' is not known to provider 'gmail'"),
        ("ms365", {"scope": "Mail.Send,offline_access"}, GRANT, "`scope` separates its scopes"),
        (
            "ms365",
            {"scope": "https://graph.microsoft.com/Mail.Send"},
            GRANT,
            "must include `offline_access`",
        ),
        ("ms365", {"tenant": "../evil"}, GRANT, "config `tenant` must be"),
        ("gmail", {"token_url": "ftp://x.example/token"}, GRANT, "`token_url` .* is not an http"),
        (
            "gmail",
            {},
            {**GRANT, "client_secret": ""},
            "credential `client_secret` must be a non-empty",
        ),
    ],
)
def test_config_checks(
    provider: str, config: dict[str, Any], credentials: dict[str, Any], error: str
) -> None:
    full = {"from": "a@x.example", **config}
    if provider == "ms365":
        full.setdefault("user", "u@contoso.example")
    with pytest.raises(ConfigError, match=error):
        registry.validate("email", provider, full, credentials)


def test_client_id_is_an_identifier_and_the_rest_are_secrets() -> None:
    for provider in ("gmail", "ms365"):
        spec = registry.get(provider)
        assert spec.identifier_keys == {"client_id"}
        assert spec.credential_keys == {"client_id", "client_secret", "refresh_token"}
