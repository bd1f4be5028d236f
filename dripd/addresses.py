"""Recipient addresses in the one spelling they are stored, compared and counted under.

Every place that stores, compares or counts an address reads it here, per channel:

- email: the bare address of `addr-spec` or `Display Name <addr-spec>`, in Unicode NFC,
  the local part lowercased and the domain in the form of its IDNA U-labels (UTS #46
  mapped: lowercase, `xn--` labels decoded): `"Bob" <Bob@XN--BCHER-KVA.example>` is
  `bob@bücher.example`, the form email-validator gives leads too;
- phone channels (sms, whatsapp): E.164 through `phonenumbers`;
- other channels: trimmed, NFC.

Unreadable input raises InvalidAddress, whose message starts with the field it names.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final

import idna
import phonenumbers

from dripd.errors import ConfigError

__all__ = [
    "PHONE_CHANNELS",
    "InvalidAddress",
    "Recipient",
    "domain_of",
    "mailbox",
    "normalize",
    "normalize_domain",
    "phone_key",
    "recipient",
]

PHONE_CHANNELS: Final = frozenset({"sms", "whatsapp"})

# One unquoted token: no white space, control characters (or lone surrogates) or RFC 5322
# specials.
_PLAIN: Final = re.compile(r'[^\s()<>\[\]:;@\\,"\x00-\x1f\x7f-\x9f\ud800-\udfff]+')
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_CONTROL_RUN: Final = re.compile(r"\s*[\x00-\x1f\x7f-\x9f\u2028\u2029][\s\x00-\x1f\x7f-\x9f]*")
# The inside of an address literal: `192.0.2.1` or `IPv6:2001:db8::1`.
_LITERAL: Final = re.compile(r"[^\s\[\]\\\x00-\x1f\x7f-\x9f\ud800-\udfff]+")
# RFC 5321 §4.5.3.1.1 (local part), RFC 1035 §2.3.4 (label and name, in A-label form).
_MAX_LOCAL: Final = 64
_MAX_LABEL: Final = 63
_MAX_DOMAIN: Final = 253
# The label separators UTS #46 maps to a full stop.
_DOTS: Final = re.compile("[.\u3002\uff0e\uff61]")


class InvalidAddress(ConfigError):
    """The address cannot be read."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipient:
    """A `to` read for sending: the key it is checked and counted under, and what the
    provider gets."""

    key: str  # the one spelling (see the module docstring)
    address: str  # bare: email as written but NFC, with an ASCII domain; phones E.164
    # email only: the phrase before `<…>` as text (quotes and escapes removed, control
    # characters and line breaks as one space), for a header to quote again
    display_name: str | None = None


def normalize(
    channel: str, address: str, *, default_region: str | None = None, field: str = "address"
) -> str:
    """The one spelling of `address` on `channel` that suppressions, unsubscribe tokens,
    quotas, rate limits and lead duplicates use. A phone number without a country code is
    read in `default_region`. Raises InvalidAddress, naming `field`, if it cannot be read."""
    return recipient(channel, address, default_region=default_region, field=field).key


def recipient(
    channel: str, address: str, *, default_region: str | None = None, field: str = "address"
) -> Recipient:
    """`address` (an email address may carry a display name) read for `channel`; raises
    InvalidAddress, naming `field`, if it cannot be read."""
    if not isinstance(address, str) or not address.strip():
        raise InvalidAddress(f"{field}: must not be empty")
    if channel == "email":
        return _email(address, field)
    if channel in PHONE_CHANNELS:
        key = phone_key(_phone(address, default_region, field))
        return Recipient(key=key, address=key)
    key = unicodedata.normalize("NFC", address.strip())
    return Recipient(key=key, address=key)


def phone_key(number: phonenumbers.PhoneNumber) -> str:
    """The one spelling of a parsed phone number: E.164."""
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_domain(domain: str, *, field: str = "domain") -> str:
    """A domain in its one spelling: NFC, UTS #46 mapped (lowercase), `xn--` labels as
    Unicode; an address literal (`[192.0.2.1]`) lowercased. Raises InvalidAddress."""
    text = unicodedata.normalize("NFC", domain.strip())
    if text.startswith("[") and text.endswith("]") and _LITERAL.fullmatch(text[1:-1]):
        return text.lower()
    if not _plain(text):
        raise InvalidAddress(f"{field}: {domain!r} is not a domain name")
    if text.isascii():
        mapped = text.lower()  # what UTS #46 maps ASCII to, without its cost (every send)
    else:
        try:
            mapped = idna.uts46_remap(text, std3_rules=False, transitional=False)
        except idna.IDNAError as exc:
            raise InvalidAddress(f"{field}: {domain!r} is not a domain name ({exc})") from None
    labels = _DOTS.split(mapped)
    if not all(labels):
        raise InvalidAddress(f"{field}: {domain!r} is not a domain name (an empty label)")
    spelled = ".".join(_u_label(label, domain, field) for label in labels)
    ascii_form = _ascii_domain(spelled)
    # RFC 1035 §2.3.4 (labels of 63 octets, names of 253 in text form) and RFC 5891 §4.2.3.1
    # (no hyphen first or last), on the A-label form a provider gets.
    for label in ascii_form.split("."):
        if len(label) > _MAX_LABEL or label.startswith("-") or label.endswith("-"):
            raise InvalidAddress(
                f"{field}: {domain!r} is not a domain name (a label is longer than "
                f"{_MAX_LABEL} characters or starts or ends with '-')"
            )
    if len(ascii_form) > _MAX_DOMAIN:
        raise InvalidAddress(
            f"{field}: {domain!r} is not a domain name (longer than {_MAX_DOMAIN} characters)"
        )
    return spelled


