"""Per-step rules on the recipient and the rendered message: verified, length, required parts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dripd.model import SMS_MAX_LENGTH


def unverified(require_verified: bool, data: Mapping[str, Any]) -> bool:
    """Whether a step that requires a verified recipient must skip one with this `data`.

    Verified means the subscriber data key `verified_at` holds a value: not missing, null,
    false, blank or an empty list or table.
    """
    if not require_verified:
        return False
    value = data.get("verified_at")
    if value is None or value is False:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list | tuple | dict):
        return not value
    return False


def sms_too_long(body: str, limit: int = SMS_MAX_LENGTH) -> bool:
    """Whether a text message body is longer than `limit` characters.

    Counted as Python counts a str: in code points, not in GSM-7 or UCS-2 segments, so an
    emoji is one character here though a carrier bills it as two UCS-2 units.
    """
    return len(body) > limit


def missing_fields(channel: str, rendered: Mapping[str, str]) -> list[str]:
    """The parts of a rendered message that are missing or blank, by name.

    Email needs a `subject` and a `text` or `html` body (reported as "text or html"); every
    other channel (sms, whatsapp, chat, webhook) needs a `body`.
    """

    def blank(name: str) -> bool:
        value = rendered.get(name)
        return value is None or not value.strip()

    if channel == "email":
        missing = ["subject"] if blank("subject") else []
        if blank("text") and blank("html"):
            missing.append("text or html")
        return missing
    return ["body"] if blank("body") else []
