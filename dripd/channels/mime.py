"""The one way dripd writes an email as MIME (RFC 5322, RFC 2045–2049): for SMTP and for the
HTTP providers that take the raw message (SES, Gmail, Microsoft Graph), so every route
carries the same Message-ID, unsubscribe and idempotency headers."""

from __future__ import annotations

import email.policy
import email.utils
from datetime import datetime
from email.message import EmailMessage

from dripd.channels.base import Message, PermanentError, mailbox_header

__all__ = ["IDEMPOTENCY_HEADER", "compose", "to_bytes"]

IDEMPOTENCY_HEADER = "X-Dripd-Idempotency-Key"


def compose(message: Message, *, sender: str, now: datetime, where: str) -> EmailMessage:
    """`message` as an email from `message.sender` (else `sender`), dated `now`: a text
    part, an HTML part, or both as multipart/alternative. The step's extra headers replace
    same-named ones; Message-ID and the idempotency header are set last, so no extra header
    changes how a send is identified. PermanentError (naming `where`) when the email cannot
    be built (a header value the email library refuses)."""
    mail = EmailMessage()
    try:
        mail["From"] = message.sender or sender
        mail["To"] = mailbox_header(message.to_name, message.to)
        if message.reply_to:
            mail["Reply-To"] = message.reply_to
        if message.subject is not None:
            mail["Subject"] = message.subject
        mail["Date"] = email.utils.format_datetime(now)
        for name, value in message.headers.items():
            del mail[name]
            mail[name] = value
        for name, value in (
            ("Message-ID", message.message_id),
            (IDEMPOTENCY_HEADER, message.idempotency_key),
        ):
            del mail[name]
            mail[name] = value
        text = message.text if message.text is not None else message.body
        if message.html is None:
            mail.set_content(text or "")
        elif text is None:
            mail.set_content(message.html, subtype="html")
        else:
            mail.set_content(text)
            mail.add_alternative(message.html, subtype="html")
    except (ValueError, TypeError) as exc:
        raise PermanentError(f"{where}: cannot build the email: {exc}") from exc
    return mail


def to_bytes(mail: EmailMessage) -> bytes:
    """The message as sent on the wire: CRLF line ends, lines folded at 78 characters
    (RFC 5322 §2.1.1), non-ASCII headers RFC 2047-encoded."""
    return mail.as_bytes(policy=email.policy.SMTP)
