"""One-click unsubscribe (RFC 8058): tokens, headers, feedback events and the HTTP endpoint."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from background import background
from support import apply_text, one_email

from dripd import api, config
from dripd.channels.credentials import Vault
from dripd.clock import ManualClock
from dripd.db import feedback
from dripd.errors import ConfigError, CredentialsError
from dripd.http.app import HttpServer, build_app
from dripd.http.context import HttpContext
from dripd.http.unsubscribe import routes
from dripd.metrics import Metrics
from dripd.rules.unsubscribe import (
    AAD,
    ExpiredToken,
    InvalidToken,
    UnsubscribeToken,
    make_token,
    read_token,
    unsubscribe_headers,
)

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=60)
EXECUTION = uuid.UUID("0b6c7e1c-3f43-4a55-8d0e-9a1e1f0c2b3d")


def new_vault(*retired: bytes) -> Vault:
    return Vault(os.urandom(32), list(retired))


@pytest.fixture
def vault() -> Vault:
    return new_vault()


def token_for(vault: Vault, **overrides: Any) -> str:
    fields: dict[str, Any] = {
        "tenant": None,
        "channel": "email",
        "address": "ada@example.com",
        "execution_id": EXECUTION,
        "expires_at": LATER,
        **overrides,
    }
    return make_token(vault, **fields)


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def b64(blob: bytes) -> str:
    return base64.urlsafe_b64encode(blob).rstrip(b"=").decode()


# -- tokens ------------------------------------------------------------------------------------


def test_a_token_round_trips(vault: Vault) -> None:
    token = token_for(vault, tenant="acme")
    assert read_token(vault, token, now=NOW) == UnsubscribeToken(
        tenant="acme",
        channel="email",
        address="ada@example.com",
        execution_id=EXECUTION,
        expires_at=LATER,
    )


def test_a_global_token_without_an_execution_round_trips(vault: Vault) -> None:
    token = token_for(vault, execution_id=None, channel="sms", address="+14155550100")
    read = read_token(vault, token, now=NOW)
    assert (read.tenant, read.execution_id, read.channel) == (None, None, "sms")
    assert read.address == "+14155550100"


def test_a_token_is_url_safe_and_hides_the_address(vault: Vault) -> None:
    token = token_for(vault)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert "=" not in token
    assert b"ada" not in unb64(token)
    assert "ada" not in token
    assert len(token) < 200
    # Sealed with a fresh nonce each time: two links to one address do not match.
    assert token_for(vault) != token


def test_expiry_is_kept_to_the_second(vault: Vault) -> None:
    token = token_for(vault, expires_at=LATER + timedelta(microseconds=999_999))
    assert read_token(vault, token, now=NOW).expires_at == LATER


def test_an_expired_token_is_refused(vault: Vault) -> None:
    token = token_for(vault)
    assert read_token(vault, token, now=LATER - timedelta(seconds=1)).address == "ada@example.com"
    with pytest.raises(ExpiredToken) as caught:
        read_token(vault, token, now=LATER)
    assert caught.value.code == "bad_token"
    assert "expired" in caught.value.message
    assert isinstance(caught.value, InvalidToken)
    assert isinstance(caught.value, ConfigError)


@pytest.mark.parametrize("position", [0, 1, 5, 17, 30, -17, -1])
def test_a_tampered_token_is_refused(vault: Vault, position: int) -> None:
    blob = bytearray(unb64(token_for(vault)))
    blob[position] ^= 0x01
    with pytest.raises(InvalidToken) as caught:
        read_token(vault, b64(bytes(blob)), now=NOW)
    assert caught.value.message == "This unsubscribe link is not valid."


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "a",
        "abcde",
        "not a token",
        "%2F%2F",
        "abc=",
        "A" * 2000,
        b64(b"\x01" + b"\x00" * 40),
        b64(os.urandom(120)),
    ],
)
def test_garbage_is_refused(vault: Vault, garbage: str) -> None:
    with pytest.raises(InvalidToken):
        read_token(vault, garbage, now=NOW)


def test_a_token_of_another_key_is_refused(vault: Vault) -> None:
    with pytest.raises(InvalidToken) as caught:
        read_token(new_vault(), token_for(vault), now=NOW)
    assert "ada" not in caught.value.message


def test_a_blob_sealed_for_another_purpose_is_refused(vault: Vault) -> None:
    payload = {"c": "email", "a": "ada@example.com", "x": int(LATER.timestamp())}
    credentials = b64(vault.encrypt(payload, aad=b"adapter:1234"))
    with pytest.raises(InvalidToken):
        read_token(vault, credentials, now=NOW)
    # The same payload under the unsubscribe aad is a token: only the aad made the difference.
    assert read_token(vault, b64(vault.encrypt(payload, aad=AAD)), now=NOW).tenant is None


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"c": "email", "a": "ada@example.com"},
        {"c": "email", "a": 5, "x": 1},
        {"c": "email", "a": "ada@example.com", "x": "soon"},
        {"c": "email", "a": "ada@example.com", "x": True},
        {"c": "email", "a": "ada@example.com", "x": 10**20},
        {"c": "email", "a": "ada@example.com", "x": 1, "e": "not-a-uuid"},
        {"c": "email", "a": "ada@example.com", "x": 1, "t": 7},
    ],
)
def test_a_sealed_payload_of_the_wrong_shape_is_refused(
    vault: Vault, payload: dict[str, Any]
) -> None:
    with pytest.raises(InvalidToken):
        read_token(vault, b64(vault.encrypt(payload, aad=AAD)), now=NOW)


def test_a_retired_key_still_reads_old_tokens() -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    token = token_for(Vault(old_key))
    rotated = Vault(new_key, [old_key])
    assert read_token(rotated, token, now=NOW).address == "ada@example.com"
    with pytest.raises(InvalidToken):
        read_token(Vault(new_key), token, now=NOW)
    # New tokens are sealed under the new key.
    assert read_token(Vault(new_key), token_for(rotated), now=NOW).execution_id == EXECUTION


def test_tokens_need_aware_times(vault: Vault) -> None:
    with pytest.raises(ValueError, match="aware"):
        token_for(vault, expires_at=datetime(2026, 3, 1))
    with pytest.raises(ValueError, match="aware"):
        read_token(vault, token_for(vault), now=datetime(2026, 1, 5))


# -- headers -----------------------------------------------------------------------------------


def test_headers_with_a_mailto() -> None:
    assert unsubscribe_headers(
        base_url="https://mail.example.com/", token="TOKEN", mailto="unsubscribe@example.com"
    ) == {
        "List-Unsubscribe": "<https://mail.example.com/u/TOKEN>, <mailto:unsubscribe@example.com>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }


def test_headers_without_a_mailto_and_under_a_path() -> None:
    assert unsubscribe_headers(
        base_url="https://example.com/dripd", token="abc-_1", mailto=None
    ) == {
        "List-Unsubscribe": "<https://example.com/dripd/u/abc-_1>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    assert unsubscribe_headers(base_url="https://example.com", token="t", mailto="")[
        "List-Unsubscribe"
    ] == ("<https://example.com/u/t>")


def test_a_mailto_uri_is_kept_as_it_is() -> None:
    headers = unsubscribe_headers(
        base_url="https://example.com",
        token="t",
        mailto="mailto:leave@example.com?subject=unsubscribe",
    )
    assert headers["List-Unsubscribe"] == (
        "<https://example.com/u/t>, <mailto:leave@example.com?subject=unsubscribe>"
    )


@pytest.mark.parametrize(
    ("base_url", "mailto", "key"),
    [
        ("https://example.com/a>b", None, "unsubscribe.base_url"),
        ("https://example.com/a,b", None, "unsubscribe.base_url"),
        ("https://example.com", "a@example.com>, <https://evil.example", "unsubscribe.mailto"),
        ("https://example.com", "a@example.com\r\nBcc: x@example.com", "unsubscribe.mailto"),
    ],
)
def test_values_that_would_break_the_header_are_refused(
    base_url: str, mailto: str | None, key: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{key}: "):
        unsubscribe_headers(base_url=base_url, token="t", mailto=mailto)


# -- feedback events ---------------------------------------------------------------------------


async def sent_execution(db: asyncpg.Pool, *, address: str = "Ada@Example.com") -> uuid.UUID:
    """An execution of a one-email sequence, marked sent as the recorder would."""
    await apply_text(db, one_email("welcome"))
    enrollment = await api.enroll(
        db, tenant=None, sequence_key="welcome", subscriber_id="ada", data={"email": address}
    )
    execution_id: uuid.UUID = await db.fetchval(
        "UPDATE dripd.step_executions SET status = 'sent', finished_at = now(), "
        "channel = 'email', provider = 'smtp', adapter_id = $2, recipient = $3, "
        "provider_message_id = '<m1@example.com>' WHERE enrollment_id = $1 RETURNING id",
        enrollment.id,
        ADAPTER,
        address.lower(),
    )
    return execution_id


ADAPTER = uuid.UUID("5e1d7a3b-9c2f-4e8a-b1d0-6f4a2c8e9b17")


async def events(db: asyncpg.Pool) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT * FROM dripd.message_events WHERE type <> 'sent' ORDER BY id"
    )
    return rows


async def test_feedback_copies_the_message_from_its_execution(pool: asyncpg.Pool) -> None:
    execution_id = await sent_execution(pool)
    enrollment_id = await pool.fetchval(
        "SELECT enrollment_id FROM dripd.step_executions WHERE id = $1", execution_id
    )
    recorded = await feedback.record_feedback(
        pool, tenant=None, execution_id=execution_id, type="bounced", reason="550 5.1.1", now=NOW
    )
    assert recorded is not None
    assert (recorded.channel, recorded.recipient) == ("email", "ada@example.com")
    [event] = await events(pool)
    assert recorded.event_id == event["id"]
    assert dict(event) | {"id": None} == {
        "id": None,
        "tenant_key": None,
        "execution_id": execution_id,
        "enrollment_id": enrollment_id,
        "type": "bounced",
        "channel": "email",
        "provider": "smtp",
        "adapter_id": ADAPTER,
        "recipient": "ada@example.com",
        "reason": "550 5.1.1",
        "provider_message_id": "<m1@example.com>",
        "data": "{}",
        "occurred_at": NOW,
        "provider_event_id": None,
    }


async def test_feedback_stays_in_its_tenant_scope(pool: asyncpg.Pool) -> None:
    execution_id = await sent_execution(pool)
    for tenant, known in ((None, uuid.uuid4()), ("acme", execution_id)):
        assert not await feedback.record_feedback(
            pool, tenant=tenant, execution_id=known, type="opened", reason=None, now=NOW
        )
    await pool.execute("UPDATE dripd.step_executions SET tenant_key = 'acme'")
    assert not await feedback.record_feedback(
        pool, tenant=None, execution_id=execution_id, type="opened", reason=None, now=NOW
    )
    assert await feedback.record_feedback(
        pool, tenant="acme", execution_id=execution_id, type="opened", reason=None, now=NOW
    )
    assert [(e["tenant_key"], e["type"]) for e in await events(pool)] == [("acme", "opened")]


async def test_feedback_once_records_a_type_once(pool: asyncpg.Pool) -> None:
    execution_id = await sent_execution(pool)
    record = {"tenant": None, "execution_id": execution_id, "reason": None, "now": NOW}
    assert await feedback.record_feedback(pool, type="clicked", **record)
    assert await feedback.record_feedback(pool, type="clicked", **record)
    assert await feedback.record_feedback(pool, type="unsubscribed", once=True, **record)
    assert not await feedback.record_feedback(pool, type="unsubscribed", once=True, **record)
    assert [e["type"] for e in await events(pool)] == ["clicked", "clicked", "unsubscribed"]


@pytest.mark.parametrize("kind", ["sent", "failed", "deferred", "nonsense"])
async def test_feedback_of_another_type_is_refused(pool: asyncpg.Pool, kind: str) -> None:
    with pytest.raises(ConfigError, match=f"^type: '{kind}' is not a feedback event"):
        await feedback.record_feedback(
            pool, tenant=None, execution_id=uuid.uuid4(), type=kind, reason=None, now=NOW
        )


# -- the HTTP endpoint -------------------------------------------------------------------------


async def _ready() -> dict[str, Any]:
    return {"ready": True}


class Site:
    def __init__(self, client: httpx.AsyncClient, vault: Vault | None, pool: asyncpg.Pool) -> None:
        self.client, self.vault, self.pool = client, vault, pool

    def token(self, **overrides: Any) -> str:
        assert self.vault is not None
        return token_for(self.vault, **overrides)

    async def suppressions(self) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self.pool.fetch(
            "SELECT tenant_key, channel, address, reason, source FROM dripd.suppressions"
        )
        return rows


async def serve(pool: asyncpg.Pool, vault: Vault | None) -> AsyncIterator[Site]:
    ctx = HttpContext(
        pool=pool,
        config=config.from_dict({}),
        clock=ManualClock(NOW),
        metrics=Metrics(),
        vault=vault,
    )
    server = HttpServer(build_app(metrics=ctx.metrics, readiness=_ready, routes=routes(ctx)))
    async with (
        background(server.serve, "127.0.0.1", 0),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
    ):
        yield Site(client, vault, pool)


@pytest.fixture
async def site(pool: asyncpg.Pool, vault: Vault) -> AsyncIterator[Site]:
    async for running in serve(pool, vault):
        yield running


@pytest.fixture
async def keyless(pool: asyncpg.Pool) -> AsyncIterator[Site]:
    async for running in serve(pool, None):
        yield running


ONE_CLICK = {"content-type": "application/x-www-form-urlencoded"}


async def test_the_page_asks_with_a_form_that_posts_one_click(site: Site) -> None:
    response = await site.client.get(f"/u/{site.token()}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    assert '<form method="post">' in page
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page
    assert '<button type="submit">' in page
    assert "<script" not in page
    assert "ada@example.com" not in page
    assert "script-src" not in response.headers["content-security-policy"]
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert await site.suppressions() == []  # a GET (a link scanner) changes nothing


async def test_one_click_suppresses_and_records_the_unsubscribe(site: Site) -> None:
    execution_id = await sent_execution(site.pool)
    token = site.token(address="ada@example.com", execution_id=execution_id)
    response = await site.client.post(
        f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
    )
    assert response.status_code == 200
    assert "You are unsubscribed" in response.text
    assert [dict(r) for r in await site.suppressions()] == [
        {
            "tenant_key": None,
            "channel": "email",
            "address": "ada@example.com",
            "reason": "unsubscribe",
            "source": "one_click",
        }
    ]
    [event] = await events(site.pool)
    assert (event["type"], event["execution_id"], event["reason"]) == (
        "unsubscribed",
        execution_id,
        "one_click",
    )
    assert (event["channel"], event["recipient"], event["occurred_at"]) == (
        "email",
        "ada@example.com",
        NOW,
    )


async def test_a_second_post_is_fine_and_changes_nothing(site: Site) -> None:
    execution_id = await sent_execution(site.pool)
    token = site.token(execution_id=execution_id)
    for _ in range(2):
        response = await site.client.post(
            f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
        )
        assert response.status_code == 200
    assert len(await site.suppressions()) == 1
    assert len(await events(site.pool)) == 1


async def test_one_click_as_multipart_form_data(site: Site) -> None:
    token = site.token(execution_id=None, tenant="acme", address="Ada@Example.COM")
    response = await site.client.post(
        f"/u/{token}", files={"List-Unsubscribe": (None, "One-Click")}
    )
    assert response.status_code == 200
    [row] = await site.suppressions()
    assert (row["tenant_key"], row["address"]) == ("acme", "ada@example.com")
    assert await events(site.pool) == []  # no execution named: no message event


async def test_the_form_the_page_posts_is_accepted(site: Site) -> None:
    token = site.token(execution_id=None)
    response = await site.client.post(f"/u/{token}", data={"List-Unsubscribe": "One-Click"})
    assert response.status_code == 200
    assert len(await site.suppressions()) == 1


async def test_a_json_client_gets_json(site: Site) -> None:
    response = await site.client.post(
        f"/u/{site.token(execution_id=None)}",
        content=b"List-Unsubscribe=One-Click",
        headers={**ONE_CLICK, "accept": "application/json"},
    )
    assert (response.status_code, response.json()) == (200, {"unsubscribed": True})
    bad = await site.client.post(
        "/u/nonsense", content=b"List-Unsubscribe=One-Click", headers={"accept": "application/json"}
    )
    assert bad.status_code == 400
    assert bad.json() == {
        "error": {"code": "bad_token", "message": "This unsubscribe link is not valid."}
    }


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("kind", ["garbage", "expired", "other key"])
async def test_a_bad_or_expired_token_is_400_and_changes_nothing(
    site: Site, method: str, kind: str
) -> None:
    execution_id = await sent_execution(site.pool)
    token = {
        "garbage": "bm90LWEtdG9rZW4",
        "expired": site.token(execution_id=execution_id, expires_at=NOW),
        "other key": token_for(new_vault(), execution_id=execution_id),
    }[kind]
    response = await site.client.request(
        method, f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
    )
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert ("expired" in response.text) == (kind == "expired")
    assert await site.suppressions() == []
    assert await events(site.pool) == []


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"", ONE_CLICK),
        (b"List-Unsubscribe=Yes", ONE_CLICK),
        (b"list-unsubscribe=one-click", ONE_CLICK),
        (b"Unsubscribe=One-Click", ONE_CLICK),
        (b"List-Unsubscribe=One-Click", {"content-type": "text/plain"}),
        (b'{"List-Unsubscribe": "One-Click"}', {"content-type": "application/json"}),
        (b"List-Unsubscribe=One-Click", {}),
        (b"List-Unsubscribe=One-Click\xff", ONE_CLICK),
        (b"List-Unsubscribe=One-Click", {"content-type": "multipart/form-data; boundary=x"}),
    ],
)
async def test_a_post_without_the_one_click_body_is_400(
    site: Site, body: bytes, headers: dict[str, str]
) -> None:
    response = await site.client.post(f"/u/{site.token()}", content=body, headers=headers)
    assert response.status_code == 400
    assert await site.suppressions() == []


async def test_a_huge_body_is_refused(site: Site) -> None:
    body = b"List-Unsubscribe=One-Click&pad=" + b"x" * 70_000
    response = await site.client.post(f"/u/{site.token()}", content=body, headers=ONE_CLICK)
    assert response.status_code == 413
    assert await site.suppressions() == []


async def test_what_the_page_shows_is_escaped(site: Site) -> None:
    response = await site.client.get(f"/u/{site.token(channel='<b>x</b>')}")
    assert response.status_code == 200
    assert "&lt;b&gt;x&lt;/b&gt;" in response.text
    assert "<b>x</b>" not in response.text


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_without_an_encryption_key_unsubscribe_is_unavailable(
    keyless: Site, method: str
) -> None:
    token = token_for(new_vault())
    page = await keyless.client.request(
        method, f"/u/{token}", content=b"List-Unsubscribe=One-Click", headers=ONE_CLICK
    )
    assert page.status_code == 503
    assert "DRIPD_ENCRYPTION_KEY" in page.text
    wanted_json = await keyless.client.request(
        method,
        f"/u/{token}",
        content=b"List-Unsubscribe=One-Click",
        headers={**ONE_CLICK, "accept": "application/json"},
    )
    assert wanted_json.status_code == 503
    assert wanted_json.json()["error"]["code"] == "unavailable"
    assert "DRIPD_ENCRYPTION_KEY" in wanted_json.json()["error"]["message"]
    assert await keyless.suppressions() == []


def test_a_vault_error_never_escapes_as_a_credentials_error(vault: Vault) -> None:
    # The vault's own messages name key ids; a token reader says only "not valid".
    with pytest.raises(InvalidToken) as caught:
        read_token(vault, token_for(new_vault()), now=NOW)
    assert not isinstance(caught.value, CredentialsError)
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
