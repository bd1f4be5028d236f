"""Short links for a message's destinations: dripd's own (`GET /l/{code}`, dripd.http.links)
or a `webhook` shortener's, made once per (execution, destination) and reused on retry."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import string
import uuid
from collections.abc import Sequence
from typing import Final, Literal, assert_never
from urllib.parse import urlsplit

import httpx

from dripd.channels.http import (
    MAX_ERROR_BYTES,
    USER_AGENT,
    clip,
    detail,
    json_object,
    json_str,
    read_capped,
)
from dripd.config import ShortLinks
from dripd.db import links as link_store
from dripd.db import store
from dripd.engine.gather import Gathered
from dripd.engine.pipeline import ShortenError
from dripd.errors import DripdError
from dripd.metrics import Metrics
from dripd.redaction import Redactor, url_for_log, urls_for_log

#: The alphabet and length of dripd's codes. 62**10 ≈ 8.4e17 codes (59.5 bits from
#: `secrets`, the OS's CSPRNG): against 10 million live links, an attacker guessing 1000
#: codes a second finds one about every 2.7 years, and what a guess gains is a marketing
#: URL and a false click, never a secret (links carrying tokens or signatures are excluded
#: from shortening by default). Short enough for an SMS.
CODE_ALPHABET: Final = string.ascii_letters + string.digits
CODE_LENGTH: Final = 10
#: The longest short URL stored (the column's bound).
MAX_SHORT_URL: Final = 2048
#: The longest destination stored (the column's bound).
MAX_DESTINATION: Final = 8192
#: Shortener requests in flight at once, from this daemon.
WEBHOOK_CONCURRENCY: Final = 8
#: Inserts tried before giving up on codes that keep colliding (one collision in 8.4e17/N
#: inserts already: a second in a row means a broken random source, not bad luck).
_CODE_ATTEMPTS: Final = 3


def new_code() -> str:
    """A fresh code for dripd's redirect: CODE_LENGTH characters of CODE_ALPHABET, one
    uniform draw from the operating system's random source (`secrets.randbelow`)."""
    number = secrets.randbelow(len(CODE_ALPHABET) ** CODE_LENGTH)
    digits = []
    for _ in range(CODE_LENGTH):
        number, digit = divmod(number, len(CODE_ALPHABET))
        digits.append(CODE_ALPHABET[digit])
    return "".join(digits)


def idempotency_key(execution_id: uuid.UUID, destination: str) -> str:
    """The key the `webhook` shortener gets with a destination: the SHA-256 (hex) of the
    execution id's text (36 characters) followed by the destination."""
    return hashlib.sha256(f"{execution_id}{destination}".encode()).hexdigest()


# One message's dripd links to make: (execution id, tenant, destination → track).
_DripdAsk = tuple[uuid.UUID, str | None, dict[str, bool]]


