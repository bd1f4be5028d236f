"""One address, one spelling: every spelling of an address normalizes to one key
(dripd.addresses), and suppressions, one-click unsubscribes, leads, quotas and rate limits
all match under it, through the real database and daemon."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg
import email_validator
import httpx
import idna
import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    SmtpSink,
    add_adapter,
    apply_text,
    enroll_at,
    executions,
    free_port,
    has_status,
    one_email,
    outbox_adapters,
    outbox_messages,
    quiet,
    running_daemon,
    smtp_config,
    wait_for,
)

from dripd import api, logs
from dripd.addresses import (
    InvalidAddress,
    domain_of,
    normalize,
    normalize_domain,
    recipient,
)
from dripd.channels.credentials import generate_key
from dripd.cli import main
from dripd.clock import ManualClock
from dripd.config import Quota, RateLimits, from_dict
from dripd.errors import ConfigError
from dripd.rules.limiter import RateTable
from dripd.rules.quota import quota_buckets

SATURDAY = datetime(2026, 3, 7, 15, 0, tzinfo=UTC)

# -- every spelling, one key (properties) --------------------------------------------------------

# Letters whose case round-trips (no ß, no dotted İ), some of them decomposable (é → e + ◌́).
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789éüñøåçдж"
_local_words = st.text(alphabet=_LETTERS, min_size=1, max_size=8)
_labels = st.text(alphabet=_LETTERS + "例", min_size=1, max_size=12)
_tlds = st.sampled_from(["com", "org", "de", "example"])


@st.composite
def addresses(draw: st.DrawFn) -> str:
    """An email address in its one spelling: lowercase, NFC, the domain as Unicode."""
    words = draw(st.lists(_local_words, min_size=1, max_size=3))
    separators = [draw(st.sampled_from(".+_-")) for _ in words[1:]]
    local = words[0] + "".join(s + w for s, w in zip(separators, words[1:], strict=True))
    labels = draw(st.lists(_labels, min_size=1, max_size=2))
    return f"{local}@{'.'.join([*labels, draw(_tlds)])}"


_NAMES = ["Bob", "Bob Smith", '"Bob, Jr."', "José Ñúñez", '"Zoë \\"Z\\" Ünal"', "bob@example.com"]
_SPACE = ["", " ", "  ", "\t", "\n", "\r\n", "\u00a0"]


@st.composite
def spellings(draw: st.DrawFn, address: str) -> str:
    """Another spelling of `address`: case changed anywhere, the domain in punycode or
    Unicode, composed or decomposed, bare, in angle brackets or after a display name, with
    white space around."""
    local, domain = address.rsplit("@", 1)
    rnd = draw(st.randoms(use_true_random=False))

    def recase(text: str) -> str:
        return "".join(c.upper() if rnd.random() < 0.5 else c for c in text)

    if draw(st.booleans()):
        domain = idna.encode(domain, uts46=True).decode("ascii")
    spelled = f"{recase(local)}@{recase(domain)}"
    form = draw(st.sampled_from(["bare", "angle", "named"]))
    if form == "angle":
        spelled = f"<{spelled}>"
    elif form == "named":
        gap = draw(st.sampled_from(["", " ", "  "]))
        spelled = f"{draw(st.sampled_from(_NAMES))}{gap}<{spelled}>"
    if draw(st.booleans()):
        spelled = unicodedata.normalize("NFD", spelled)
    return draw(st.sampled_from(_SPACE)) + spelled + draw(st.sampled_from(_SPACE))


@given(st.data())
@settings(max_examples=400)
def test_every_spelling_of_an_email_address_has_one_key(data: st.DataObject) -> None:
    address = data.draw(addresses())
    spelled = data.draw(spellings(address))
    assert normalize("email", spelled) == address, spelled
    read = recipient("email", spelled)
    assert read.key == address
    # The bare address the provider gets: no display name, the domain in ASCII, and it
    # reads back as the same key.
    assert "<" not in read.address
    assert read.address.rsplit("@", 1)[1].isascii()
    assert normalize("email", read.address) == address


@given(addresses())
def test_the_key_is_its_own_key_and_the_one_lead_intake_stores(address: str) -> None:
    assert normalize("email", address) == address
    # email-validator (lead intake) reads the address to the same key.
    checked = email_validator.validate_email(address, check_deliverability=False)
    assert normalize("email", checked.normalized) == address
    punycode = idna.encode(address.rsplit("@", 1)[1], uts46=True).decode("ascii")
    assert normalize("email", f"{address.rsplit('@', 1)[0]}@{punycode.upper()}") == address


_REGIONS = ["US", "GB", "DE", "FR", "IN", "BR", "JP", "AU", "CH", "NL"]
_KINDS = [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]
_FORMATS = [
    phonenumbers.PhoneNumberFormat.NATIONAL,
    phonenumbers.PhoneNumberFormat.INTERNATIONAL,
    phonenumbers.PhoneNumberFormat.E164,
]


@st.composite
def phone_spellings(draw: st.DrawFn) -> tuple[str, str, str]:
    """(E.164, the region, another spelling): national or international, its digits
    regrouped with spaces, dashes, dots and parentheses, white space around."""
    region = draw(st.sampled_from(_REGIONS))
    number = phonenumbers.example_number_for_type(region, draw(st.sampled_from(_KINDS)))
    assert number is not None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    text = phonenumbers.format_number(number, draw(st.sampled_from(_FORMATS)))
    plus = "+" if text.startswith("+") else ""
    digits = re.sub(r"\D", "", text)
    cuts = sorted(draw(st.sets(st.integers(1, len(digits) - 1), max_size=4)))
    groups = [digits[a:b] for a, b in pairwise([0, *cuts, len(digits)])]
    if len(groups) > 1 and draw(st.booleans()):
        groups[1] = f"({groups[1]})"
    spelled = groups[0] + "".join(
        draw(st.sampled_from([" ", "-", ".", " - "])) + g for g in groups[1:]
    )
    space = draw(st.sampled_from(_SPACE))
    return e164, region, f"{space}{plus}{spelled}{space}"


@given(phone_spellings(), st.sampled_from(["sms", "whatsapp"]))
@settings(max_examples=300)
def test_every_spelling_of_a_phone_number_has_one_key(
    case: tuple[str, str, str], channel: str
) -> None:
    e164, region, spelled = case
    assert normalize(channel, spelled, default_region=region) == e164, spelled
    if spelled.strip().startswith("+"):
        # An international spelling does not depend on the region it is read in.
        assert normalize(channel, spelled, default_region="JP") == e164
    assert normalize(channel, e164) == e164


# -- the readings, by example ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelled", "key"),
    [
        ("josé@example.com", "josé@example.com"),
        ("jose\u0301@example.com", "josé@example.com"),
        ("  JOSÉ@Example.COM\n", "josé@example.com"),
        ("Bob <bob@example.com>", "bob@example.com"),
        ('"Bob, Jr." <bob@example.com>', "bob@example.com"),
        ('"Bob <the builder>" <Bob@Example.com>', "bob@example.com"),
        ("Smith, Bob <bob@example.com>", "bob@example.com"),
        ("<bob@example.com>", "bob@example.com"),
        ("bob@xn--bcher-kva.example", "bob@bücher.example"),
        ("bob@XN--BCHER-KVA.EXAMPLE", "bob@bücher.example"),
        ("bob@BÜCHER.example", "bob@bücher.example"),
        ("bob@bücher。example", "bob@bücher.example"),  # an ideographic full stop
        ("用户@例子.广告", "用户@例子.广告"),
        ('"a b"@example.com', '"a b"@example.com'),
        ("bob@[192.0.2.1]", "bob@[192.0.2.1]"),
        ("x@under_score.example", "x@under_score.example"),  # not IDNA, still one spelling
    ],
)
def test_email_readings(spelled: str, key: str) -> None:
    assert normalize("email", spelled) == key


def test_the_provider_gets_the_bare_address_with_an_ascii_domain() -> None:
    read = recipient("email", ' "Zoë" <Zoe\u0308@Bücher.Example> ')
    assert read.key == "zoë@bücher.example"
    assert read.address == "Zoë@xn--bcher-kva.example"  # the local part as written, NFC
    assert read.display_name == "Zoë"  # as text: a header quotes it again
    assert recipient("sms", "(202) 555-0143", default_region="US").address == "+12025550143"
    assert recipient("webhook", " https://hooks.example.com/x ").address == (
        "https://hooks.example.com/x"
    )


def test_other_channels_are_trimmed_and_composed() -> None:
    assert normalize("chat", "  Ze\u0301 ") == "Zé"


@pytest.mark.parametrize(
    ("channel", "spelled", "says"),
    [
        ("email", "bob", "is not an email address"),
        ("email", "bob@", "is not an email address"),
        ("email", "@example.com", "is not an email address"),
        ("email", "bob@@example.com", "is not an email address"),
        ("email", "a@example.com, b@example.com", "is not an email address"),
        ("email", "a b@example.com", "is not an email address"),
        ("email", "Bob <a@example.com> <b@example.com>", "is not one address"),
        ("email", '"Bob <a@example.com>', "is not one address"),
        ("email", "bob@example.com>", "has no '<'"),
        ("email", "bob@exa mple.com", "is not a domain name"),
        ("email", "bob@example..com", "is not a domain name"),
        ("email", "a@xn--zz.example", "is not punycode of a label"),
        ("email", "a@xn--.example", "is not punycode of a label"),
        ("email", "a@-bad-.com", "starts or ends with '-'"),
        ("email", f"a@{'b' * 64}.example", "longer than 63"),
        ("email", f"a@{'.'.join(['b' * 60] * 5)}", "longer than 253"),
        ("email", f"{'a' * 65}@example.com", "longer than 64 octets"),
        ("email", f"{'é' * 33}@example.com", "longer than 64 octets"),
        ("email", "   ", "must not be empty"),
        ("sms", "call me", "is not a phone number"),
        ("sms", "123", "is not a possible phone number"),
        ("whatsapp", "", "must not be empty"),
        ("chat", " ", "must not be empty"),
    ],
)
def test_unreadable_addresses_name_the_field(channel: str, spelled: str, says: str) -> None:
    with pytest.raises(InvalidAddress) as raised:
        normalize(channel, spelled, default_region="US", field="to")
    assert raised.value.message.startswith("to: ")
    assert says in raised.value.message
    assert isinstance(raised.value, ConfigError)  # bad input: CLI exit 2, HTTP 422


def test_domains_and_their_keys() -> None:
    assert normalize_domain("XN--BCHER-KVA.Example") == "bücher.example"
    assert normalize_domain("Mail.Example.COM") == "mail.example.com"
    assert domain_of("bob@bücher.example") == "bücher.example"
    assert domain_of(None) is None
    assert domain_of("+12025550143") is None


def test_rate_limits_and_quotas_count_under_the_one_spelling() -> None:
    rates = RateTable(RateLimits(recipient_domain={"XN--BCHER-KVA.example": "5/1m"}))
    [bucket] = rates.buckets_for(
        adapter=None,
        provider=None,
        sending_domain=None,
        recipient_domain=domain_of(normalize("email", "Bob <bob@Bücher.example>")),
        tenant=None,
        sequence=None,
    )
    assert (bucket.key, bucket.limit) == ("rate:recipient_domain:bücher.example", 5)
    per_mailbox = Quota(scope="mailbox", key="Sales@Example.COM", limit=40)
    [counted] = quota_buckets(
        [per_mailbox],
        adapter="smtp",
        mailbox=normalize("email", "Sales Team <sales@example.com>"),
        tenant=None,
        sequence=None,
        now=SATURDAY,
    )
    assert counted.key == "quota:mailbox:sales%40example.com:day:UTC"


def test_the_config_refuses_keys_that_are_not_addresses() -> None:
    with pytest.raises(ConfigError, match=r"quotas\[0\]\.key: 'sales' is not an email address"):
        from_dict({"quotas": [{"scope": "mailbox", "key": "sales", "limit": 1}]})
    with pytest.raises(ConfigError, match=r"rate_limits\.recipient_domain\.'a b': "):
        from_dict({"rate_limits": {"recipient_domain": {"a b": "1/1s"}}})


# -- through the database and the daemon ---------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(SATURDAY)


@pytest.fixture
async def outbox(pool: asyncpg.Pool, tmp_path: Path) -> Path:
    return await outbox_adapters(pool, tmp_path / "outbox.jsonl")


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`dripd.cli.main` in this process, without the ambient config, and without
    configuring structlog: it caches loggers on first use, and a daemon's loggers cached
    here would escape later tests' `capture_logs`."""
    monkeypatch.setattr(logs, "configure", lambda *args, **kwargs: None)
    monkeypatch.delenv("DRIPD_DSN", raising=False)
    monkeypatch.setenv("DRIPD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")


