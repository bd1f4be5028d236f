"""Content through the daemon (issue 14): MJML with a text part, spintax, Python templates,
`vars`, and short links with dripd's own redirect (click → event → a branch taken)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import templatemods
from support import (
    SmtpSink,
    add_adapter,
    apply_text,
    enroll_at,
    executions,
    free_port,
    has_status,
    outbox_adapters,
    outbox_messages,
    running_daemon,
    smtp_config,
    wait_for,
)

from dripd import api
from dripd.clock import ManualClock
from dripd.content.compose import compose
from dripd.content.liquid import compile_template
from dripd.content.spintax import seed_for

START = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
SHORT = re.compile(r"http://127\.0\.0\.1:\d+/l/([A-Za-z0-9]{10})")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
async def outbox(pool: asyncpg.Pool, tmp_path: Path) -> Path:
    return await outbox_adapters(pool, tmp_path / "outbox.jsonl")


def sent(outbox: Path, step: str | None = None) -> list[dict[str, Any]]:
    return [m for m in outbox_messages(outbox) if step is None or m["metadata"]["step_key"] == step]


async def finished(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> bool:
    return await has_status(pool, enrollment_id, "completed")


# -- MJML, vars, spintax, Python templates ----------------------------------------------------

MJML_SEQUENCE = """
[sequence]
key = "mj"
vars = { brand = "Acme", tone = "sequence", owner = "sequence" }

[[steps]]
key = "hello"
channel = "email"
vars = { tone = "step" }
subject = "{{ brand }} / {{ tone }} / {{ owner }} / {{ step_key }}"
mjml = '''
<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-text>Hi {{ first_name }}, from {{ brand }}.</mj-text>
        <mj-button href="https://example.com/start?plan={{ plan }}">Start</mj-button>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
'''
"""


async def test_an_mjml_step_goes_out_compiled_with_a_text_part_and_vars_in_their_order(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, MJML_SEQUENCE)
    async with running_daemon(dsn, tmp_path, clock=clock):
        # data < sequence vars < step vars < dripd's names
        data = {"brand": "Data", "tone": "data", "owner": "data", "plan": "<pro>"}
        enrollment = await enroll_at(pool, clock, "mj", "ann", first_name="<Ann>", **data)
        await wait_for(lambda: finished(pool, enrollment.id))
    [message] = sent(outbox)
    assert message["subject"] == "Acme / step / sequence / hello"
    html = message["html"]
    assert "<table" in html  # compiled by mrml
    assert "<mj-" not in html
    assert "Hi &lt;Ann&gt;, from Acme." in html  # values escaped as for html
    assert 'href="https://example.com/start?plan=&lt;pro&gt;"' in html
    text = message["text"]
    assert "Hi <Ann>, from Acme." in text
    assert "Start (https://example.com/start?plan=<pro>)" in text
    assert "{" not in text  # no CSS in the text part


async def test_spintax_is_deterministic_per_execution_and_replay() -> None:
    template = {"text": compile_template("{a|b|c|d|e|f|g|h} {{ n }}", field="text")}
    limiter = __import__("anyio").CapacityLimiter(1)
    execution = uuid.uuid4()

    async def spun(replay: int, execution_id: uuid.UUID = execution) -> str:
        def seed(field: str) -> bytes:
            return seed_for(execution_id, replay, field)

        fields = await compose(template, {"n": 1}, limiter=limiter, spintax=seed)
        return fields["text"]

    first = await spun(0)
    # A retry of the execution (same id, same replay) says the same words, always.
    assert all([await spun(0) == first for _ in range(20)])
    # A replay, or another execution, may say others.
    assert len({await spun(replay) for replay in range(40)}) > 1
    assert len({await spun(0, uuid.uuid4()) for _ in range(40)}) > 1


SPIN_SEQUENCE = """
[sequence]
key = "spin"

