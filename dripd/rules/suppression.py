"""Recipient addresses in the one spelling suppressions are stored and matched under."""

from __future__ import annotations

import phonenumbers

PHONE_CHANNELS = frozenset({"sms", "whatsapp"})


def normalize(channel: str, address: str, *, default_region: str | None = None) -> str:
    """Email: trimmed and lowercased. Phone channels: E.164 when parseable. Others: trimmed."""
    address = address.strip()
    if channel == "email":
        return address.lower()
    if channel in PHONE_CHANNELS:
        try:
            number = phonenumbers.parse(address, default_region)
        except phonenumbers.NumberParseException:
            return address
        if phonenumbers.is_possible_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return address
