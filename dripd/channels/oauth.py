"""OAuth 2.0 access tokens for the `gmail` and `ms365` providers: the refresh-token grant
(RFC 6749 §6) through Authlib's httpx client, or a token provider of the host application.

dripd runs no consent flow. An adapter either holds a refresh token among its credentials,

    client_id       the OAuth client's id (an identifier, not a secret)
    client_secret   the OAuth client's secret
    refresh_token   the grant's refresh token (a rotated one replaces it in the store)

with the optional config keys `token_url` (the token endpoint; Google
https://oauth2.googleapis.com/token, Microsoft
https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token), and for `ms365` `tenant`
(default "common") and `scope` (default "https://graph.microsoft.com/Mail.Send
offline_access"); or it names a token provider in its config,

    token_provider  "package.module:function", an `async def fn(adapter_name, provider)`
                    answering a token string, a mapping {"access_token", "expires_in" (seconds)
                    or "expires_at" (aware datetime or epoch seconds)}, or "revoked"

Either way the access token is cached until it expires (less a margin of 60 s, or half its
lifetime when that is shorter; 5 minutes when no usable expiry was given; a provider's token
at most an hour, a token endpoint's at most a day), and one refresh at a time runs per
adapter, its result shared by the sends that waited for it. A refused grant is an
AdapterError (the adapter is paused with the reason); an unreachable or overloaded token
endpoint is a provider-wide TransientError. Neither ever carries a token: the texts name
the OAuth error code and the endpoint's description.

The token endpoint's answer is bounded like a provider's: the adapter's `timeout` covers the
whole refresh (connecting to the answer's last byte), and an answer larger than
MAX_TOKEN_ANSWER_BYTES is not read (both a provider-wide TransientError).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import math
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import authlib.deprecate
import httpx
import structlog

from dripd.channels.base import (
    AdapterError,
    ChannelContext,
    ChannelError,
    TransientError,
)
from dripd.channels.http import (
    USER_AGENT,
    HttpProvider,
    clip,
    config_str,
    credential_str,
    detail,
    error_for_status,
    retry_after,
    transient_status,
)
from dripd.clock import Clock, SystemClock
from dripd.errors import ConfigError
from dripd.model import Adapter
from dripd.pyload import LoadError, load_async_function, split_python_path

with warnings.catch_warnings():
    # Authlib's httpx integration prefers the `httpx2` distribution and warns once at import
    # when it falls back to httpx, which is what dripd uses everywhere; the warning would
    # otherwise reach every CLI run's stderr. (`authlib.deprecate`, imported above, installs
    # its "always" filter first, so this "ignore", added after it, takes precedence.)
    warnings.filterwarnings("ignore", category=authlib.deprecate.AuthlibDeprecationWarning)
    from authlib.integrations.base_client import OAuthError
    from authlib.integrations.httpx_client import AsyncOAuth2Client

__all__ = [
    "CONFIG_KEYS",
    "CREDENTIAL_KEYS",
    "GOOGLE_TOKEN_URL",
    "MICROSOFT_SCOPE",
    "REVOKED",
    "BearerProvider",
    "RefreshGrant",
    "TokenProvider",
    "TokenSource",
    "bearer_error",
    "check",
    "load_token_provider",
    "token_source",
]

log = structlog.get_logger("dripd.channels")

# The token endpoints (ruff's S105 reads "token" in a name as a password).
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"  # noqa: S105
MICROSOFT_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"  # noqa: S105
MICROSOFT_SCOPE = "https://graph.microsoft.com/Mail.Send offline_access"

#: What a token provider answers when the grant is gone: the adapter is paused.
REVOKED = "revoked"

#: The config keys of the token source (`tenant` and `scope` are read by `ms365` only).
CONFIG_KEYS = frozenset({"token_url", "tenant", "scope", "token_provider"})
CREDENTIAL_KEYS = frozenset({"client_id", "client_secret", "refresh_token"})
_GRANT_CONFIG = frozenset({"token_url", "tenant", "scope"})

#: OAuth error codes (RFC 6749 §5.2, Microsoft's token-endpoint table) that mean "try again
#: later"; any other code means the grant or the client is refused until an operator acts.
_TRANSIENT_CODES = frozenset({"temporarily_unavailable", "server_error"})

#: Refresh this long before the token's stated expiry (at most half its lifetime).
MARGIN = timedelta(seconds=60)
#: How long a token with no stated expiry is used.
DEFAULT_LIFETIME = timedelta(minutes=5)
#: How many issued tokens are kept for redaction (a send may still hold an older one).
ISSUED_KEPT = 4
#: The longest a token provider's token is used, whatever expiry it states.
MAX_PROVIDER_LIFETIME = timedelta(hours=1)
#: The longest a token endpoint's token is used, whatever `expires_in` it states.
MAX_GRANT_LIFETIME = timedelta(days=1)
#: The largest token endpoint answer read (bytes): a token answer is a few kilobytes.
MAX_TOKEN_ANSWER_BYTES = 1024 * 1024

_MAX_DESCRIPTION = 200
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")

TokenProviderFn = Callable[[str, str], Awaitable[Any]]


# -- configuration -----------------------------------------------------------------------------


def check(provider: str, config: Mapping[str, Any], credentials: Mapping[str, Any]) -> None:
    """ConfigError naming the key unless the adapter picks exactly one way to get tokens:
    `token_provider` in the config (and none of the grant's keys), or the credentials
    `client_id`, `client_secret` and `refresh_token` (with optional `token_url`, and for
    `ms365` `tenant` and `scope`). The token provider is only checked for its shape here;
    it is imported when the channel is built (`load_token_provider`)."""
    path = config_str(config, "token_provider")
    if path is not None:
        if held := sorted(CREDENTIAL_KEYS & set(credentials)):
            raise ConfigError(
                f"adapter credential `{held[0]}` is not used with config `token_provider`: "
                "give either a token provider or the refresh grant's credentials"
            )
        if extra := sorted(_GRANT_CONFIG & set(config)):
            raise ConfigError(
                f"adapter config `{extra[0]}` is not used with config `token_provider`"
            )
        if split_python_path(path) is None:
            raise ConfigError(
                f"adapter config `token_provider` {path[:100]!r} is not a Python path like "
                "'package.module:function'"
            )
        return
    if not CREDENTIAL_KEYS & set(credentials):
        raise ConfigError(
            "adapter credential `refresh_token` (with `client_id` and `client_secret`) or "
            "config `token_provider` is required: dripd needs one way to get access tokens"
        )
    for key in sorted(CREDENTIAL_KEYS):
        credential_str(credentials, key, required=True)
    _endpoint(provider, config)


@dataclass(frozen=True, slots=True)
class _Endpoint:
    url: str
    scope: str | None


def _endpoint(provider: str, config: Mapping[str, Any]) -> _Endpoint:
    url = config_str(config, "token_url")
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"adapter config `token_url` {url[:100]!r} is not an http(s) URL")
        if parts.username or parts.password or parts.fragment:
            raise ConfigError(
                "adapter config `token_url` must not hold a user, password or fragment"
            )
    if provider != "ms365":
        for key in ("tenant", "scope"):
            if key in config:
                raise ConfigError(f"adapter config `{key}` is for provider 'ms365' only")
        return _Endpoint(url or GOOGLE_TOKEN_URL, None)
    tenant = config_str(config, "tenant") or "common"
    if not _TENANT.fullmatch(tenant):
        raise ConfigError(
            "adapter config `tenant` must be `common`, `organizations`, `consumers`, a tenant "
            "id or a tenant's domain"
        )
    scope = config_str(config, "scope") or MICROSOFT_SCOPE
    if "," in scope:
        raise ConfigError(
            "adapter config `scope` separates its scopes with spaces, not commas "
            "(Microsoft refuses comma-separated scopes for work accounts)"
        )
    if "offline_access" not in scope.split():
        raise ConfigError(
            "adapter config `scope` must include `offline_access` (without it Microsoft "
            "returns no new refresh token)"
        )
    return _Endpoint(url or MICROSOFT_TOKEN_URL.format(tenant=tenant), " ".join(scope.split()))


def load_token_provider(path: str) -> TokenProviderFn:
    """The async function at `path` ("package.module:function"); ConfigError naming
    `token_provider` when it cannot be imported or is not an `async def` function."""
    try:
        return cast(TokenProviderFn, load_async_function(path))
    except LoadError as exc:
        # Not the imported code's own text: it may hold a token.
        raise ConfigError(
            f"adapter config `token_provider` {path[:100]!r}: {exc.message}"
        ) from None


# -- token sources ------------------------------------------------------------------------------


class TokenSource(Protocol):
    """Where an adapter's access tokens come from."""

    async def token(self, *, rejected: str | None = None) -> str:
        """A current access token. `rejected`: a token the API just refused (HTTP 401),
        which is not answered again: a fresh one is fetched unless another send already
        replaced it. AdapterError when the grant is refused, TransientError when the
        token endpoint cannot answer now."""
        ...

    async def aclose(self) -> None:
        """Release the token source's connections."""
        ...


def token_source(
    adapter: Adapter, context: ChannelContext, *, clock: Clock, timeout: float = 30.0
) -> TokenSource:
    """The adapter's token source: a `TokenProvider` when its config names `token_provider`
    (imported now: ConfigError naming the key), else a `RefreshGrant`."""
    path = config_str(adapter.config, "token_provider")
    if path is not None:
        return TokenProvider(
            load_token_provider(path),
            adapter_name=adapter.name,
            provider=adapter.provider,
            path=path,
            clock=clock,
        )
    return RefreshGrant(adapter, context, clock=clock, timeout=timeout)


class _CachedToken:
    """The cache and the one-refresh-at-a-time lock both token sources share."""

    def __init__(self, *, clock: Clock, provider: str, max_lifetime: timedelta | None) -> None:
        self._clock = clock
        self._provider = provider
        self._max_lifetime = max_lifetime
        self._lock = asyncio.Lock()
        self._value: str | None = None
        self._fresh_until: datetime | None = None
        # Refreshes finished so far, and how the last one failed (None: it succeeded): a send
        # that waited on the lock while a refresh failed gets that failure, not a new try.
        self._finished = 0
        self._failure: ChannelError | None = None
        #: Tokens fetched so far (for statistics and tests).
        self.fetches = 0
        #: The secrets this source was issued, newest last (the access tokens, a rotated
        #: refresh token): a few are kept, as a send may still hold the one before.
        self.issued: collections.deque[str] = collections.deque(maxlen=ISSUED_KEPT)

    async def token(self, *, rejected: str | None = None) -> str:
        seen = self._finished
        async with self._lock:
            if self._finished != seen and self._failure is not None:
                raise _again(self._failure)
            now = self._clock.now()
            if (
                self._value is not None
                and self._value != rejected
                and self._fresh_until is not None
                and now < self._fresh_until
            ):
                return self._value
            self._value = None
            try:
                value, expires_at = await self._fetch()
            except ChannelError as exc:
                self._failure = exc
                raise
            finally:
                self._finished += 1
            self._failure = None
            self.fetches += 1
            self._issue(value)
            self._value = value
            self._fresh_until = self._until(now, expires_at)
            return value

    def _issue(self, secret: str) -> None:
        if secret not in self.issued:
            self.issued.append(secret)

    def _until(self, now: datetime, expires_at: datetime | None) -> datetime:
        if expires_at is None:
            until = now + DEFAULT_LIFETIME
        else:
            until = expires_at - min(MARGIN, max(expires_at - now, timedelta(0)) / 2)
        if self._max_lifetime is not None:
            until = min(until, now + self._max_lifetime)
        return until

    async def _fetch(self) -> tuple[str, datetime | None]:
        raise NotImplementedError


class RefreshGrant(_CachedToken):
    """Access tokens from the OAuth 2.0 refresh-token grant (RFC 6749 §6): a form-encoded
    POST of `grant_type=refresh_token`, `refresh_token`, `client_id`, `client_secret` (and
    `scope` for Microsoft) to the token endpoint, by Authlib's `AsyncOAuth2Client` over the
    context's transport. A new `refresh_token` in the answer (Microsoft rotates them)
    replaces the held one and is stored through `context.save_credentials`.

    Answers: OAuth error `temporarily_unavailable` or `server_error`, HTTP 408, 429 and 5xx,
    and network failures are TransientError(provider_wide); any other OAuth error
    (`invalid_grant`, `interaction_required`, `consent_required`, `invalid_client`,
    `unauthorized_client`, …) or 4xx is AdapterError("oauth refresh refused: <code>: …").
    """

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext,
        *,
        clock: Clock,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(clock=clock, provider=adapter.provider, max_lifetime=None)
        endpoint = _endpoint(adapter.provider, adapter.config)
        self._url = endpoint.url
        self._scope = endpoint.scope
        self._credentials = dict(adapter.credentials)
        grant = {
            key: credential_str(self._credentials, key, required=True) or ""
            for key in sorted(CREDENTIAL_KEYS)
        }
        self._refresh_token = grant["refresh_token"]
        self._save = context.save_credentials
        self._unsaved_logged = False
        self._adapter_name = adapter.name
        self._timeout = timeout
        self._client = AsyncOAuth2Client(
            client_id=grant["client_id"],
            client_secret=grant["client_secret"],
            # RFC 6749 §2.3.1: both Google and Microsoft document the secret in the form body.
            token_endpoint_auth_method="client_secret_post",  # noqa: S106 - a method's name
            transport=context.transport,
            timeout=httpx.Timeout(timeout),
            # Uncompressed: the answer's cap counts the bytes as they arrive.
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            event_hooks={"response": [_cap_answer]},
            follow_redirects=False,
            trust_env=False,
        )
        self._client.register_compliance_hook("refresh_token_response", self._checked_answer)

    def __repr__(self) -> str:
        return f"RefreshGrant({self._adapter_name!r}, {urlsplit(self._url).netloc})"

    async def aclose(self) -> None:
        await self._client.aclose()

    def _checked_answer(self, response: httpx.Response) -> httpx.Response:
        # Before Authlib reads the body: a 429 or 503 may carry an OAuth-looking JSON error.
        status = response.status_code
        if transient_status(status):
            raise TransientError(
                f"{self._provider}: oauth token endpoint answered HTTP {status}",
                provider_wide=True,
                retry_after=retry_after(response, now=self._clock.now()),
            )
        return _sane_expiry(response)

    async def _fetch(self) -> tuple[str, datetime | None]:
        sent = self._refresh_token
        where = f"{self._provider}: oauth refresh"
        kwargs: dict[str, Any] = {"scope": self._scope} if self._scope else {}
        try:
            async with asyncio.timeout(self._timeout):
                token = await self._client.refresh_token(self._url, refresh_token=sent, **kwargs)
        except _AnswerTooLarge as exc:
            raise TransientError(
                f"{where}: the token endpoint's answer is larger than "
                f"{MAX_TOKEN_ANSWER_BYTES // 1024} KiB, not read",
                provider_wide=True,
            ) from exc
        except OAuthError as exc:
            code = _code(exc.error)
            text = (
                f"{code}: {clip(str(exc.description), _MAX_DESCRIPTION)}"
                if exc.description
                else code
            )
            if code in _TRANSIENT_CODES:
                raise TransientError(f"{where} failed: {text}", provider_wide=True) from exc
            raise AdapterError(f"{where} refused: {text}") from exc
        except httpx.HTTPStatusError as exc:
            # A 4xx whose body is not an OAuth error (a wrong `token_url`, a proxy's page).
            status = exc.response.status_code
            raise AdapterError(
                f"{where} refused: HTTP {status} (no OAuth error in the answer)"
            ) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise TransientError(
                f"{where}: no whole answer from the token endpoint within {self._timeout:g} s "
                f"(the adapter's `timeout`; {type(exc).__name__})",
                provider_wide=True,
            ) from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise TransientError(
                f"{where}: cannot reach the token endpoint ({type(exc).__name__})",
                provider_wide=True,
            ) from exc
        except (ValueError, TypeError, OverflowError) as exc:
            # A 2xx answer that is not a JSON object, or an unreadable `expires_in`.
            raise TransientError(
                f"{where}: unreadable answer from the token endpoint ({type(exc).__name__})",
                provider_wide=True,
            ) from exc
        access = token.get("access_token")
        if not _usable(access):
            raise TransientError(
                f"{where}: the answer holds no usable access_token", provider_wide=True
            )
        rotated = token.get("refresh_token")
        if isinstance(rotated, str) and rotated and rotated != sent:
            if _usable(rotated):
                await self._rotate(rotated)
            else:
                # Stored, it would fail the adapter's credential check at the next start.
                log.warning(
                    "rotated refresh token not usable (empty, too long, not printable ASCII); "
                    "the one held is kept",
                    provider=self._provider,
                    adapter=self._adapter_name,
                )
        lifetime = _lifetime(token.get("expires_in"))
        now = self._clock.now()
        return cast(str, access), (now + lifetime if lifetime is not None else None)

    async def _rotate(self, refresh_token: str) -> None:
        # Held at once: the next refresh uses it even if storing it fails (Microsoft keeps
        # the previous one valid, so the stored credentials still work after a restart).
        self._refresh_token = refresh_token
        self._credentials["refresh_token"] = refresh_token
        self._issue(refresh_token)
        if self._save is None:
            if not self._unsaved_logged:
                self._unsaved_logged = True
                log.warning(
                    "rotated refresh token kept in memory only (no credential store here)",
                    provider=self._provider,
                    adapter=self._adapter_name,
                )
            return
        try:
            await self._save(dict(self._credentials))
        except Exception as exc:  # noqa: BLE001 - the store's errors must not fail the send
            log.warning(
                "could not store the rotated refresh token; kept in memory",
                provider=self._provider,
                adapter=self._adapter_name,
                error=type(exc).__name__,
            )


class TokenProvider(_CachedToken):
    """Access tokens from the host application's `async def fn(adapter_name, provider)`.

    It answers a token string, a mapping {"access_token", "expires_in" (seconds) or
    "expires_at" (aware datetime or epoch seconds)}, or `REVOKED` ("revoked": the grant is
    gone, AdapterError). An exception it raises is a provider-wide TransientError naming
    its type (its text may hold a token); a ChannelError it raises passes through.
    """

    def __init__(
        self,
        fn: TokenProviderFn,
        *,
        adapter_name: str,
        provider: str,
        path: str,
        clock: Clock,
    ) -> None:
        super().__init__(clock=clock, provider=provider, max_lifetime=MAX_PROVIDER_LIFETIME)
        self._fn = fn
        self._adapter_name = adapter_name
        self._path = path

    def __repr__(self) -> str:
        return f"TokenProvider({self._adapter_name!r}, {self._path!r})"

    async def aclose(self) -> None:
        return None

    async def _fetch(self) -> tuple[str, datetime | None]:
        where = f"{self._provider}: token provider {self._path}"
        try:
            answer = await self._fn(self._adapter_name, self._provider)
        except ChannelError:
            raise
        except Exception as exc:  # host code may raise anything; its text may hold a token
            raise TransientError(
                f"{where} raised {type(exc).__name__}", provider_wide=True
            ) from exc
        if isinstance(answer, str):
            if answer == REVOKED:
                raise AdapterError(f"{where} says the grant is revoked")
            if not _usable(answer):
                raise AdapterError(f"{where} answered an unusable token (empty or with spaces)")
            return answer, None
        if not isinstance(answer, Mapping):
            raise AdapterError(
                f"{where} answered a {type(answer).__name__}, not a token or a mapping"
            )
        access = answer.get("access_token")
        if access == REVOKED:
            raise AdapterError(f"{where} says the grant is revoked")
        if not _usable(access):
            raise AdapterError(f"{where} answered no usable `access_token`")
        try:
            expires_at = _expires_at(
                self._clock.now(), answer.get("expires_in"), answer.get("expires_at")
            )
        except (ValueError, TypeError) as exc:
            raise AdapterError(f"{where}: {exc}") from None
        return cast(str, access), expires_at


class _AnswerTooLarge(Exception):
    """The token endpoint's answer went past MAX_TOKEN_ANSWER_BYTES."""


class _CappedStream(httpx.AsyncByteStream):
    """An answer's body that stops with _AnswerTooLarge past MAX_TOKEN_ANSWER_BYTES."""

    def __init__(self, stream: httpx.AsyncByteStream) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        read = 0
        async for chunk in self._stream:
            read += len(chunk)
            if read > MAX_TOKEN_ANSWER_BYTES:
                raise _AnswerTooLarge
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _cap_answer(response: httpx.Response) -> None:
    # A response hook runs before the body is read: the read goes through the cap.
    if isinstance(response.stream, httpx.AsyncByteStream):
        response.stream = _CappedStream(response.stream)


def _lifetime(expires_in: Any) -> timedelta | None:
    """A token endpoint's `expires_in` (seconds, a number or a numeric string) as a
    lifetime of at most MAX_GRANT_LIFETIME (a huge one, infinity included, is cut to it);
    None when it is absent or unusable (not a number, NaN, not positive): the token is then
    used DEFAULT_LIFETIME."""
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float | str):
        return None
    if isinstance(expires_in, int):
        expires_in = max(min(expires_in, 10**9), 0)  # float() of a huge int overflows
    try:
        seconds = float(expires_in)
    except ValueError:
        return None
    if math.isnan(seconds) or seconds <= 0:
        return None
    return min(timedelta(seconds=min(seconds, 1e9)), MAX_GRANT_LIFETIME)