[[steps]]
key = "a"
channel = "sms"
spintax = true
body = "{Hi|Hello|Hey} {{ first_name }} {% if vip %}{VIP|friend}{% endif %}"
"""


async def test_spintax_through_the_daemon_and_unbalanced_data_left_as_rendered(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, SPIN_SEQUENCE)
    async with running_daemon(dsn, tmp_path, clock=clock) as daemon:
        good = [
            await enroll_at(
                pool, clock, "spin", f"s{n}", phone=f"+1415555{n:04d}", vip=True, first_name=""
            )
            for n in range(12)
        ]
        odd = await enroll_at(
            pool, clock, "spin", "odd", phone="+14155559999", first_name="Bo}b", vip=False
        )
        for e in [*good, odd]:
            await wait_for(lambda e=e: finished(pool, e.id))
        unbalanced = daemon.metrics.registry.get_sample_value(
            "dripd_spintax_unbalanced_total", {"field": "body"}
        )
    bodies = {m["to"]: m["body"] for m in sent(outbox)}
    assert bodies["+14155559999"] == "{Hi|Hello|Hey} Bo}b "  # from data: sent as rendered
    assert unbalanced == 1
    spun = [bodies[f"+1415555{n:04d}"] for n in range(12)]
    assert all(re.fullmatch(r"(Hi|Hello|Hey)  (VIP|friend)", b) for b in spun)
    assert len(set(spun)) > 1


PY_SEQUENCE = """
[sequence]
key = "py"

[[steps]]
key = "a"
channel = "email"
template = "templatemods:{function}"
spintax = true
"""


async def test_a_python_template_makes_the_message_checked_like_a_rendered_one(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    for function in ("welcome", "not_fields", "sets_from_header", "raises"):
        text = PY_SEQUENCE.replace("{function}", function).replace('"py"', f'"{function}"')
        await apply_text(pool, text)
    templatemods.CALLS.clear()
    async with running_daemon(dsn, tmp_path, clock=clock, max_attempts=1):
        made = [
            await enroll_at(pool, clock, key, f"u-{key}", first_name="Ann")
            for key in ("welcome", "not_fields", "sets_from_header", "raises")
        ]
        await wait_for(lambda: finished(pool, made[0].id))
        for e in made[1:]:
            await wait_for(lambda e=e: has_status(pool, e.id, "failed"))
    [message] = sent(outbox)
    assert message["subject"] == "Welcome, Ann"  # a header field, folded
    assert message["headers"]["X-Campaign"] == "spring"
    assert "<table" in message["html"]  # its mjml compiled
    assert re.search(r"(Hi|Hello) Ann, see https://example.com/docs\.", message["text"])
    assert templatemods.CALLS == [("u-welcome", "email", {})]
    by_sequence = {
        r["enrollment_id"]: r["last_error"] for r in await executions(pool) if r["last_error"]
    }

    assert len(by_sequence) == 3
    not_fields, from_header, raises = (by_sequence[e.id] for e in made[1:])
    assert "returned list, not a mapping of message fields" in not_fields
    assert "header 'From': dripd sets this header itself" in from_header
    assert "'templatemods:raises' raised RuntimeError" in raises
    assert "secret detail" not in raises


# -- short links --------------------------------------------------------------------------------

CLICK_SEQUENCE = """
[sequence]
key = "offer"
short_links = {{ provider = "dripd", utm = true }}

[[steps]]
key = "offer"
channel = "email"
subject = "An offer"
html = '''<p>See <a href="https://shop.example/deal?id={{{{ id }}}}">the deal</a>,
<img src="https://cdn.example/logo.png" alt="logo">
<img src="https://shop.example/deal?id={{{{ id }}}}" alt="the deal">
<a href="https://shop.example/account/password-reset">reset</a>
<a href="mailto:help@example.com">help</a></p>'''
text = "The deal: https://shop.example/deal?id={{{{ id }}}}."

[[steps]]
key = "wait"
wait_for = {{ event = "go", timeout = "3d" }}

[[steps]]
key = "thanks"
channel = "email"
subject = "Thanks for looking"
text = "Glad you liked it."

[[steps]]
key = "nudge"
channel = "email"
subject = "Did you see it?"
text = "Nudge."

[[transitions]]
from = "wait"
to = "thanks"
when = "clicks.count > 0 and clicks.last_step == 'offer'"
priority = 1

[[transitions]]
from = "wait"
to = "nudge"
priority = 2

[[transitions]]
from = "thanks"

