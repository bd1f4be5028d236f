"""Requests to a URL an operator configured (the `webhook` and `slack` providers), through
the network guard of HTTP hooks (dripd.netguard).

Each send parses the URL against the daemon's `NetPolicy` (`[hooks] allow_http` and
`allowed_networks`; without one, https to public addresses only), resolves its host once,
checks every address, and connects to a checked address itself with the name in the `Host`
header and the TLS SNI (`dripd.netguard.pinned_request`), so a second DNS answer cannot
rebind the name to an internal address. Redirects are never followed and no cookie is kept.

    URL or address refused by the policy   AdapterError (the operator must change the URL
                                           or the policy): the adapter is paused
    host does not resolve, connection      TransientError(provider_wide)
    refused or reset, no answer in time

Error texts name the provider, the key holding the URL and its host, never the URL itself:
its path or query may be a secret (a Slack incoming-webhook URL is the credential).
"""

from __future__ import annotations

import asyncio
import http.cookiejar
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

import httpx

from dripd.channels.base import AdapterError, ChannelContext, TransientError
from dripd.channels.http import MAX_ERROR_BYTES, HttpProvider, read_capped
from dripd.errors import ConfigError, HookError
from dripd.model import Adapter
from dripd.netguard import (
    NetPolicy,
    Resolver,
    Target,
    checked_addresses,
    parse_target,
    pinned_request,
    resolve_host,
)
from dripd.redaction import urls_for_log

__all__ = ["MAX_ANSWER_BYTES", "GuardedProvider", "check_url_value"]

#: The most of an answer's body read (for the error text): the rest is never downloaded.
MAX_ANSWER_BYTES: Final = MAX_ERROR_BYTES


def check_url_value(value: Any, where: str) -> str:
    """`value` if it is an absolute http(s) URL with a host and no user information;
    ConfigError naming `where` (e.g. "config `url`") otherwise, never quoting the value.
    Whether http is allowed and where the host points is the policy's, checked at send."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"adapter {where} must be a non-empty string (an https URL)")
    if len(value) > 2000:
        raise ConfigError(f"adapter {where} is longer than 2000 characters")
    if value != value.strip() or any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ConfigError(f"adapter {where} must not contain spaces or control characters")
    if not (value.isascii() and value.isprintable()):
        # httpx would percent-encode them: another URL than the one given (and a secret
        # URL in a form its redaction does not know).
        raise ConfigError(
            f"adapter {where} must be printable ASCII: write an international domain as "
            "xn--… and percent-encode other characters"
        )
    try:
        parsed = httpx.URL(value)
    except httpx.InvalidURL:
        raise ConfigError(f"adapter {where} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"adapter {where} must be an http(s) URL like https://example.com/hook")
    if parsed.userinfo:
        raise ConfigError(f"adapter {where} must not contain a user or password")
    if parsed.fragment:
        raise ConfigError(f"adapter {where} must not contain a fragment (`#…`)")
    return value


class GuardedProvider(HttpProvider):
    """An HTTP provider that posts to one operator-configured URL, each request to an
    address the network guard has just checked (see the module docstring).

    `url` is the target; `where` names the key holding it in errors ("config `url`").
    `resolve` looks a host up (tests give their own; default: the event loop's resolver).
    """

    def __init__(
        self,
        adapter: Adapter,
        context: ChannelContext | None,
        *,
        url: str,
        where: str,
        resolve: Resolver = resolve_host,
    ) -> None:
        super().__init__(adapter, context)
        self.policy = self.context.net_policy or NetPolicy()
        self._url = url
        self._where = where
        self._resolve = resolve
        # Each message stands alone: nothing a receiver sets comes back with the next one.
        self.client.cookies = http.cookiejar.CookieJar(
            http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.adapter.name!r}, {urlsplit(self._url).hostname})"

    async def post(self, content: bytes, headers: Mapping[str, str]) -> httpx.Response:
        """POST `content` to the URL; the answer, its body cut at MAX_ANSWER_BYTES.

        Raises AdapterError when the policy refuses the URL or an address of its host, and
        TransientError(provider_wide) when the host does not resolve, no connection to any
        of its addresses succeeds, or no answer came within the adapter's `timeout`.
        """
        target = self._target()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._post(target, content, headers)
        except TimeoutError as exc:
            raise TransientError(
                f"{self.provider}: no whole answer from {target.host!r} within "
                f"{self.timeout:g} s (the adapter's `timeout`)",
                provider_wide=True,
            ) from exc

    def _target(self) -> Target:
        try:
            return parse_target(self._url, self.policy)
        except HookError as exc:
            raise AdapterError(f"{self.provider}: {self._where} refused: {exc.message}") from None

    async def _post(
        self, target: Target, content: bytes, headers: Mapping[str, str]
    ) -> httpx.Response:
        try:
            addresses = await checked_addresses(target, self.policy, self._resolve)
        except HookError as exc:
            raise AdapterError(f"{self.provider}: {self._where} refused: {exc.message}") from None
        except OSError as exc:
            raise TransientError(
                f"{self.provider}: cannot resolve {target.host!r}: {exc.strerror or exc}",
                provider_wide=True,
            ) from exc
        for n, address in enumerate(addresses):
            request = pinned_request(
                self.client, "POST", target, address, headers=dict(headers), content=content
            )
            try:
                response = await self.client.send(request, stream=True)
            except httpx.ConnectError as exc:
                # Nothing was sent: the host's next address may answer.
                if n + 1 < len(addresses):
                    continue
                raise self._unreachable(target, exc) from exc
            except httpx.TimeoutException as exc:
                raise TimeoutError from exc
            except httpx.TransportError as exc:
                raise self._unreachable(target, exc) from exc
            try:
                answer, _ = await read_capped(response, MAX_ANSWER_BYTES)
                return answer
            except httpx.TimeoutException as exc:
                raise TimeoutError from exc
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise self._unreachable(target, exc) from exc
            finally:
                await response.aclose()
        raise AssertionError("checked_addresses returns at least one address")

    def _unreachable(self, target: Target, exc: httpx.RequestError) -> TransientError:
        text = urls_for_log(str(exc))[:200]
        kind = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return TransientError(f"{self.provider}: {target.host!r}: {kind}", provider_wide=True)
