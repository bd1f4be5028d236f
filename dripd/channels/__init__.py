"""Channels: the send protocol, its error taxonomy, and one module per provider."""

from dripd.channels.base import (
    Channel,
    ChannelError,
    Message,
    PermanentError,
    Receipt,
    TransientError,
)

__all__ = ["Channel", "ChannelError", "Message", "PermanentError", "Receipt", "TransientError"]