def _sane_expiry(response: httpx.Response) -> httpx.Response:
    """`response` with its JSON's `expires_in` made whole seconds within MAX_GRANT_LIFETIME
    (or dropped when unusable) and `expires_at` dropped: Authlib turns them into an int
    itself, which fails on a huge, NaN or odd value. Anything else is left as it is."""
    try:
        data = response.json()
    except ValueError:
        return response
    if not isinstance(data, dict) or not ({"expires_in", "expires_at"} & data.keys()):
        return response
    lifetime = _lifetime(data.pop("expires_in", None))
    data.pop("expires_at", None)
    if lifetime is not None:
        data["expires_in"] = int(lifetime.total_seconds())
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    # json.dumps writes what json.loads read (NaN elsewhere in the answer included).
    content = json.dumps(data).encode()
    return httpx.Response(
        response.status_code, headers=headers, content=content, request=response.request
    )


def _expires_at(now: datetime, expires_in: Any, expires_at: Any) -> datetime | None:
    """When a token expires, from `expires_in` (seconds, a number or a numeric string, as
    some endpoints send it) or `expires_at` (aware datetime or epoch seconds); None if
    neither is given. ValueError when one is given but unreadable."""
    if expires_in is not None:
        seconds = _seconds(expires_in, "expires_in")
        return now + timedelta(seconds=max(seconds, 0.0))
    if expires_at is None:
        return None
    if isinstance(expires_at, datetime):
        if expires_at.tzinfo is None:
            raise ValueError("`expires_at` must be an aware datetime")
        return expires_at.astimezone(UTC)
    return datetime.fromtimestamp(_seconds(expires_at, "expires_at"), UTC)