[[transitions]]
from = "nudge"
"""


def http_sections(port: int, **links: Any) -> dict[str, Any]:
    return {
        "http": {"enabled": True, "listen": f"127.0.0.1:{port}"},
        "short_links": {"base_url": f"http://127.0.0.1:{port}", **links},
    }


async def test_a_click_on_dripds_redirect_is_an_event_a_condition_branches_on(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, CLICK_SEQUENCE.format())
    port = free_port()
    async with running_daemon(dsn, tmp_path, clock=clock, sections=http_sections(port)):
        clicker = await enroll_at(pool, clock, "offer", "clicker", id=7)
        idle = await enroll_at(pool, clock, "offer", "idle", id=8)
        await wait_for(lambda: len(sent(outbox, "offer")) == 2)
        by_to = {m["to"]: m for m in sent(outbox, "offer")}
        message = by_to["clicker@example.com"]
        html, text = message["html"], message["text"]
        # Eligible links are short; the excluded reset link and mailto: are untouched.
        assert "https://shop.example/account/password-reset" in html
        assert 'href="mailto:help@example.com"' in html
        assert "cdn.example" not in html
        # The deal's image keeps its URL: its link's short one counts the clicks.
        assert html.count("shop.example/deal") == 1
        assert '<img src="https://shop.example/deal?id=7" alt="the deal">' in html
        codes = SHORT.findall(html)
        assert len(codes) == 2
        # The text's link is the same destination: the same short link, the full stop
        # kept outside it.
        [text_code] = SHORT.findall(text)
        assert text.endswith(f"/l/{text_code}.")
        rows = await pool.fetch(
            "SELECT code, destination, track, execution_id FROM dripd.short_links "
            "WHERE code = ANY($1::text[])",
            [*codes, text_code],
        )
        by_code = {r["code"]: r for r in rows}
        deal = by_code[text_code]
        assert deal["destination"] == (
            "https://shop.example/deal?id=7&utm_source=dripd&utm_medium=email"
            "&utm_campaign=offer&utm_content=offer"
        )
        logo = next(r for r in rows if "logo" in r["destination"])
        assert deal["track"]  # an image load is not a click
        assert not logo["track"]
        async with httpx.AsyncClient() as client:
            redirect = await client.get(f"http://127.0.0.1:{port}/l/{text_code}")
            image = await client.get(f"http://127.0.0.1:{port}/l/{logo['code']}")
            missing = await client.get(f"http://127.0.0.1:{port}/l/ZZZZZZZZZZ")
        assert redirect.status_code == 302
        assert redirect.headers["location"] == deal["destination"]
        assert image.status_code == 302
        assert missing.status_code == 404
        clicks = await pool.fetch(
            "SELECT enrollment_id, execution_id, data FROM dripd.message_events "
            "WHERE type = 'clicked'"
        )
        assert [(c["enrollment_id"], c["execution_id"]) for c in clicks] == [
            (clicker.id, deal["execution_id"])
        ]
        # Release both waits: the clicker branches to "thanks", the other to "nudge".
        for who in ("clicker", "idle"):
            await api.track_event(pool, tenant=None, subscriber_id=who, key="go", now=clock.now())
        await wait_for(lambda: finished(pool, clicker.id))
        await wait_for(lambda: finished(pool, idle.id))
    assert [m["to"] for m in sent(outbox, "thanks")] == ["clicker@example.com"]
    assert [m["to"] for m in sent(outbox, "nudge")] == ["idle@example.com"]


RETRY_SEQUENCE = """
[sequence]
key = "retry"

[[steps]]
key = "a"
channel = "email"
short_links = "dripd"
adapter = "relay"
subject = "Links"
text = "One https://a.example/1 two https://b.example/2"
"""


async def test_a_retry_sends_the_links_its_first_attempt_made(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, tmp_path: Path
) -> None:
    sink = SmtpSink(reply="451 4.3.0 try later").start()
    try:
        await add_adapter(
            pool, name="relay", channel="email", provider="smtp", config=smtp_config(sink.port)
        )
        await apply_text(pool, RETRY_SEQUENCE)
        port = free_port()
        async with running_daemon(
            dsn, tmp_path, clock=clock, sections=http_sections(port), retry_base="1m"
        ):
            enrollment = await enroll_at(pool, clock, "retry", "r")

            async def retried() -> bool:
                rows = await executions(pool)
                return bool(rows) and rows[0]["attempt"] == 1 and rows[0]["status"] == "scheduled"

            await wait_for(retried)
            made = await pool.fetch("SELECT code FROM dripd.short_links ORDER BY id")
            assert len(made) == 2
            sink.reply = None
            clock.advance(timedelta(hours=2))
            await wait_for(lambda: finished(pool, enrollment.id))
        again = await pool.fetch("SELECT code FROM dripd.short_links ORDER BY id")
        assert again == made  # no new links, no second shortener call
        [mail] = sink.messages
        body = mail.get_body(("plain",))
        assert body is not None
        assert SHORT.findall(body.get_content()) == [r["code"] for r in made]
    finally:
        sink.stop()


FAILING_SEQUENCE = """
[sequence]
key = "shortener"