class LinkMaker:
    """Makes the short links of a message, one per (execution, provider, destination).

    `settings` is `[short_links]`; `base_url` is where this daemon's `/l/{code}` is reached
    (`short_links.base_url`, else the HTTP listener: dripd.engine.rulebook.short_base_url).
    `client` (tests: an `httpx.MockTransport`'s) is the caller's to close; without one, a
    client of its own is made and closed by `aclose`.
    """

    def __init__(
        self,
        *,
        pool: store.Pool,
        settings: ShortLinks,
        base_url: str,
        metrics: Metrics,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._pool = pool
        self._hook = settings
        self._timeout = settings.seconds("webhook_timeout")
        self._base = base_url.rstrip("/")
        self._metrics = metrics
        self._redact = Redactor([self._hook.webhook_token] if self._hook.webhook_token else [])
        self._slots = asyncio.Semaphore(WEBHOOK_CONCURRENCY)
        # Concurrent sends' dripd links, stored together (one statement for many messages).
        self._dripd_links: Gathered[_DripdAsk, dict[str, str]] = Gathered(self._store_dripd)
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout),
            limits=httpx.Limits(
                max_connections=WEBHOOK_CONCURRENCY, max_keepalive_connections=WEBHOOK_CONCURRENCY
            ),
            follow_redirects=False,
            trust_env=False,
        )

    async def aclose(self) -> None:
        """Close the HTTP client this maker made (not one it was given)."""
        if self._own_client:
            await self._client.aclose()

    async def shorten(
        self,
        *,
        execution_id: uuid.UUID,
        tenant: str | None,
        provider: Literal["dripd", "webhook"],
        links: Sequence[tuple[str, bool]],
    ) -> dict[str, str]:
        """The short URL (value) of each destination (key) of `links`, pairs of (destination,
        track), made by `provider` or, when execution `execution_id` made them before,
        reused. `track`: a click on the link is recorded (false for a `src` link); a
        destination given twice is tracked only if every use of it is (an image fetched on
        every open would otherwise count as a click).

        `dripd`: new codes (see CODE_ALPHABET) stored in one round trip, short URL
        `<base_url>/l/<code>`. `webhook`: the links stored before, then one POST to
        `short_links.webhook_url` per missing destination (README, Short links); the
        answers that came are stored even when another failed, so a retry asks only for the
        rest. Raises ShortenError when the shortener or the database fails."""
        wanted: dict[str, bool] = {}
        for destination, track in links:
            wanted[destination] = wanted.get(destination, True) and track
        if not wanted:
            return {}
        try:
            too_long = next((d for d in wanted if len(d) > MAX_DESTINATION), None)
            if too_long is not None:
                raise ShortenError(
                    f"a link of {len(too_long)} characters is longer than the "
                    f"{MAX_DESTINATION} a short link may lead to: {url_for_log(too_long)}"
                )
            if provider == "dripd":
                return await self._dripd(execution_id, tenant, wanted)
            if provider == "webhook":
                return await self._webhook(execution_id, tenant, wanted)
            assert_never(provider)
        except DripdError as exc:
            self._metrics.short_link_errors.labels(provider=provider).inc()
            raise ShortenError(f"the database failed: {exc.message}") from exc
        except ShortenError:
            self._metrics.short_link_errors.labels(provider=provider).inc()
            raise

    async def _dripd(
        self, execution_id: uuid.UUID, tenant: str | None, wanted: dict[str, bool]
    ) -> dict[str, str]:
        return await self._dripd_links.ask((execution_id, tenant, wanted))

    async def _store_dripd(self, asks: list[_DripdAsk]) -> list[dict[str, str]]:
        """The dripd links of the executions asking together, in one statement (new codes
        for all, again, when one was taken)."""
        for _ in range(_CODE_ATTEMPTS):
            # Two attempts of one execution asking together get one link per destination.
            rows: list[link_store.LinkRow] = list(
                {
                    (execution_id, destination): (
                        execution_id,
                        tenant,
                        destination,
                        code,
                        f"{self._base}/l/{code}",
                        track,
                    )
                    for execution_id, tenant, wanted in reversed(asks)
                    for destination, track in wanted.items()
                    for code in (new_code(),)
                }.values()
            )
            try:
                stored = await link_store.insert_links(self._pool, "dripd", rows)
            except link_store.CodeTaken:
                continue
            made = sum(stored.get((row[0], row[2])) == row[4] for row in rows)
            self._metrics.short_links_created.labels(provider="dripd").inc(made)
            return [
                {destination: stored[execution_id, destination] for destination in wanted}
                for execution_id, _, wanted in asks
            ]
        raise ShortenError(f"new codes were taken {_CODE_ATTEMPTS} times in a row")

    async def _webhook(
        self, execution_id: uuid.UUID, tenant: str | None, wanted: dict[str, bool]
    ) -> dict[str, str]:
        stored = await link_store.links_for(self._pool, execution_id, "webhook", list(wanted))
        missing = [destination for destination in wanted if destination not in stored]
        if not missing:
            return stored
        if not self._hook.webhook_url:
            raise ShortenError(
                'short_links.webhook_url: not set, and a step uses short_links provider "webhook"'
            )
        answers = await asyncio.gather(*(self._ask(execution_id, d) for d in missing))
        rows: list[link_store.LinkRow] = [
            (execution_id, tenant, d, None, url, wanted[d])
            for d, url in zip(missing, answers, strict=True)
            if isinstance(url, str)
        ]
        if rows:
            new = await link_store.insert_links(self._pool, "webhook", rows)
            made = sum(new.get((row[0], row[2])) == row[4] for row in rows)
            self._metrics.short_links_created.labels(provider="webhook").inc(made)
            stored |= {destination: url for (_, destination), url in new.items()}
        failed = next((a for a in answers if isinstance(a, ShortenError)), None)
        if failed is not None:
            raise failed
        return stored

    async def _ask(self, execution_id: uuid.UUID, destination: str) -> str | ShortenError:
        """The shortener's short URL for `destination`, or the error that one request met
        (the others go on: their answers are stored)."""
        try:
            async with self._slots:
                return await self._post(execution_id, destination)
        except ShortenError as exc:
            return exc

    async def _post(self, execution_id: uuid.UUID, destination: str) -> str:
        hook = self._hook
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if hook.webhook_token:
            headers["Authorization"] = f"Bearer {hook.webhook_token}"
        body = {
            "url": destination,
            "idempotency_key": idempotency_key(execution_id, destination),
            "execution_id": str(execution_id),
        }
        where = "short_links.webhook_url"
        try:
            async with (
                asyncio.timeout(self._timeout),
                self._client.stream(
                    "POST", hook.webhook_url, json=body, headers=headers
                ) as response,
            ):
                answer, whole = await read_capped(response, MAX_ERROR_BYTES)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise ShortenError(
                f"{where}: no whole answer within {hook.webhook_timeout} "
                "(short_links.webhook_timeout)"
            ) from exc
        except httpx.HTTPError as exc:
            text = clip(self._redact(urls_for_log(str(exc))))
            raise ShortenError(f"{where}: {type(exc).__name__}: {text}") from exc
        if not answer.is_success:
            raise ShortenError(f"{where}: the shortener answered {self._redact(detail(answer))}")
        if not whole:
            raise ShortenError(f"{where}: the answer is larger than {MAX_ERROR_BYTES} bytes")
        document = json_object(answer.text)
        if document is None:
            raise ShortenError(f"{where}: the answer is not a JSON object")
        url = json_str(document, hook.webhook_field)
        if url is None:
            raise ShortenError(
                f"{where}: the answer has no string at {hook.webhook_field!r} "
                "(short_links.webhook_field)"
            )
        problem = _short_url_problem(url)
        if problem is not None:
            shown = clip(self._redact(url), 100)
            raise ShortenError(f"{where}: the answer's {hook.webhook_field!r} {shown!r} {problem}")
        return url


def _short_url_problem(url: str) -> str | None:
    """What is wrong with a shortener's answer as a link in a message, or None."""
    if len(url) > MAX_SHORT_URL:
        return f"is longer than {MAX_SHORT_URL} characters"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "holds spaces or control characters"
    try:
        parts = urlsplit(url)
        absolute = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a malformed IPv6 host
        absolute = False
    return None if absolute else "is not an absolute http(s) URL"
