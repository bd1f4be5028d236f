"""Per-step rules: a verified recipient, the text message length, the parts a message needs."""

from __future__ import annotations

from typing import Any

import pytest

from dripd.rules.checks import missing_fields, sms_too_long, unverified


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"verified_at": None},
        {"verified_at": ""},
        {"verified_at": "   "},
        {"verified_at": False},
        {"verified_at": []},
        {"verified_at": {}},
        {"verified": True},
    ],
)
def test_a_recipient_without_verified_at_is_unverified(data: dict[str, Any]) -> None:
    assert unverified(True, data)
    assert not unverified(False, data)


@pytest.mark.parametrize(
    "value", ["2026-01-05T12:00:00Z", 1767614400, True, {"by": "link"}, ["email"]]
)
def test_any_verified_at_value_verifies(value: Any) -> None:
    assert not unverified(True, {"verified_at": value})


def test_sms_length_is_counted_in_characters() -> None:
    assert not sms_too_long("x" * 1600)
    assert sms_too_long("x" * 1601)
    assert not sms_too_long("x" * 160, 160)
    assert sms_too_long("x" * 161, 160)
    # Code points, not UCS-2 units or bytes: 1600 emoji (3200 UTF-16 units) fit.
    assert not sms_too_long("😀" * 1600)
    assert sms_too_long("é" * 1601)


@pytest.mark.parametrize(
    ("rendered", "missing"),
    [
        ({"subject": "Hi", "text": "Hello"}, []),
        ({"subject": "Hi", "html": "<p>Hello</p>"}, []),
        ({"subject": "Hi", "text": " ", "html": "<p>Hello</p>"}, []),
        ({"subject": " ", "text": "Hello"}, ["subject"]),
        ({"text": "Hello"}, ["subject"]),
        ({"subject": "Hi", "text": "", "html": "\n"}, ["text or html"]),
        ({"subject": "Hi"}, ["text or html"]),
        ({}, ["subject", "text or html"]),
        ({"body": "Hello"}, ["subject", "text or html"]),
    ],
)
def test_email_needs_a_subject_and_a_text_or_html_body(
    rendered: dict[str, str], missing: list[str]
) -> None:
    assert missing_fields("email", rendered) == missing


@pytest.mark.parametrize("channel", ["sms", "whatsapp", "chat", "webhook"])
def test_other_channels_need_a_body(channel: str) -> None:
    assert missing_fields(channel, {"body": "Hello"}) == []
    assert missing_fields(channel, {"body": " \t"}) == ["body"]
    assert missing_fields(channel, {"subject": "Hi", "text": "Hello"}) == ["body"]
