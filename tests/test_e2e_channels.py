"""End to end: `dripd run` as a subprocess sends one subscriber's sequence over every kind of
channel (Postmark email, Twilio SMS, a Slack webhook, a Standard Webhooks endpoint, Postgres
NOTIFY), and a Postmark bounce posted to the daemon suppresses the address, so the sequence's
last email is skipped.

One local HTTP server in the test stands in for every provider API (the adapters' `base_url`
or URL point at it) and records each request it gets. The adapters are added, the sequence
applied, the subscriber enrolled and the event sent with the CLI, as an operator would. Time
is real (the daemon is another process): every wait is for a state, in the database or at the
stub, with a deadline that only says "it never happened".
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import asyncpg
import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from support import Launch, daemon_env, statuses, wait_for

from dripd.channels.credentials import generate_key
from dripd.http.app import HttpServer

pytestmark = pytest.mark.slow

KEY = "channels"
WHO = "ann"
EMAIL = "ann@example.com"
PHONE = "+14155550123"
FROM_NUMBER = "+15005550006"
SENDER = "drips@example.com"
NOTIFY_CHANNEL = "e2e_events"

SEQUENCE = """
[sequence]
key = "channels"

[[steps]]
key = "mail"
channel = "email"
after = "0s"
subject = "Hello {{ first_name }}"
text = "Hi {{ first_name }}, welcome."

[[steps]]
key = "text"
channel = "sms"
after = "0s"
body = "Your code is 1234, {{ first_name }}"

[[steps]]
key = "chat"
channel = "chat"
after = "0s"
body = "New subscriber: {{ first_name }}"

[[steps]]
key = "hook"
channel = "webhook"
after = "0s"
body = "signed up: {{ first_name }}"

[[steps]]
key = "notify"
channel = "pubsub"
after = "0s"
body = "enrolled: {{ first_name }}"

[[steps]]
key = "wait"
wait_for = { event = "go", timeout = "30d" }

[[steps]]
key = "again"
channel = "email"
after = "0s"
subject = "Still there?"
text = "Hi again"
"""


@dataclass(frozen=True)
class Seen:
    """One request the stub provider got."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool | None = None  # the Standard Webhooks signature held (webhook only)


