"""What every HTTP provider shares: one pooled client per adapter, the common config keys,
and the mapping of HTTP answers onto dripd's error taxonomy (dripd.channels.base).

Common adapter config keys of HTTP providers:

    base_url         the API's scheme and host (and path prefix): regional endpoints, tests
    timeout          seconds for the whole request (default 30)
    max_connections  requests at once, kept alive between sends (default 10)

The mapping (providers refine it where their API says more, see providers.md):

    connection refused/reset, timeouts   TransientError(provider_wide)
    (`timeout` bounds the whole request,
    answer included), a success answer
    larger than MAX_ANSWER_BYTES
    429, 408, 5xx                         TransientError(provider_wide), Retry-After honoured
    401                                   AdapterError (the adapter is paused)
    other 4xx                             PermanentError with the provider's message

Every answer is read streaming and capped: a success up to MAX_ANSWER_BYTES (a larger one
is refused), an error only its first MAX_ERROR_BYTES (plenty for the provider's message);
the rest is never downloaded.

Besides, what providers share to check their config (a boolean, one of a few choices, a list
of strings), to read JSON answers and bodies, and to clip a provider's words for an error or
an event.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec

from dripd import __version__
from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    ChannelError,
    PermanentError,
    TransientError,
)
from dripd.errors import ConfigError
from dripd.model import Adapter
from dripd.redaction import urls_for_log

__all__ = [
    "HTTP_CONFIG_KEYS",
    "MAX_ANSWER_BYTES",
    "MAX_ERROR_BYTES",
    "USER_AGENT",
    "HttpProvider",
    "check_http_config",
    "check_timeout",
    "clip",
    "config_bool",
    "config_choice",
    "config_str",
    "credential_str",
    "detail",
    "error_for_status",
    "json_body",
    "json_dict",
    "json_object",
    "json_str",
    "read_capped",
    "retry_after",
    "string_list",
    "transient_status",
]

#: The config keys every HTTP provider takes (besides `from` and its own).
HTTP_CONFIG_KEYS = frozenset({"base_url", "timeout", "max_connections"})

USER_AGENT = f"dripd/{__version__}"

#: The longest provider text kept in an error (and so in `last_error` and the logs).
MAX_DETAIL = 300
#: The longest wait a provider may ask for that we believe (seconds): one day.
MAX_RETRY_AFTER = 86_400.0
#: The largest success answer read (bytes); a larger one is a TransientError.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: The most of an error answer kept (bytes): the rest is never downloaded.
MAX_ERROR_BYTES = 64 * 1024


def check_http_config(config: Mapping[str, Any]) -> None:
    """ConfigError naming the key when `base_url`, `timeout` or `max_connections` is wrong."""
    base = config.get("base_url")
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError("adapter config `base_url` must be a string (an http(s) URL)")
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"adapter config `base_url` {base[:100]!r} is not an http(s) URL like "
                "https://api.example.com"
            )
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ConfigError(
                "adapter config `base_url` must not hold a user, password, query or fragment "
                "(credentials go among the adapter's credentials)"
            )
    check_timeout(config)
    connections = config.get("max_connections")
    if connections is not None and (
        isinstance(connections, bool)
        or not isinstance(connections, int)
        or not 1 <= connections <= 1000
    ):
        raise ConfigError("adapter config `max_connections` must be an integer in 1..1000")


def check_timeout(config: Mapping[str, Any]) -> None:
    """ConfigError naming the key unless config `timeout`, when set, is a number of seconds
    in (0, 300]."""
    timeout = config.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= 300
    ):
        raise ConfigError("adapter config `timeout` must be a number of seconds in (0, 300]")


def config_bool(config: Mapping[str, Any], key: str, *, provider: str | None = None) -> bool | None:
    """The adapter config boolean `key` (None when absent or null); ConfigError naming the
    key (and `provider`, when given) when it is anything but true or false."""
    value = config.get(key)
    if value is not None and not isinstance(value, bool):
        named = f"{provider} adapter" if provider else "adapter"
        raise ConfigError(f"{named} config `{key}` must be true or false")
    return value


def config_choice(
    config: Mapping[str, Any], key: str, choices: Collection[str], default: str
) -> str:
    """The adapter config string `key`, one of `choices` (`default` when absent, e.g. a
    region); ConfigError naming the key and the choices otherwise."""
    value = config_str(config, key) or default
    if value not in choices:
        raise ConfigError(
            f"adapter config `{key}` must be one of {' | '.join(choices)}, not {value[:40]!r}"
        )
    return value


def string_list(
    value: Any,
    *,
    least: int = 1,
    most: int,
    longest: int | None = None,
    ascii_only: bool = False,
    distinct: bool = False,
) -> bool:
    """Whether `value` is a list of `least` to `most` strings that are not blank, each at
    most `longest` characters, printable ASCII with `ascii_only`, no two alike with
    `distinct` (a config's tags or categories; the caller's error says its limits)."""
    return (
        isinstance(value, list)
        and least <= len(value) <= most
        and all(
            isinstance(item, str)
            and item.strip()
            and (longest is None or len(item) <= longest)
            and (not ascii_only or (item.isascii() and item.isprintable()))
            for item in value
        )
        and (not distinct or len(set(value)) == len(value))
    )


def config_str(
    config: Mapping[str, Any], key: str, *, required: bool = False, max_length: int = 1000
) -> str | None:
    """The adapter config string `key` (None when absent and not required); ConfigError
    naming the key otherwise."""
    return _str(config, key, "config", required=required, max_length=max_length)


def credential_str(
    credentials: Mapping[str, Any],
    key: str,
    *,
    required: bool = False,
    multiline: bool = False,
    ascii_only: bool = True,
) -> str | None:
    """The credential string `key`; the error names the key, never the value.

    A credential is printable ASCII (`ascii_only`, the default): it goes into an HTTP
    header, a URL or basic auth, where anything else fails at send (or changes bytes
    under a signature). `multiline`: line breaks and tabs allowed (a PEM key); other
    control characters are refused whatever the flags."""
    value = _str(
        credentials, key, "credential", required=required, max_length=16_384, multiline=multiline
    )
    if value is not None and ascii_only and not _printable_ascii(value, multiline=multiline):
        raise ConfigError(
            f"adapter credential `{key}` must be printable ASCII (no accented letters, "
            "typographic quotes, non-breaking spaces or line separators: it goes into HTTP "
            "headers and URLs; check it was copied whole and as issued)"
        )
    return value


def _printable_ascii(value: str, *, multiline: bool) -> bool:
    if multiline:
        value = value.replace("\r", "").replace("\n", "").replace("\t", "")
    return value.isascii() and value.isprintable()


def _str(
    values: Mapping[str, Any],
    key: str,
    what: str,
    *,
    required: bool,
    max_length: int,
    multiline: bool = False,
) -> str | None:
    value = values.get(key)
    if value is None:
        if required:
            raise ConfigError(f"adapter {what} `{key}` is required")
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"adapter {what} `{key}` must be a non-empty string")
    if len(value) > max_length:
        raise ConfigError(f"adapter {what} `{key}` is longer than {max_length} characters")
    allowed = "\r\n\t" if multiline else ""
    if any((ord(c) < 32 or ord(c) == 127) and c not in allowed for c in value):
        raise ConfigError(f"adapter {what} `{key}` must not contain control characters")
    return value


class HttpProvider:
    """The base of a provider that sends over HTTP: one `httpx.AsyncClient` per adapter
    (keep-alive, at most `max_connections` at once, no redirects followed), created from
    the adapter's config and the daemon's context.

    Subclasses set `provider` and `default_base_url`, and call `self.request(...)`, which
    turns transport failures into TransientError(provider_wide) and returns any answer.
    """

    provider: str = "http"
    default_base_url: str = ""

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext | None = None,
        *,
        base_url: str | None = None,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
    ) -> None:
        context = context or ChannelContext()
        config = adapter.config
        self.adapter = adapter
        self.context = context
        self.base_url = (base_url or config.get("base_url") or self.default_base_url).rstrip("/")
        self.timeout = float(config.get("timeout", 30.0))
        #: Requests this adapter may have open at once: the claim starts no more sends.
        self.capacity = int(config.get("max_connections", 10))
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            transport=context.transport,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(
                max_connections=self.capacity,
                max_keepalive_connections=self.capacity,
                keepalive_expiry=30.0,
            ),
            headers={"User-Agent": USER_AGENT, **(headers or {})},
            auth=auth,
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.adapter.name!r}, {urlsplit(self.base_url).netloc})"

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Send one request and read its answer, capped (see the module docstring); the
        adapter's `timeout` bounds the whole exchange, from connecting to the answer's last
        byte. TransientError(provider_wide) when no whole answer came in time, the
        connection failed, or a success answer is larger than MAX_ANSWER_BYTES (the error
        names the provider and the kind of failure, never the URL: it may hold a token).

        The answer returned holds its body read (an error's cut at MAX_ERROR_BYTES)."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(method, url, **kwargs)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise TransientError(
                f"{self.provider}: no whole answer within {self.timeout:g} s "
                f"(the adapter's `timeout`; {type(exc).__name__})",
                provider_wide=True,
            ) from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise TransientError(
                f"{self.provider}: {type(exc).__name__}: {_clip(urls_for_log(str(exc)))}",
                provider_wide=True,
            ) from exc

    async def _exchange(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async with self.client.stream(method, url, **kwargs) as response:
            success = response.is_success
            cap = MAX_ANSWER_BYTES if success else MAX_ERROR_BYTES
            answer, whole = await read_capped(response, cap)
            if success and not whole:
                raise TransientError(
                    f"{self.provider}: HTTP {response.status_code} answer larger than "
                    f"{cap // (1024 * 1024)} MiB, not read",
                    provider_wide=True,
                )
            return answer

    async def aclose(self) -> None:
        await self.client.aclose()


async def read_capped(response: httpx.Response, limit: int) -> tuple[httpx.Response, bool]:
    """A read copy of the streamed `response`, its body (decoded) cut at `limit` bytes, and
    whether that is all of it: reading stops past `limit`, the rest is never downloaded.
    The caller closes `response`."""
    content = bytearray()
    whole = True
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) > limit:
            del content[limit:]
            whole = False
            break
    return _answered(response, bytes(content)), whole


def _answered(response: httpx.Response, content: bytes) -> httpx.Response:
    # The body is decoded already: its encoding and length headers no longer describe it.
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(
        response.status_code,
        headers=headers,
        content=content,
        request=response.request,
        extensions={"http_version": response.http_version.encode()},
    )


def retry_after(response: httpx.Response, *, now: datetime | None = None) -> float | None:
    """Seconds from the `Retry-After` header (RFC 9110 §10.2.3: delay-seconds or an
    HTTP-date), at most a day; None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def json_body(response: httpx.Response) -> Any:
    """The answer's JSON (None when the body is empty or not JSON)."""
    if not response.content:
        return None
    try:
        return msgspec.json.decode(response.content)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: nested too deep
        return None