def domain_of(key: str | None) -> str | None:
    """The domain of a normalized email address (None without one)."""
    if not key or "@" not in key:
        return None
    return key.rsplit("@", 1)[1] or None


def mailbox(key: str) -> str:
    """The mailbox of a normalized email address (`normalize("email", …)`): the address
    without the sub-address, i.e. the local part cut at its first `+` (`victim+1@example.com`
    and `victim@example.com` are one mailbox). A local part that starts with `+` is kept
    whole; nothing else (dots, `-` tags, provider aliases) is folded."""
    local, at, domain = key.rpartition("@")
    if not at:
        return key
    base = local.split("+", 1)[0]
    return f"{base or local}@{domain}"


def _email(text: str, field: str) -> Recipient:
    value = unicodedata.normalize("NFC", text).strip()
    display_name: str | None = None
    spec = value
    if value.endswith(">"):
        opening = value.rfind("<")
        if opening < 0:
            raise InvalidAddress(f"{field}: {text!r} ends with '>' but has no '<'")
        display_name = value[:opening].strip() or None
        if display_name is not None and not _one_phrase(display_name):
            raise InvalidAddress(
                f"{field}: {text!r} is not one address (quote a display name that holds "
                "'<', '>' or '\"', as in \"Bob, Jr.\" <bob@example.com>)"
            )
        spec = value[opening + 1 : -1].strip()
    local, at, domain = spec.rpartition("@")
    if not at or not local or not domain:
        raise InvalidAddress(
            f"{field}: {text!r} is not an email address (write it like bob@example.com or "
            "Bob <bob@example.com>)"
        )
    if not _local_part(local):
        raise InvalidAddress(
            f"{field}: {text!r} is not an email address (the part before the @ holds a space, "
            'a control character or one of ()<>[]:;@\\," outside quotes)'
        )
    if len(local.encode("utf-8")) > _MAX_LOCAL:
        raise InvalidAddress(
            f"{field}: {text!r} is not an email address (the part before the @ is longer "
            f"than {_MAX_LOCAL} octets)"
        )
    domain = normalize_domain(domain, field=field)
    key = unicodedata.normalize("NFC", local.lower())
    return Recipient(
        key=f"{key}@{domain}",
        address=f"{local}@{_ascii_domain(domain)}",
        display_name=_phrase_text(display_name) if display_name is not None else None,
    )


def _phone(text: str, default_region: str | None, field: str) -> phonenumbers.PhoneNumber:
    try:
        number = phonenumbers.parse(text.strip(), default_region)
    except phonenumbers.NumberParseException:
        raise InvalidAddress(
            f"{field}: {text!r} is not a phone number (write it with its country code, like "
            "+1 202 555 0143)"
        ) from None
    if not phonenumbers.is_possible_number(number):
        raise InvalidAddress(f"{field}: {text!r} is not a possible phone number")
    return number


def _plain(text: str) -> bool:
    return _PLAIN.fullmatch(text) is not None


def _local_part(local: str) -> bool:
    if len(local) >= 2 and local[0] == local[-1] == '"':
        return _CONTROL.search(local) is None  # a quoted string may hold spaces
    return _plain(local)


def _one_phrase(name: str) -> bool:
    """Whether a display name holds no second address: no '<' or '>' outside quotes, and
    its quotes are closed."""
    quoted = escaped = False
    for c in name:
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in "<>":
            return False
    return not quoted


def _phrase_text(phrase: str) -> str | None:
    """What a display name says: `"Bob, Jr."` is `Bob, Jr.`, `"a \\"b\\""` is `a "b"`; a run
    of white space holding a control character (a line break) becomes one space."""
    text, escaped = [], False
    for c in phrase:
        if escaped:
            text.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
        elif c != '"':
            text.append(c)
    return _CONTROL_RUN.sub(" ", "".join(text)).strip() or None


def _u_label(label: str, domain: str, field: str) -> str:
    """A UTS #46 mapped label with an `xn--` label decoded; InvalidAddress for an `xn--`
    label that is not the punycode of a Unicode label (RFC 5890 §2.3.2.1)."""
    if not label.startswith("xn--"):
        return label
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
        mapped = idna.uts46_remap(decoded, std3_rules=False, transitional=False)
    except (UnicodeError, idna.IDNAError):
        mapped = ""
    if not mapped or mapped.isascii() or _DOTS.search(mapped) or not _plain(mapped):
        raise InvalidAddress(
            f"{field}: {domain!r} is not a domain name ({label!r} is not punycode of a label)"
        )
    return mapped


def _ascii_domain(domain: str) -> str:
    """A normalized domain as SMTP without SMTPUTF8 takes it: Unicode labels as `xn--`."""
    return ".".join(
        label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
        for label in domain.split(".")
    )