[[steps]]
key = "a"
channel = "sms"
short_links = {{ provider = "webhook", on_error = "{on_error}" }}
body = "See https://shop.example/deal"
"""


@pytest.mark.parametrize("on_error", ["fail", "send_originals"])
async def test_a_shortener_failure_retries_or_sends_the_originals(
    dsn: str,
    pool: asyncpg.Pool,
    clock: ManualClock,
    outbox: Path,
    tmp_path: Path,
    on_error: str,
) -> None:
    await apply_text(pool, FAILING_SEQUENCE.format(on_error=on_error))
    dead = f"http://127.0.0.1:{free_port()}/shorten"  # nothing listens there
    sections = {"short_links": {"webhook_url": dead, "webhook_token": "tok-SECRET-1"}}
    async with running_daemon(dsn, tmp_path, clock=clock, sections=sections) as daemon:
        enrollment = await enroll_at(pool, clock, "shortener", "w", phone="+14155550100")
        if on_error == "send_originals":
            await wait_for(lambda: finished(pool, enrollment.id))
            fallback = daemon.metrics.registry.get_sample_value("dripd_short_links_fallback_total")
        else:

            async def retried() -> bool:
                rows = await executions(pool)
                return bool(rows) and rows[0]["attempt"] == 1

            await wait_for(retried)
    if on_error == "send_originals":
        assert [m["body"] for m in sent(outbox)] == ["See https://shop.example/deal"]
        assert fallback == 1
    else:
        assert sent(outbox) == []
        [row] = await executions(pool)
        assert row["status"] == "scheduled"
        assert row["last_error"].startswith("short links: ")
        assert "tok-SECRET-1" not in row["last_error"]


MJML_LINKS_SEQUENCE = """
[sequence]
key = "mjlinks"
short_links = "dripd"

[[steps]]
key = "a"
channel = "email"
subject = "Spring"
mjml = '''
<mjml>
  <mj-body>
    <mj-section>
      <mj-column>
        <mj-image src="https://cdn.example/hero.png" alt="Spring" />
        <mj-text>Read <a href="https://shop.example/guide">the guide</a>.</mj-text>
        <mj-button href="https://shop.example/spring?fan={{ fan }}">Shop</mj-button>
      </mj-column>
    </mj-section>
  </mj-body>
</mjml>
'''
"""


async def test_an_mjml_steps_links_are_short_in_its_html_and_its_text_part(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, MJML_LINKS_SEQUENCE)
    port = free_port()
    async with running_daemon(dsn, tmp_path, clock=clock, sections=http_sections(port)):
        enrollment = await enroll_at(pool, clock, "mjlinks", "m", fan="ann")
        await wait_for(lambda: finished(pool, enrollment.id))
    [message] = sent(outbox)
    html, text = message["html"], message["text"]
    rows = await pool.fetch("SELECT code, destination, track FROM dripd.short_links")
    by_destination = {r["destination"]: r for r in rows}
    assert set(by_destination) == {
        "https://cdn.example/hero.png",
        "https://shop.example/guide",
        "https://shop.example/spring?fan=ann",
    }
    assert not by_destination["https://cdn.example/hero.png"]["track"]
    for row in rows:  # compiled from the rewritten MJML: every link short in the HTML
        assert f"/l/{row['code']}" in html
    assert "shop.example" not in html
    assert "cdn.example" not in html
    assert "fonts.googleapis.com" in html  # mrml's own stylesheet link is no link to shorten
    # The text part, made from that HTML, has the same short links.
    guide = by_destination["https://shop.example/guide"]["code"]
    assert re.search(rf"the guide \(http://127\.0\.0\.1:{port}/l/{guide}\)", text)