class Providers:
    """The provider APIs, on one Starlette app: Postmark's batch endpoint, Twilio's Messages
    create, a Slack incoming webhook and a Standard Webhooks receiver. Every request is
    recorded, answered or not."""

    def __init__(self, *, account_sid: str, webhook_secret: str) -> None:
        self.account_sid = account_sid
        self.webhook_secret = webhook_secret
        self.seen: list[Seen] = []
        self.app = Starlette(
            routes=[
                Route("/email/batch", self.postmark_batch, methods=["POST"]),
                Route("/2010-04-01/Accounts/{sid}/Messages.json", self.twilio, methods=["POST"]),
                Route("/services/T/B/x", self.slack, methods=["POST"]),
                Route("/hook", self.hook, methods=["POST"]),
                Route("/{rest:path}", self.other, methods=["GET", "POST", "PUT", "DELETE"]),
            ]
        )

    async def _record(self, request: Request, verified: bool | None = None) -> Seen:
        seen = Seen(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=await request.body(),
            verified=verified,
        )
        self.seen.append(seen)
        return seen

    def at(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    async def postmark_batch(self, request: Request) -> Response:
        seen = await self._record(request)
        messages = json.loads(seen.body)
        return JSONResponse(
            [
                {
                    "ErrorCode": 0,
                    "Message": "OK",
                    "MessageID": str(uuid.uuid4()),
                    "SubmittedAt": "2026-01-02T03:04:05.1234567-05:00",
                    "To": m["To"],
                }
                for m in messages
            ]
        )

    async def twilio(self, request: Request) -> Response:
        seen = await self._record(request)
        sid = "SM" + secrets.token_hex(16)
        form = {k: v[0] for k, v in parse_qs(seen.body.decode()).items()}
        return JSONResponse(
            {
                "sid": sid,
                "account_sid": request.path_params["sid"],
                "status": "queued",
                "to": form.get("To"),
                "from": form.get("From"),
                "body": form.get("Body"),
                "error_code": None,
                "error_message": None,
            },
            status_code=201,
        )

    async def slack(self, request: Request) -> Response:
        await self._record(request)
        return PlainTextResponse("ok")

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        try:
            Webhook(self.webhook_secret).verify(body, dict(request.headers))
            verified = True
        except WebhookVerificationError:
            verified = False
        await self._record(request, verified)
        # A refused signature is a permanent failure the test sees (401 would pause).
        return Response(status_code=204 if verified else 400)

    async def other(self, request: Request) -> Response:
        await self._record(request)
        return PlainTextResponse("no such endpoint", status_code=404)


async def cli(*argv: str, env: dict[str, str], stdin: bytes | None = None) -> dict[str, Any]:
    """`dripd <argv> --json` as a subprocess; its JSON answer (exit 0 asserted)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dripd.cli", *argv, "--json",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**daemon_env(), **env},
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode == 0, f"dripd {argv}: {proc.returncode} {err.decode()}"
    result: dict[str, Any] = json.loads(out)
    return result


async def by_step(pool: asyncpg.Pool) -> dict[str, asyncpg.Record]:
    """The subscriber's executions by step key (one each here)."""
    rows = await pool.fetch(
        "SELECT e.*, s.key AS step_key FROM dripd.step_executions e "
        "JOIN dripd.steps s ON s.id = e.step_id ORDER BY e.created_at, s.position"
    )
    found: dict[str, asyncpg.Record] = {}
    for row in rows:
        assert row["step_key"] not in found, f"two executions of {row['step_key']}"
        found[row["step_key"]] = row
    return found


async def written(pool: asyncpg.Pool) -> tuple[int, int]:
    """(message events, suppressions): what a webhook could write."""
    events = await pool.fetchval("SELECT count(*) FROM dripd.message_events")
    suppressions = await pool.fetchval("SELECT count(*) FROM dripd.suppressions")
    return int(events), int(suppressions)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def bounce(bounce_id: int, message_id: str, email: str) -> dict[str, Any]:
    """A Postmark Bounce webhook record (postmarkapp.com/developer/webhooks/bounce-webhook)."""
    return {
        "RecordType": "Bounce",
        "MessageStream": "outbound",
        "ID": bounce_id,
        "Type": "HardBounce",
        "TypeCode": 1,
        "Name": "Hard bounce",
        "Tag": "",
        "MessageID": message_id,
        "Metadata": {},
        "ServerID": 23,
        "Description": (
            "The server was unable to deliver your message (ex: unknown user, mailbox not found)."
        ),
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": email,
        "From": SENDER,
        "BouncedAt": "2026-01-02T03:05:06.1234567Z",
        "DumpAvailable": False,
        "Inactive": True,
        "CanActivate": True,
        "Subject": "Hello Ann",
        "Content": "",
    }


@pytest.mark.timeout(240)
async def test_every_channel_and_a_bounce_through_dripd_run(
    dsn: str, pool: asyncpg.Pool, launch: Launch, tmp_path: Path
) -> None:
    env = {"DRIPD_ENCRYPTION_KEY": generate_key(), "DRIPD_DSN": dsn}
    account_sid = "AC" + secrets.token_hex(16)
    auth_token = secrets.token_hex(16)
    server_token = "pm-server-" + secrets.token_hex(8)
    hook_user, hook_password = "dripd-" + secrets.token_hex(4), secrets.token_urlsafe(24)
    webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    providers = Providers(account_sid=account_sid, webhook_secret=webhook_secret)
    server = HttpServer(providers.app, graceful_timeout=1.0)

    notified: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: notified.append(args[3]))

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, "127.0.0.1", 0)
            stub = f"http://127.0.0.1:{server.port}"

            async def add(name: str, channel: str, provider: str, config: dict[str, Any],
                          credentials: dict[str, Any] | None = None) -> None:  # fmt: skip
                argv = ["adapter", "add", name, "--channel", channel, "--provider", provider,
                        "--default", "--config", json.dumps(config)]  # fmt: skip
                if credentials is not None:
                    path = tmp_path / f"{name}.json"
                    path.write_text(json.dumps(credentials))
                    argv += ["--credentials-file", str(path)]
                await cli(*argv, env=env)

            await add("pm", "email", "postmark", {"base_url": stub, "from": SENDER},
                      {"server_token": server_token, "webhook_username": hook_user,
                       "webhook_password": hook_password})  # fmt: skip
            await add("tw", "sms", "twilio", {"base_url": stub, "from": FROM_NUMBER},
                      {"account_sid": account_sid, "auth_token": auth_token})  # fmt: skip
            await add("team", "chat", "slack", {}, {"url": f"{stub}/services/T/B/x"})
            await add("crm", "webhook", "webhook", {"url": f"{stub}/hook"},
                      {"secret": webhook_secret})  # fmt: skip
            await add("events", "pubsub", "postgres", {"channel": NOTIFY_CHANNEL})
            flow = tmp_path / "channels.toml"
            flow.write_text(SEQUENCE)
            await cli("apply", str(flow), env=env)

            d = launch(
                "d",
                http=True,
                poll_interval="2s",
                sections={"hooks": {"allow_http": True, "allowed_networks": ["127.0.0.0/8"]}},
            )
            # The listener's port is chosen by `launch`: the public URL joins the config after.
            public_url = f"http://127.0.0.1:{d.http_port}"
            with d.config.open("a") as config:
                config.write(f'\n[webhooks]\npublic_url = "{public_url}"\n')
            d.env = {"DRIPD_ENCRYPTION_KEY": env["DRIPD_ENCRYPTION_KEY"]}
            await d.start()

            data = json.dumps({"email": EMAIL, "phone": PHONE, "first_name": "Ann"})
            await cli("enroll", KEY, WHO, "--data", data, env=env)

            # Steps 1-5 sent, and the wait reached.
            async def waiting() -> dict[str, asyncpg.Record] | None:
                rows = await by_step(pool)
                sent = all(rows.get(k, {}).get("status") == "sent"
                           for k in ("mail", "text", "chat", "hook", "notify"))  # fmt: skip
                return rows if sent and "wait" in rows else None

            try:
                rows = await wait_for(waiting, timeout=90)
            except AssertionError:
                raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
            await wait_for(lambda: notified, timeout=30)
            mail, text, chat, hook = (rows[k] for k in ("mail", "text", "chat", "hook"))
            assert rows["wait"]["status"] == "scheduled"
            assert rows["wait"]["waiting_for"] is not None

            # Postmark: one batch of one message.
            [pm] = providers.at("/email/batch")
            assert pm.method == "POST"
            assert pm.headers["x-postmark-server-token"] == server_token
            assert pm.headers["content-type"].startswith("application/json")
            [message] = json.loads(pm.body)
            assert message["From"] == SENDER
            assert message["To"] == EMAIL
            assert message["Subject"] == "Hello Ann"
            assert message["TextBody"] == "Hi Ann, welcome."
            assert message["MessageStream"] == "outbound"
            assert message["Metadata"]["dripd_execution"] == str(mail["id"])
            headers = {h["Name"]: h["Value"] for h in message["Headers"]}
            assert headers["X-Dripd-Idempotency-Key"] == f"{mail['id']}:0"
            assert mail["provider"] == "postmark"
            assert mail["recipient"] == EMAIL
            assert mail["provider_message_id"]  # the stub's MessageID, checked below
            pm_message_id = mail["provider_message_id"]
            uuid.UUID(pm_message_id)

            # Twilio: Basic auth, the documented form fields.
            [tw] = providers.at(f"/2010-04-01/Accounts/{account_sid}/Messages.json")
            assert tw.method == "POST"
            assert tw.headers["authorization"] == basic(account_sid, auth_token)
            assert tw.headers["content-type"].startswith("application/x-www-form-urlencoded")
            form = {k: v for k, [v] in parse_qs(tw.body.decode(), strict_parsing=True).items()}
            assert form == {
                "To": PHONE,
                "From": FROM_NUMBER,
                "Body": "Your code is 1234, Ann",
                "StatusCallback": f"{public_url}/webhooks/twilio/tw",
            }
            assert tw.headers["i-twilio-idempotency-token"] == f"{text['id']}:0"
            assert text["provider"] == "twilio"
            assert text["recipient"] == PHONE
            assert text["provider_message_id"].startswith("SM")

            # Slack: the text as JSON, the recipient not sent.
            [sl] = providers.at("/services/T/B/x")
            assert sl.method == "POST"
            assert sl.headers["content-type"].startswith("application/json")
            assert json.loads(sl.body) == {"text": "New subscriber: Ann"}
            assert chat["provider"] == "slack"

            # The webhook: signed (verified by the standardwebhooks library), its id the
            # execution's idempotency key, the body dripd's envelope.
            [wh] = providers.at("/hook")
            assert wh.method == "POST"
            assert wh.verified is True
            assert wh.headers["webhook-id"] == f"{hook['id']}:0"
            assert hook["provider_message_id"] == f"{hook['id']}:0"
            envelope = json.loads(wh.body)
            assert envelope["type"] == "dripd.message"
            assert envelope["data"]["execution_id"] == str(hook["id"])
            assert envelope["data"]["to"] == WHO
            assert envelope["data"]["text"] == "signed up: Ann"
            assert envelope["data"]["metadata"]["step_key"] == "hook"

            # NOTIFY: heard by the test's own LISTEN.
            [note] = notified
            payload = json.loads(note)
            assert payload["execution_id"] == str(rows["notify"]["id"])
            assert payload["body"] == "enrolled: Ann"
            assert payload["metadata"]["step_key"] == "notify"
            assert payload["to"] == WHO

            # Nothing else reached the stub (no retries, no strays).
            assert len(providers.seen) == 4, [(s.method, s.path) for s in providers.seen]

            # A Postmark bounce, with the adapter's basic auth: recorded, suppresses.
            hooks_url = f"{public_url}/webhooks/postmark/pm"
            async with httpx.AsyncClient(timeout=30.0) as client:
                genuine = await client.post(
                    hooks_url,
                    content=json.dumps(bounce(4323372036854775807, pm_message_id, EMAIL)),
                    headers={"Authorization": basic(hook_user, hook_password),
                             "Content-Type": "application/json"},
                )  # fmt: skip
                assert genuine.status_code == 200, (genuine.text, d.tail())
                counts = genuine.json()
                assert counts["recorded"] == 1, counts
                assert counts["matched"] == 1, counts
                assert counts["suppressed"] == 1, counts
                suppression = await pool.fetchrow(
                    "SELECT * FROM dripd.suppressions WHERE channel = 'email' AND address = $1",
                    EMAIL,
                )
                assert suppression is not None
                assert suppression["reason"] == "bounce"
                assert suppression["tenant_key"] is None
                assert suppression["source"] == "postmark webhook"
                event = await pool.fetchrow(
                    "SELECT * FROM dripd.message_events WHERE type = 'bounced'"
                )
                assert event["execution_id"] == mail["id"]
                assert event["provider_event_id"] == "postmark-bounce:4323372036854775807"
                before = await written(pool)

                # Postmark delivering the same webhook again changes nothing.
                redelivered = await client.post(
                    hooks_url,
                    content=json.dumps(bounce(4323372036854775807, pm_message_id, EMAIL)),
                    headers={"Authorization": basic(hook_user, hook_password),
                             "Content-Type": "application/json"},
                )  # fmt: skip
                assert redelivered.status_code == 200, redelivered.text
                assert redelivered.json()["duplicates"] == 1, redelivered.json()
                assert redelivered.json()["recorded"] == 0, redelivered.json()
                assert await written(pool) == before

                # A forged one (a wrong password) about another address: 401, nothing kept.
                forged = await client.post(
                    hooks_url,
                    content=json.dumps(bounce(17, pm_message_id, "bob@example.com")),
                    headers={"Authorization": basic(hook_user, hook_password + "x"),
                             "Content-Type": "application/json"},
                )  # fmt: skip
                assert forged.status_code == 401, forged.text
                assert await written(pool) == before
                assert not await pool.fetchval(
                    "SELECT count(*) FROM dripd.suppressions WHERE address = 'bob@example.com'"
                )

            # The event releases the wait; the last email is skipped, not sent.
            released = await cli("event", WHO, "go", env=env)
            assert len(released["released"]) == 1, released

            async def last() -> asyncpg.Record | None:
                row = (await by_step(pool)).get("again")
                return row if row is not None and row["status"] != "scheduled" else None

            try:
                again = await wait_for(last, timeout=60)
            except AssertionError:
                raise AssertionError(f"{await statuses(pool)}\n{d.tail()}") from None
            assert (again["status"], again["reason"]) == ("skipped", "suppressed"), d.tail()
            assert again["recipient"] == EMAIL
            await wait_for(
                lambda: pool.fetchval(
                    "SELECT status = 'completed' FROM dripd.enrollments WHERE subscriber_id = $1",
                    WHO,
                ),
                timeout=30,
            )
            assert len(providers.at("/email/batch")) == 1
            assert len(providers.seen) == 4

            d.signal(signal.SIGTERM)
            assert await d.wait(60) == 0, d.tail()
            log = d.log.read_text()
            for secret in (server_token, auth_token, hook_password, webhook_secret):
                assert secret not in log
            tg.cancel_scope.cancel()
    finally:
        await listener.close()