def _seconds(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"`{key}` must be a number of seconds")
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"`{key}` must be a number of seconds") from None
    if not math.isfinite(seconds) or abs(seconds) > 1e11:
        raise ValueError(f"`{key}` must be a finite number of seconds")
    return seconds


def _usable(token: Any) -> bool:
    # A token goes into an Authorization header: no whitespace or control characters.
    return (
        isinstance(token, str)
        and 0 < len(token) <= 16_384
        and token.isascii()
        and token.isprintable()
        and not any(c.isspace() for c in token)
    )


def _code(error: Any) -> str:
    text = str(error or "oauth_error")
    return text if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text) else "oauth_error"


def _again(exc: ChannelError) -> ChannelError:
    """The same failure for another waiter, without the first one's traceback."""
    again = copy.copy(exc)
    again.__traceback__ = None
    return again


# -- the shared channel base --------------------------------------------------------------------


class BearerProvider(HttpProvider):
    """An HTTP provider that authorises each request with an OAuth bearer token from its
    adapter's token source, and on HTTP 401 fetches a fresh token and sends once more."""

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext | None = None,
        *,
        clock: Clock | None = None,
        tokens: TokenSource | None = None,
    ) -> None:
        context = context or ChannelContext()
        super().__init__(adapter, context)
        self.clock: Clock = clock or SystemClock()
        self.tokens = tokens or token_source(
            adapter, context, clock=self.clock, timeout=self.timeout
        )

    async def authorized(
        self, method: str, url: str, *, headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> httpx.Response:
        """Send with `Authorization: Bearer <token>`; after a 401, once more with a fresh
        token. Returns the last answer (a second 401 is the caller's to map)."""
        token = await self.tokens.token()
        response = await self.request(method, url, headers=_bearer(headers, token), **kwargs)
        if response.status_code != 401:
            return response
        token = await self.tokens.token(rejected=token)
        return await self.request(method, url, headers=_bearer(headers, token), **kwargs)

    @property
    def issued_secrets(self) -> Iterable[str]:
        """The tokens the token source was issued (redacted from every error)."""
        return tuple(getattr(self.tokens, "issued", ()))

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.tokens.aclose()


def _bearer(headers: Mapping[str, str] | None, token: str) -> dict[str, str]:
    return {**(headers or {}), "Authorization": f"Bearer {token}"}


def bearer_error(provider: str, response: httpx.Response, message: str | None) -> ChannelError:
    """The error for an answer of `BearerProvider.authorized` that is not a success: 401
    (refused after a token refresh), 403 (no consent, access denied) and 404 (no such
    mailbox) pause the adapter; 408, 429 and 5xx are transient (provider-wide, Retry-After
    honoured); any other status is permanent. `message`: the API's own words."""
    if response.status_code == 401:
        return AdapterError(f"{provider}: {detail(response, message)} (after a token refresh)")
    return error_for_status(provider, response, message, adapter_statuses=frozenset({403, 404}))