NAMED = """
[sequence]
key = "named"

[[steps]]
key = "hello"
channel = "email"
to = "{{ first_name }} <{{ email }}>"
subject = "Hello"
text = "Hi"

[[steps]]
key = "again"
channel = "email"
after = "1d"
to = "{{ first_name }} <{{ email }}>"
subject = "Again"
text = "Hi"
"""


@pytest.mark.usefixtures("cli")
async def test_a_suppressed_address_is_skipped_whatever_its_spelling(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, one_email("plain"))
    await apply_text(pool, NAMED.replace('after = "1d"\n', ""))
    # `dripd suppress email "josé@example.com"` (composed é).
    argv = ["suppress", "email", "josé@example.com", "--dsn", dsn, "--json"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert await asyncio.to_thread(main, argv) == 0
    await api.suppress(pool, tenant=None, channel="email", address="BOB@example.com")
    stored = await api.suppress(
        pool, tenant=None, channel="email", address="Zoë <zoe@xn--bcher-kva.example>"
    )
    assert stored.address == "zoe@bücher.example"
    async with running_daemon(dsn, tmp_path, clock=clock):
        decomposed = await enroll_at(
            pool, clock, "plain", "j", first_name="José", email="jose\u0301@example.com"
        )
        named = await enroll_at(
            pool, clock, "named", "b", first_name="Bob", email="Bob@Example.com"
        )
        punycode = await enroll_at(
            pool, clock, "named", "z", first_name="Zoë", email="ZOE@Bücher.example"
        )
        fine = await enroll_at(pool, clock, "named", "a", first_name="Ann", email="Ann@Example.com")
        for e in (decomposed, named, punycode, fine):
            await wait_for(lambda e=e: has_status(pool, e.id, "completed"))
    rows = await executions(pool)
    skipped = {r["enrollment_id"] for r in rows if r["reason"] == "suppressed"}
    assert all(r["status"] == "skipped" for r in rows if r["enrollment_id"] in skipped)
    assert {decomposed.id, named.id, punycode.id} <= skipped
    assert fine.id not in skipped
    # Ann's two mails: the provider gets the bare address, the To header the display name.
    sent = outbox_messages(outbox)
    assert [m["to"] for m in sent] == ["Ann@example.com", "Ann@example.com"]
    assert {m["to_name"] for m in sent} == {"Ann"}
    assert all("To" not in m["headers"] for m in sent)
    recorded = {r["recipient"] for r in rows if r["status"] == "sent"}
    assert recorded == {"ann@example.com"}


async def test_an_unreadable_recipient_fails_its_step_with_the_reason(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, outbox: Path, tmp_path: Path
) -> None:
    await apply_text(pool, one_email("plain"))
    async with running_daemon(dsn, tmp_path, clock=clock):
        bad = await enroll_at(pool, clock, "plain", "x", first_name="X", email="not an address")
        good = await enroll_at(pool, clock, "plain", "y", first_name="Y")
        await wait_for(lambda: has_status(pool, bad.id, "failed"))
        await wait_for(lambda: has_status(pool, good.id, "completed"))
    row = next(r for r in await executions(pool) if r["enrollment_id"] == bad.id)
    assert row["status"] == "failed"
    assert row["attempt"] == 0  # permanent: not retried
    assert "to: 'not an address' is not an email address" in row["last_error"]
    assert [m["to"] for m in outbox_messages(outbox)] == ["y@example.com"]


@dataclass
class RecordingSink(SmtpSink):
    """An SmtpSink that also keeps the envelope's recipients."""

    rcpt_tos: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpt_tos.append(address)
        return await super().handle_RCPT(server, session, envelope, address, options)


async def test_one_click_from_a_mail_to_a_display_name_stores_the_bare_address(
    dsn: str, pool: asyncpg.Pool, clock: ManualClock, tmp_path: Path
) -> None:
    sink = RecordingSink().start()
    try:
        await apply_text(pool, NAMED)
        await add_adapter(
            pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
        )
        port = free_port()
        sections = {
            "http": {"enabled": True, "listen": f"127.0.0.1:{port}"},
            "unsubscribe": {"base_url": "https://mail.example.com/"},
        }
        env = {"DRIPD_ENCRYPTION_KEY": generate_key()}
        async with running_daemon(dsn, tmp_path, clock=clock, env=env, sections=sections):
            e = await enroll_at(
                pool, clock, "named", "bob", first_name="Bob", email="Bob@Example.com"
            )
            await wait_for(lambda: sink.count() == 1)
            mail = sink.messages[0]
            assert str(mail["To"]) == "Bob <Bob@example.com>"  # the domain as sent
            assert sink.rcpt_tos == ["Bob@example.com"]
            found = re.fullmatch(
                r"<https://mail\.example\.com/u/([A-Za-z0-9_-]+)>", str(mail["List-Unsubscribe"])
            )
            assert found
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response = await client.post(
                    f"/u/{found.group(1)}", data={"List-Unsubscribe": "One-Click"}
                )
                assert response.status_code == 200
            row = await pool.fetchrow("SELECT address, reason FROM dripd.suppressions")
            assert (row["address"], row["reason"]) == ("bob@example.com", "unsubscribe")
            await quiet(pool, clock)
            clock.advance(timedelta(days=1))
            await wait_for(lambda: has_status(pool, e.id, "completed"))
        assert sink.count() == 1
        again = next(r for r in await executions(pool) if r["step_key"] == "again")
        assert (again["status"], again["reason"]) == ("skipped", "suppressed")
    finally:
        sink.stop()


@pytest.mark.parametrize(
    ("first_name", "email", "name", "addr_spec"),
    [
        # A name that would read as a group or a second address once unquoted.
        ("Eve\r\nBcc: evil@x.com", "i@example.com", "Eve Bcc: evil@x.com", "i@example.com"),
        ('Ünï, "Q"', "i2@example.com", "Ünï, Q", "i2@example.com"),
        # An internationalized domain goes out as its A-labels, never as an encoded word.
        ("Zoë", "zoe@bücher.example", "Zoë", "zoe@xn--bcher-kva.example"),
        ("", "w1@Bücher.example", "", "w1@xn--bcher-kva.example"),
    ],
)
async def test_the_to_header_holds_exactly_the_one_recipient(
    dsn: str,
    pool: asyncpg.Pool,
    clock: ManualClock,
    tmp_path: Path,
    first_name: str,
    email: str,
    name: str,
    addr_spec: str,
) -> None:
    sink = RecordingSink().start()
    try:
        await apply_text(pool, NAMED)
        await add_adapter(
            pool, name="smtp", channel="email", provider="smtp", config=smtp_config(sink.port)
        )
        async with running_daemon(dsn, tmp_path, clock=clock):
            await enroll_at(pool, clock, "named", "x", first_name=first_name, email=email)
            await wait_for(lambda: sink.count() == 1)
        [address] = sink.messages[0]["To"].addresses
        assert (address.display_name, address.addr_spec) == (name, addr_spec)
        assert "=?" not in addr_spec
        assert sink.rcpt_tos == [addr_spec]
    finally:
        sink.stop()


@pytest.mark.usefixtures("cli")
async def test_write_surfaces_refuse_unreadable_addresses_naming_the_field(
    dsn: str, pool: asyncpg.Pool
) -> None:
    with pytest.raises(InvalidAddress, match=r"^address: 'bob' is not an email address"):
        await api.suppress(pool, tenant=None, channel="email", address="bob")
    with pytest.raises(InvalidAddress, match=r"^address: 'call me' is not a phone number"):
        await api.suppress(pool, tenant=None, channel="sms", address="call me")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = await asyncio.to_thread(main, ["suppress", "email", "Bob <bob", "--dsn", dsn])
    assert code == 2
    assert "address: 'Bob <bob' is not an email address" in err.getvalue()
    assert await pool.fetchval("SELECT count(*) FROM dripd.suppressions") == 0


async def test_a_lead_is_a_duplicate_under_any_spelling_of_its_email(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("leads"))
    first = await api.create_lead(
        pool,
        tenant=None,
        sequence_key="leads",
        name="José",
        email="José@XN--BCHER-KVA.example",
        phone=None,
        notes=None,
    )
    assert first.email == "josé@bücher.example"
    with pytest.raises(api.DuplicateLead) as raised:
        await api.create_lead(
            pool,
            tenant=None,
            sequence_key="leads",
            name="Jose",
            email=" jose\u0301@bücher.example ",
            phone=None,
            notes=None,
        )
    assert raised.value.field == "email"
    # A lead suppressed under another spelling is the same address.
    await api.suppress(pool, tenant=None, channel="email", address="JOSE\u0301@bücher.EXAMPLE")
    assert await pool.fetchval("SELECT address FROM dripd.suppressions") == first.email


async def test_a_report_suppresses_the_recipient_in_its_one_spelling(pool: asyncpg.Pool) -> None:
    await apply_text(pool, one_email("welcome"))
    enrollment = await api.enroll(
        pool, tenant=None, sequence_key="welcome", subscriber_id="bob", data={"first_name": "Bob"}
    )
    # As an execution sent before addresses were read stored it: display name and all.
    execution_id: uuid.UUID = await pool.fetchval(
        "UPDATE dripd.step_executions SET status = 'sent', finished_at = now(), "
        "channel = 'email', recipient = 'bob <bob@example.com>' "
        "WHERE enrollment_id = $1 RETURNING id",
        enrollment.id,
    )
    assert await api.report(pool, tenant=None, execution_id=execution_id, type="complained")
    row = await pool.fetchrow("SELECT address, reason FROM dripd.suppressions")
    assert (row["address"], row["reason"]) == ("bob@example.com", "complaint")