def json_object(text: str) -> dict[str, Any] | None:
    """The JSON object `text` holds (a rendered body that is one goes out as it is), else
    None."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        document = msgspec.json.decode(text)
    except (msgspec.DecodeError, RecursionError):
        return None
    return document if isinstance(document, dict) else None


def json_str(data: Any, key: str) -> str | None:
    """The non-empty string at `key` when `data` is a JSON object (an answer, a webhook
    record), else None."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else None


def json_dict(data: Any, key: str) -> dict[str, Any]:
    """The object at `key` when `data` is a JSON object and holds one there, else {}."""
    value = data.get(key) if isinstance(data, dict) else None
    return value if isinstance(value, dict) else {}


def detail(response: httpx.Response, message: str | None = None) -> str:
    """`HTTP 422: <the provider's message>`, clipped: the provider's own words for an error
    (`message` when the caller read it from the body, else the body's text)."""
    text = message if message is not None else response.text
    text = " ".join(text.split())
    return f"HTTP {response.status_code}: {_clip(text)}" if text else f"HTTP {response.status_code}"


def error_for_status(
    provider: str,
    response: httpx.Response,
    message: str | None = None,
    *,
    adapter_statuses: frozenset[int] = frozenset({401}),
) -> ChannelError:
    """The error for an answer that is not a success, by status alone: 408, 429 and 5xx
    transient (provider-wide, with Retry-After), `adapter_statuses` (401) pause the adapter,
    any other permanent. `message`: the provider's error text from the body."""
    status = response.status_code
    text = f"{provider}: {detail(response, message)}"
    if transient_status(status):
        return TransientError(text, provider_wide=True, retry_after=retry_after(response))
    if status in adapter_statuses:
        return AdapterError(text)
    return PermanentError(text)


def transient_status(status: int) -> bool:
    """Whether an HTTP status says "try again later": 408, 429 and 5xx."""
    return status in (408, 429) or status >= 500


def clip(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` on one line (runs of white space as one space), cut to `limit` characters
    (the last one "…"): a provider's words in an error or an event."""
    return _clip(" ".join(text.split()), limit)


def _clip(text: str, limit: int = MAX_DETAIL) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
