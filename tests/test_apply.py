"""Sequence files: full validation before any write, idempotent apply, versions."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest
from support import apply_text, one_email

from dripd import api
from dripd.errors import SequenceFileError
from dripd.sequences import load_file, load_text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[sequence]\nkey = 'x'\n", "needs at least one [[steps]]"),
        (
            "[sequence]\nkey='x'\nbogus=1\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n",
            "key 'sequence.bogus': unknown key",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\nafter='2 days'\n",
            "step 'a': key 'after': '2 days' is not a duration",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\nafter='3000000d'\n",
            "step 'a': key 'after': '3000000d' is out of range; use a duration from 0s to 3650d",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='pigeon'\nbody='b'\n",
            "step 'a': key 'channel': 'pigeon' is not one of",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='email'\ntext='hi'\n",
            "step 'a': an email step needs 'subject' and 'text', 'html' or 'mjml'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='{% if %}'\n",
            "step 'a': key 'body': body: missing expression",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\nsubject='s'\n",
            "step 'a': key 'subject': not used by channel 'sms'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='email'\nsubject='s'\ntext='t'\n"
            "headers={To='x@example.com'}\n",
            "step 'a': key 'headers.To': dripd sets this header itself",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='email'\nsubject='s'\ntext='t'\n"
            "headers={'Bad Name'='v'}\n",
            "step 'a': key 'headers': 'Bad Name' is not a header name",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='email'\nsubject='s'\ntext='t'\n"
            "headers={X-Ok=5}\n",
            "step 'a': key 'headers': Expected `str`, got `int` (in one of its values)",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='email'\nsubject='s'\ntext='t'\n"
            "from='not an address'\n",
            "step 'a': key 'from'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "reply_to='a@example.com'\n",
            "step 'a': key 'reply_to': only email steps take it",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "whatsapp_template={name='t', language='en'}\n",
            "step 'a': key 'whatsapp_template': only whatsapp steps take it",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='whatsapp'\n"
            "whatsapp_template={name='Order Update', language='en'}\n",
            "step 'a': key 'whatsapp_template.name': 'Order Update' is not",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='whatsapp'\n"
            "whatsapp_template={name='t', language='english'}\n",
            "step 'a': key 'whatsapp_template.language'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='whatsapp'\n"
            "whatsapp_template={name='t', language='en', params=['{{ x']}\n",
            "step 'a': key 'whatsapp_template.params[0]'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "[[steps]]\nkey='a'\nchannel='sms'\nbody='c'\n",
            "step 'a': key 'key': duplicate",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "[[transitions]]\nfrom='a'\nto='zzz'\n",
            "transition #1 (from 'a'): key 'to': no step 'zzz'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "[[transitions]]\nfrom='a'\nwhen=\"data.plan == \"\n",
            "transition #1 (from 'a'): key 'when': column",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\nmax_attempts='3'\n",
            "step 'a': key 'max_attempts': Expected `int | null`, got `str`",
        ),
        (
            "[sequence]\nkey='x'\ntimezone='Mars/Base'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n",
            "key 'sequence.timezone': 'Mars/Base' is not a known IANA timezone",
        ),
        (
            "[sequence]\nname='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n",
            "key 'sequence.key': required key is missing",
        ),
        ("not toml at all [", "not valid TOML"),
        # Flow: timing, waits, conditions, hooks, events and the shape of the graph.
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\nat='25:00'\n",
            "step 'a': key 'at':",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\ncron='61 * * * *'\n",
            "step 'a': key 'cron':",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "cron='0 9 * * *'\nat='09:00'\n",
            "step 'a': keys 'at' and 'cron': use one or the other",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "timezone='Europe/Berlin'\n",
            "step 'a': key 'timezone': only used with 'at' or 'cron'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='w'\nchannel='sms'\nbody='b'\n"
            "wait_for={event='go', timeout='1d'}\n",
            "step 'w': key 'wait_for': a waiting step sends nothing",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='w'\nwait_for={event='go', timeout='1d', "
            "on_timeout='nope'}\n",
            "step 'w': key 'wait_for.on_timeout': no step 'nope'",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='w'\nwait_for={event='go'}\n",
            "step 'w': key 'wait_for.timeout': required key is missing",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "when=\"event.key == 'x'\"\n",
            "step 'a': key 'when': 'event.key': `event` is set only in transitions from a wait_for",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "when='events.opened.total > 1'\n",
            "step 'a': key 'when': 'events.opened.total': use events.<event key>.count",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "when='hooks.score > 1'\n",
            "step 'a': key 'when': 'hooks.score' names no declared hook (declared: none)",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='{{ hooks.crm }}'\n",
            "step 'a': key 'body': 'hooks.crm' names no declared hook",
        ),
        (
            "[sequence]\nkey='x'\nentry_events=['go']\nexit_events=['go']\n"
            "[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n",
            "key 'sequence.exit_events': 'go' is also an entry event",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "[[steps]]\nkey='b'\nchannel='sms'\nbody='b'\n"
            "[[steps]]\nkey='c'\nchannel='sms'\nbody='c'\n"
            "[[transitions]]\nfrom='a'\nto='c'\n",
            "step 'b': unreachable",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "[[steps]]\nkey='b'\nchannel='sms'\nbody='b'\n"
            "[[transitions]]\nfrom='a'\nto='b'\n[[transitions]]\nfrom='b'\nto='a'\n",
            "step 'a': no path to completion",
        ),
        (
            "[sequence]\nkey='x'\non_no_match='fail'\n[[steps]]\nkey='a'\nchannel='sms'\n"
            "body='b'\n[[transitions]]\nfrom='a'\nto='a'\nwhen='data.again == true'\n",
            "step 'a': no path to completion",
        ),
        (
            "[sequence]\nkey='x'\n[[steps]]\nkey='a'\nchannel='sms'\nbody='b'\n"
            "[hooks.crm]\nurl='https://crm.example.com/'\n",
            "hooks.crm",
        ),
    ],
)
def test_every_error_names_file_step_and_key(text: str, message: str) -> None:
    with pytest.raises(SequenceFileError) as info:
        load_text(text, source="seq/x.toml")
    assert str(info.value).startswith("seq/x.toml: ")
    assert message in str(info.value)


async def test_apply_is_idempotent_and_versions_changes(pool: asyncpg.Pool) -> None:
    first = await apply_text(pool, one_email("welcome"))
    same = await apply_text(pool, one_email("welcome"))
    assert (first.version, first.created) == (1, True)
    assert (same.version, same.created) == (1, False)
    assert await pool.fetchval("SELECT count(*) FROM dripd.sequence_versions") == 1

    running = await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="a")
    changed = await apply_text(pool, one_email("welcome").replace("Hi {{", "Hello there {{"))
    assert (changed.version, changed.created) == (2, True)
    states = await pool.fetch("SELECT version, state FROM dripd.sequence_versions ORDER BY version")
    assert [(r["version"], r["state"]) for r in states] == [(1, "archived"), (2, "active")]
    # A running enrollment stays on its version; a new one gets the new version.
    assert (await api.get_enrollment(pool, tenant=None, enrollment_id=running.id)).version == 1
    fresh = await api.enroll(pool, tenant=None, sequence_key="welcome", subscriber_id="b")
    assert fresh.version == 2


def test_the_examples_are_valid() -> None:
    files = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))
    assert files
    for f in files:
        assert load_file(f).steps
