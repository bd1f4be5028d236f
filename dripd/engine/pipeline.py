"""One claimed execution's path: gate → render → send → outcome. No SQL here."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, Protocol
from zoneinfo import ZoneInfo

import anyio
import structlog

from dripd import config
from dripd.addresses import InvalidAddress, domain_of, normalize, recipient
from dripd.channels.base import (
    AdapterError,
    Channel,
    Message,
    PermanentError,
    TransientError,
    mailbox_header,
)
from dripd.channels.credentials import Vault
from dripd.clock import Clock
from dripd.conditions.expr import evaluate_safely
from dripd.conditions.hooks import HookEnrollment, HookError, Hooks, HookStep
from dripd.conditions.hookspecs import PythonHookSpec
from dripd.config import ShortLinkRules, merge_link_rules
from dripd.content import links as linking
from dripd.content.compose import compose, python_fields
from dripd.content.liquid import (
    HEADER_PREFIX,
    RENDER_THREADS,
    WA_LANGUAGE,
    WA_NAME,
    WA_PARAM,
    TemplateError,
)
from dripd.content.mjml import compile_mjml
from dripd.content.spintax import seed_for
from dripd.content.text import html_to_text
from dripd.engine.advance import CompiledStep, recipient_zone
from dripd.errors import DripdError
from dripd.metrics import Metrics
from dripd.model import (
    DEFAULT_RECIPIENT,
    SMS_CHANNELS,
    SMS_MAX_LENGTH,
    SUBSCRIBER_RECIPIENT,
    Adapter,
    ClaimedExecution,
    EnrollmentStatus,
    Outcome,
    Reason,
    Verdict,
)
from dripd.pyload import LoadError
from dripd.rules.checks import missing_fields, sms_too_long, unverified
from dripd.rules.leadconfirm import ConfirmLinks
from dripd.rules.limiter import Bucket, Limiter, RateTable
from dripd.rules.quota import QuotaBucket, drain_offset, quota_buckets
from dripd.rules.unsubscribe import make_token, unsubscribe_headers
from dripd.rules.window import defer_to_opening

log = structlog.get_logger("dripd.pipeline")

_SEQUENCE_QUOTA = "quota:sequence:"

# How soon a send deferred because the rate-limit or quota tables could not be read retries.
_RULES_RETRY = timedelta(seconds=5)

Resolve = Callable[[str | None, str, str | None], "tuple[Adapter, Channel] | str"]
HooksFor = Callable[[CompiledStep, str | None], Hooks]
TemplateFunction = Callable[[HookEnrollment, HookStep, Mapping[str, Any]], Awaitable[object]]

#: How long a Python template may take, in seconds (then the attempt fails, transient).
PYTHON_TEMPLATE_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The retry policy from the configuration."""

    max_attempts: int
    retry_base: timedelta
    retry_max: timedelta
    message_id_domain: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Rules:
    """The sending rules from the configuration, and their shared state."""

    zone_of: Callable[[str | None], ZoneInfo]  # a tenant's recipients' default zone
    default_region: str | None = None  # phone numbers without a country code
    window_channels: frozenset[str] = frozenset()  # where a sequence's default window applies
    window_spread: timedelta = timedelta(minutes=10)
    paused_adapter_retry: timedelta = timedelta(minutes=5)
    unsubscribe: Unsubscribe | None = None
    lead_confirm: ConfirmLinks | None = None  # `confirm_url` of double opt-in
    rates: RateTable | None = None
    limiter: Limiter | None = None
    quotas: Sequence[config.Quota] = ()
    ledger: Ledger | None = None
    breaker: CircuitBreaker | None = None
    # Pauses an adapter the provider refused as a whole (AdapterError), with the reason.
    pause_adapter: Callable[[Adapter, str, datetime], Awaitable[None]] | None = None
    short_links: ShortLinking | None = None
    # Imports a step's Python template ("module:function"); LoadError when it cannot.
    python_template: Callable[[str], TemplateFunction] | None = None


class ShortenError(Exception):
    """The links of a message could not be shortened: the shortener or the database failed.
    The message names what went wrong and is safe to store (never the shortener's token)."""


class LinkMaker(Protocol):
    """Makes (or finds again) the short links of one execution (dripd.engine.links)."""

    async def shorten(
        self,
        *,
        execution_id: uuid.UUID,
        tenant: str | None,
        provider: Literal["dripd", "webhook"],
        links: Sequence[tuple[str, bool]],
    ) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ShortLinking:
    """Short links from the configuration: the maker, a tenant's settings (`[short_links]`
    under `[tenants.<key>.short_links]`), and the hosts whose links are short already."""

    maker: LinkMaker
    defaults: Callable[[str | None], ShortLinkRules]
    short_hosts: frozenset[str]


@dataclass(frozen=True, slots=True, kw_only=True)
class _LinkPlan:
    """What a step's messages get for a tenant: the provider ("none": UTM only), the UTM
    parameters, which links are eligible, and what a shortener failure does."""

    provider: str
    utm: Mapping[str, str]
    rules: linking.LinkRules
    send_originals: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Unsubscribe:
    """RFC 8058 headers for lifecycle email: where the one-click endpoint is, and the keys."""

    vault: Vault
    base_url: str
    mailto: str | None
    ttl: timedelta


class CircuitBreaker(Protocol):
    """The per-adapter circuit breaker (dripd.rules.breaker): what the pipeline and the
    claim ask of it."""

    def budget(self, adapter_id: uuid.UUID, now: datetime) -> int | None: ...

    def retry_at(self, adapter_id: uuid.UUID) -> datetime | None: ...

    async def record_success(self, adapter_id: uuid.UUID, now: datetime) -> None: ...

    async def record_failure(
        self, adapter_id: uuid.UUID, now: datetime, error: str
    ) -> datetime: ...

    def take_probe(self, adapter_id: uuid.UUID, now: datetime) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LaneTarget:
    """Where a lane's rows are sent through, as far as the claim needs to know: whose send
    capacity they share (`key`: the adapter's id, else the lane itself), how many sends it
    can run at once (None: no limit of its own), and the rate-limit buckets and quota
    buckets (without a sequence) every send of the lane is charged to."""

    key: object
    capacity: int | None = None
    adapter: Adapter | None = None
    label: str | None = None  # the adapter as limits name it: "tenant/name" or "name"
    tenant: str | None = None
    mailbox: str | None = None
    rates: tuple[Bucket, ...] = ()


def parse_lane(lane: str) -> tuple[str | None, str | None, str | None]:
    """A lane's (tenant, channel, adapter name) from its stored JSON text."""
    tenant, channel, name = json.loads(lane)
    return tenant, channel, name


class Ledger(Protocol):
    """The quota ledger (in the database): reserve all buckets or none; release on failure."""

    async def reserve(self, buckets: Sequence[QuotaBucket]) -> bool: ...

    async def release(self, buckets: Sequence[QuotaBucket]) -> None: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A rendered message ready to send, with the address suppressions are checked under."""

    execution: ClaimedExecution
    step: CompiledStep
    adapter: Adapter
    channel: Channel
    message: Message
    address: str
    # MJML whose links are shortened before it is compiled into the message's html (see
    # Pipeline._shorten): the markup is a seventh of the HTML's size to read.
    mjml: str | None = None


def template_context(item: ClaimedExecution, step: CompiledStep) -> dict[str, Any]:
    """Flat variables, a later source winning: the subscriber's data, the sequence's `vars`,
    the step's `vars`, then dripd's own names (model.TEMPLATE_NAMES)."""
    return {
        **item.data,
        **step.vars,
        "subscriber_id": item.subscriber_id,
        "subscriber_type": item.subscriber_type,
        "enrollment_id": str(item.enrollment_id),
        "execution_id": str(item.id),
        "tenant_key": item.tenant_key,
        "sequence_key": step.step.sequence_key,
        "step_key": step.step.key,
        "hooks": item.facts.hooks,
    }


def condition_context(item: ClaimedExecution, now: datetime) -> dict[str, Any]:
    """The names a `when` condition reads (see the expression language)."""
    return {
        "data": item.data,
        "subscriber_id": item.subscriber_id,
        "subscriber_type": item.subscriber_type,
        "tenant_key": item.tenant_key,
        "event": item.event,
        "events": item.facts.events,
        "clicks": item.facts.clicks,
        "hooks": item.facts.hooks,
        "now": now,
    }


class Pipeline:
    def __init__(
        self,
        *,
        clock: Clock,
        metrics: Metrics,
        policy: Policy,
        resolve: Resolve,
        hooks: HooksFor,
        rules: Rules,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._resolve = resolve
        self._hooks = hooks
        self._rules = rules
        # Quota reservations refused for every send of some lanes, until the period ends:
        # a lane whose own buckets include such a set cannot send before then.
        self._exhausted: dict[frozenset[str], datetime] = {}
        # Renders too slow for the event loop run in worker threads, this many at once.
        self._render_limiter = anyio.CapacityLimiter(RENDER_THREADS)
        self._link_plans: dict[tuple[str | None, uuid.UUID], _LinkPlan | None] = {}

    def lane_target(self, lane: str) -> LaneTarget:
        """Resolve a lane (tenant, channel, adapter name) to what its sends go through."""
        tenant, channel, name = parse_lane(lane)
        if channel is None:
            return LaneTarget(key=lane, tenant=tenant)  # a wait or a step that sends nothing
        resolved = self._resolve(tenant, channel, name)
        if isinstance(resolved, str):
            return LaneTarget(key=lane, tenant=tenant)  # each row fails (and retries) alone
        adapter, impl = resolved
        label = _adapter_label(adapter)
        mailbox = _mailbox(adapter)
        rates: tuple[Bucket, ...] = ()
        if self._rules.rates is not None and self._rules.limiter is not None:
            rates = tuple(
                self._rules.rates.buckets_for(
                    adapter=label,
                    provider=adapter.provider,
                    sending_domain=domain_of(mailbox),
                    recipient_domain=None,
                    tenant=tenant,
                    sequence=None,
                )
            )
        capacity = getattr(impl, "capacity", None)
        return LaneTarget(
            key=adapter.id,
            capacity=capacity if isinstance(capacity, int) and capacity > 0 else None,
            adapter=adapter,
            label=label,
            tenant=tenant,
            mailbox=mailbox,
            rates=rates,
        )

    async def lane_budget(
        self, target: LaneTarget, free: int, now: datetime
    ) -> tuple[int, datetime | None]:
        """How many of a lane's due rows this daemon may claim now (at most `free`), so that
        none waits in memory for a provider, a rate limit, a quota or an open circuit; and
        when a lane given nothing may have budget again (None: when something changes,
        such as a send ending or an adapter resuming). Rate-limit tokens for the budget are
        leased here (DripdError when the database cannot be reached)."""
        adapter = target.adapter
        if free <= 0 or adapter is None:
            return max(free, 0), None
        if adapter.paused_reason is not None:
            return 0, None  # until an operator resumes it (the adapter reload wakes us)
        breaker = self._rules.breaker
        if breaker is not None:
            allowed = breaker.budget(adapter.id, now)
            if allowed is not None:
                if allowed <= 0:
                    return 0, breaker.retry_at(adapter.id)
                free = min(free, allowed)
        if self._exhausted:
            keys = frozenset(
                b.key
                for b in quota_buckets(
                    self._rules.quotas,
                    adapter=target.label,
                    mailbox=target.mailbox,
                    tenant=target.tenant,
                    sequence=None,
                    now=now,
                )
            )
            until = max(
                (at for spent, at in self._exhausted.items() if at > now and spent <= keys),
                default=None,
            )
            if until is not None:
                return 0, until
        limiter = self._rules.limiter
        if target.rates and limiter is not None:
            until = limiter.blocked_until(target.rates, now)
            if until is not None:
                return 0, until
            free = min(free, await limiter.prefetch(target.rates, free, now))
            if free <= 0:
                return 0, limiter.blocked_until(target.rates, now)
        return free, None

    def _outcome(self, item: ClaimedExecution, verdict: Verdict, **kw: Any) -> Outcome:
        return Outcome(execution=item, verdict=verdict, finished_at=self._clock.now(), **kw)

    def max_attempts(self, step: CompiledStep) -> int:
        return step.step.max_attempts or self._policy.max_attempts

    async def prepare(self, item: ClaimedExecution, step: CompiledStep) -> Prepared | Outcome:
        """Gate, decide and render; an Outcome when the execution ends here (a step that
        sends nothing, a skip, a defer or a failure). Hooks must have run (`run_hooks`)."""
        channel = step.step.channel
        if item.enrollment_status is EnrollmentStatus.PAUSED:
            # The record statement holds the row until the enrollment resumes.
            return self._outcome(
                item,
                Verdict.DEFERRED,
                channel=channel,
                reason=Reason.ENROLLMENT_PAUSED,
                retry_at=self._clock.now(),
            )
        if item.enrollment_status is not EnrollmentStatus.ACTIVE:
            return self._outcome(
                item,
                Verdict.SKIPPED,
                channel=channel,
                reason=Reason.ended(item.enrollment_status),
                enrollment_ended=True,
            )
        limit = self.max_attempts(step)
        if item.attempt >= limit:
            return self._outcome(
                item,
                Verdict.FAILED,
                channel=channel,
                error=f"gave up after {item.attempt} attempts (leases expired without a record)",
            )
        if step.step.wait_event is not None:
            how = "event" if item.event is not None else "timeout"
            self._metrics.waits_released.labels(how=how).inc()
            if how == "event":
                return self._outcome(
                    item, Verdict.DONE, reason=Reason.EVENT, reason_detail=step.step.wait_event
                )
            return self._outcome(item, Verdict.DONE, reason=Reason.WAIT_TIMEOUT)
        if step.when is not None:
            holds, error = evaluate_safely(step.when, condition_context(item, self._clock.now()))
            if error is not None:
                self.condition_failed(item, step.when.source, error)
            if not holds:
                return self._outcome(
                    item, Verdict.SKIPPED, channel=channel, reason=Reason.CONDITION_FALSE
                )
        if channel is None:
            return self._outcome(item, Verdict.DONE, reason=Reason.NO_CHANNEL)
        window = step.window
        if window is None and channel in self._rules.window_channels:
            window = step.sequence_window
        if window is not None:
            now = self._clock.now()
            zone = recipient_zone(step, item.timezone, self._rules.zone_of(item.tenant_key))
            retry_at = defer_to_opening(
                window, now, zone, key=item.id, over=self._rules.window_spread
            )
            if retry_at is not None:
                return self._outcome(
                    item,
                    Verdict.DEFERRED,
                    channel=channel,
                    reason=Reason.OUTSIDE_WINDOW,
                    retry_at=retry_at,
                )
        made: dict[str, str] | None = None
        if step.step.python_template is not None:
            result = await self._python_template(item, step)
            if isinstance(result, Outcome):
                return result
            made = result
        context = template_context(item, step) | self._confirm_names(item, step)
        try:
            rendered = await compose(
                step.templates,
                context,
                limiter=self._render_limiter,
                made=made,
                spintax=functools.partial(seed_for, item.id, item.replay)
                if step.step.spintax
                else None,
                on_unbalanced=functools.partial(self._unbalanced, item, step),
                text_part=channel == "email",
                keep_mjml=self._link_plan(step, item.tenant_key) is not None,
            )
        except TemplateError as exc:
            return self._outcome(
                item,
                Verdict.FAILED,
                channel=channel,
                error=f"template error in step {step.step.key!r}: {exc}",
            )
        to = rendered.pop("to", None) or default_recipient(
            channel, item.data, subscriber_id=item.subscriber_id
        )
        if not to or not to.strip():
            return self._outcome(item, Verdict.SKIPPED, channel=channel, reason=Reason.NO_RECIPIENT)
        if step.step.require_verified and unverified(True, item.data):
            return self._outcome(item, Verdict.SKIPPED, channel=channel, reason=Reason.UNVERIFIED)
        mjml = rendered.pop("mjml", None)  # compiled once its links are short
        problem = _content_problem(
            channel,
            rendered if mjml is None else rendered | {"html": mjml},
            step,
            length=self._link_plan(step, item.tenant_key) is None,
        )
        if problem is not None:
            return self._outcome(item, Verdict.FAILED, channel=channel, error=problem)
        resolved = self._resolve(item.tenant_key, channel, step.step.adapter)
        if isinstance(resolved, str):
            return self._failure(item, step, channel, None, None, TransientError(resolved))
        adapter, impl = resolved
        if adapter.paused_reason is not None:
            return self._outcome(
                item,
                Verdict.DEFERRED,
                channel=channel,
                provider=adapter.provider,
                adapter_id=adapter.id,
                reason=Reason.ADAPTER_PAUSED,
                retry_at=self._clock.now() + self._rules.paused_adapter_retry,
            )
        try:
            read = recipient(channel, to, default_region=self._rules.default_region, field="to")
            sender = _mailbox_field(rendered, "from")
            reply_to = _mailbox_field(rendered, "reply_to")
        except InvalidAddress as exc:
            return self._outcome(
                item,
                Verdict.FAILED,
                channel=channel,
                error=f"step {step.step.key!r}: {exc.message}",
            )
        extra = {
            name.removeprefix(HEADER_PREFIX): value
            for name, value in rendered.items()
            if name.startswith(HEADER_PREFIX) and value.strip()
        }
        message = Message(
            execution_id=item.id,
            idempotency_key=f"{item.id}:{item.replay}",
            message_id=f"<{item.id}.{item.replay}@{self._policy.message_id_domain}>",
            channel=channel,
            to=read.address,  # email bare, phones in E.164
            to_name=read.display_name,
            subject=rendered.get("subject"),
            text=rendered.get("text"),
            html=rendered.get("html"),
            body=rendered.get("body"),
            sender=sender,
            reply_to=reply_to,
            headers=extra | self._unsubscribe_headers(item, channel, read.key),
            metadata=_metadata(item, step) | _whatsapp_template(rendered),
        )
        return Prepared(
            execution=item,
            step=step,
            adapter=adapter,
            channel=impl,
            message=message,
            address=read.key,
            mjml=mjml,
        )

    def off_claim_path(self, step: CompiledStep, tenant: str | None) -> bool:
        """Whether preparing an execution of `step` may wait on I/O or take long (hooks, a
        Python template, MJML, short links): such executions are prepared by the sender
        tasks, never in the claim's loop over its batch. (A text part made from a plain
        `html` is libxml2's and libxslt's work, tens of microseconds: inline.)"""
        return bool(
            step.hooks
            or step.step.python_template
            or "mjml" in step.templates
            or self._link_plan(step, tenant) is not None
        )

    async def _python_template(
        self, item: ClaimedExecution, step: CompiledStep
    ) -> dict[str, str] | Outcome:
        """The fields a step's Python template makes: called with the enrollment, the step
        and the hook results, within PYTHON_TEMPLATE_TIMEOUT. One that cannot be imported,
        raises or runs out of time fails the attempt (transient, like a hook); an answer
        that is not message fields fails the step (TemplateError, permanent)."""
        path = step.step.python_template
        assert path is not None
        channel = step.step.channel
        loader = self._rules.python_template
        try:
            if loader is None:
                raise LoadError("Python templates are not loaded here")
            function = loader(path)
            with anyio.fail_after(PYTHON_TEMPLATE_TIMEOUT):
                result = await function(
                    _hook_enrollment(item, step),
                    HookStep(key=step.step.key, channel=channel),
                    dict(item.facts.hooks),
                )
        except LoadError as exc:
            error = TransientError(f"Python template {path!r}: {exc.message}")
            return self._failure(item, step, channel, None, None, error)
        except TimeoutError:
            error = TransientError(
                f"Python template {path!r} took longer than {PYTHON_TEMPLATE_TIMEOUT:g}s"
            )
            return self._failure(item, step, channel, None, None, error)
        except Exception as exc:  # trusted code, but a bug in it fails only this attempt
            log.warning(
                "Python template raised", execution_id=str(item.id), path=path, exc_info=True
            )
            error = TransientError(f"Python template {path!r} raised {type(exc).__name__}")
            return self._failure(item, step, channel, None, None, error)
        try:
            fields = python_fields(result, path=path)
            used = _USED_BY.get(channel or "", _USED_BY["*"])
            unused = sorted(
                name
                for name in fields
                if name not in used and not (channel == "email" and name.startswith(HEADER_PREFIX))
            )
            if unused:
                raise TemplateError(
                    f"Python template {path!r} returned {', '.join(map(repr, unused))}, "
                    f"which channel {channel!r} does not use"
                )
        except TemplateError as exc:
            return self._outcome(item, Verdict.FAILED, channel=channel, error=str(exc))
        return fields

    def _unbalanced(self, item: ClaimedExecution, step: CompiledStep, field: str) -> None:
        """Spintax braces from data did not balance: the field went out as rendered."""
        self._metrics.spintax_unbalanced.labels(field=field).inc()
        log.warning(
            "unbalanced spintax left as rendered",
            execution_id=str(item.id),
            step=step.step.key,
            field=field,
        )

    def _link_plan(self, step: CompiledStep, tenant: str | None) -> _LinkPlan | None:
        """The short-link plan of `step`'s messages for `tenant` (cached), or None when its
        links are left alone (provider "none" without UTM, or short links not set up)."""
        key = (tenant, step.step.id)
        try:
            return self._link_plans[key]
        except KeyError:
            pass
        settings = self._rules.short_links
        plan = None
        if settings is not None and step.step.channel is not None:
            merged = merge_link_rules(settings.defaults(tenant), step.short_links)
            utm = _utm(merged.utm, step)
            if merged.provider not in (None, "none") or utm:
                plan = _LinkPlan(
                    provider=merged.provider or "none",
                    utm=utm,
                    rules=linking.rules(merged.exclude or (), settings.short_hosts),
                    send_originals=merged.on_error == "send_originals",
                )
        self._link_plans[key] = plan
        return plan

    async def _shorten(self, p: Prepared) -> Prepared | Outcome:
        """The message with its links rewritten (README, Short links): every eligible link
        in `html` (href/src) and in `text`/`body` gets the UTM parameters and, unless the
        provider is "none", a short link the execution keeps across retries. A shortener
        failure fails the attempt (transient), or sends the links as written with
        `on_error = "send_originals"`. MJML left to compile (`Prepared.mjml`) has its links
        rewritten in it, then is compiled, with the text part made from its HTML when the
        step has none."""
        plan = self._link_plan(p.step, p.execution.tenant_key)
        settings = self._rules.short_links
        if plan is None or settings is None:
            return p
        message = p.message
        markup = p.mjml if p.mjml is not None else message.html
        originals: dict[str, str | None] = {}  # URL → destination (None: not eligible)

        def destination_of(url: str) -> str | None:
            if url not in originals:
                eligible = plan.rules.eligible(url)
                originals[url] = linking.with_utm(url, plan.utm) if eligible else None
            return originals[url]

        in_html = linking.html_links(markup) if markup else []
        clicked: set[str] = set()  # destinations a reader follows: their redirects count
        shown: set[str] = set()  # destinations of images (<img src>): an open is no click
        for link in in_html:
            if (destination := destination_of(link.url)) is not None:
                (clicked if link.track else shown).add(destination)
        for text in (message.text, message.body):
            for url in linking.text_links(text or ""):
                if (destination := destination_of(url)) is not None:
                    clicked.add(destination)
        # An image whose URL is also a link keeps its own URL: the link's short one counts
        # clicks, and each open of the mail would count as one.
        in_html = [link for link in in_html if link.track or originals[link.url] not in clicked]
        found = dict.fromkeys(clicked, True) | dict.fromkeys(shown - clicked, False)
        short: Mapping[str, str] = {d: d for d in found}
        if found and plan.provider != "none":
            try:
                short = await settings.maker.shorten(
                    execution_id=p.execution.id,
                    tenant=p.execution.tenant_key,
                    provider=plan.provider,  # type: ignore[arg-type]  # "dripd" | "webhook"
                    links=list(found.items()),
                )
            except ShortenError as exc:
                if not plan.send_originals:
                    error = TransientError(f"short links: {exc}")
                    return self._failure(
                        p.execution, p.step, message.channel, p.adapter, p.address, error
                    )
                self._metrics.short_links_fallback.inc()
                log.warning(
                    "short links failed; sending the links as written",
                    execution_id=str(p.execution.id),
                    error=str(exc),
                )
                short = {}

        def replace(url: str) -> str | None:
            destination = originals.get(url)
            return None if destination is None else short.get(destination)

        html = linking.rewrite_html(markup, replace, links=in_html) if markup else markup
        text = linking.rewrite_text(message.text, replace) if message.text else message.text
        if p.mjml is not None and html is not None:
            try:  # checked when the step was applied, or when its Python template made it
                html = compile_mjml(html, checked=True)
            except TemplateError as exc:
                return self._outcome(
                    p.execution,
                    Verdict.FAILED,
                    channel=message.channel,
                    error=f"template error in step {p.step.step.key!r}: mjml: {exc}",
                )
            if not (text or "").strip():
                text = html_to_text(html)
        rewritten = dataclasses.replace(
            message,
            html=html,
            text=text,
            body=linking.rewrite_text(message.body, replace) if message.body else message.body,
        )
        if message.channel in SMS_CHANNELS:
            problem = _content_problem(message.channel, {"body": rewritten.body or ""}, p.step)
            if problem is not None:
                return self._outcome(
                    p.execution, Verdict.FAILED, channel=message.channel, error=problem
                )
        return dataclasses.replace(p, message=rewritten, mjml=None)

    def _confirm_names(self, item: ClaimedExecution, step: CompiledStep) -> dict[str, str]:
        """`confirm_url` for a lead's confirmation message (double opt-in), else nothing."""
        links = self._rules.lead_confirm
        if links is None:
            return {}
        return links.names(
            tenant=item.tenant_key,
            sequence_key=step.step.sequence_key,
            subscriber_type=item.subscriber_type,
            subscriber_id=item.subscriber_id,
            now=self._clock.now(),
        )

    def _unsubscribe_headers(
        self, item: ClaimedExecution, channel: str, address: str
    ) -> dict[str, str]:
        settings = self._rules.unsubscribe
        if settings is None or channel != "email":
            return {}
        token = make_token(
            settings.vault,
            tenant=item.tenant_key,
            channel=channel,
            address=address,
            execution_id=item.id,
            expires_at=self._clock.now() + settings.ttl,
        )
        return unsubscribe_headers(base_url=settings.base_url, token=token, mailto=settings.mailto)

    async def deliver(self, p: Prepared) -> Outcome:
        """The send-time rules that count (rate limits, quotas), then the send; a quota
        reservation is released when the send fails."""
        try:
            return await self._deliver(p)
        except DripdError as exc:
            # The shared budgets live in Postgres: when it fails us, try again shortly
            # rather than send past a limit nobody could check.
            log.warning(
                "sending rules unavailable; deferring",
                execution_id=str(p.execution.id),
                error=exc.message,
            )
            return self._deferred(p, Reason.RULES_UNAVAILABLE, self._clock.now() + _RULES_RETRY)

    async def _deliver(self, p: Prepared) -> Outcome:
        item, adapter = p.execution, p.adapter
        rules = self._rules
        mailbox = _mailbox(adapter)
        adapter_label = _adapter_label(adapter)
        if rules.limiter is not None and rules.rates is not None:
            buckets = rules.rates.buckets_for(
                adapter=adapter_label,
                provider=adapter.provider,
                sending_domain=domain_of(mailbox),
                recipient_domain=domain_of(p.address) if p.message.channel == "email" else None,
                tenant=item.tenant_key,
                sequence=p.step.step.sequence_key,
            )
            if buckets:
                retry_at = await rules.limiter.take(buckets, self._clock.now())
                if retry_at is not None:
                    return self._deferred(p, Reason.RATE_LIMITED, retry_at)
        reserved: list[QuotaBucket] = []
        ledger = rules.ledger
        if rules.quotas and ledger is not None:
            now = self._clock.now()
            reserved = quota_buckets(
                rules.quotas,
                adapter=adapter_label,
                mailbox=mailbox,
                tenant=item.tenant_key,
                sequence=p.step.step.sequence_key,
                now=now,
            )
            if reserved and not await ledger.reserve(reserved):
                # The earliest period to end may be the exhausted one; if it is not, the
                # row is simply deferred again then, to the next one.
                opening = min(b.period_end for b in reserved)
                if not any(b.key.startswith(_SEQUENCE_QUOTA) for b in reserved):
                    # Every send of this lane reserves in these buckets: hold the lane
                    # back until then instead of claiming and deferring its rows.
                    self._exhausted = {k: at for k, at in self._exhausted.items() if at > now}
                    self._exhausted[frozenset(b.key for b in reserved)] = opening
                return self._deferred(
                    p,
                    Reason.QUOTA_EXHAUSTED,
                    opening + drain_offset(_first_due(item, p.step), opening),
                )
        shortened = await self._shorten(p)
        outcome = shortened if isinstance(shortened, Outcome) else await self.send(shortened)
        if reserved and ledger is not None and outcome.verdict is not Verdict.SENT:
            try:
                await ledger.release(reserved)
            except DripdError as exc:  # the send is over: never defer (and resend) it
                log.warning(
                    "quota release failed; the reservation stays counted", error=exc.message
                )
        return outcome

    def _deferred(
        self, p: Prepared, reason: Reason, retry_at: datetime, *, error: str | None = None
    ) -> Outcome:
        return self._outcome(
            p.execution,
            Verdict.DEFERRED,
            channel=p.message.channel,
            provider=p.adapter.provider,
            adapter_id=p.adapter.id,
            recipient=p.address,
            reason=reason,
            error=error,
            retry_at=retry_at,
        )

    def condition_failed(self, item: ClaimedExecution, expression: str, error: str) -> None:
        """Count and log a condition that could not be evaluated (it counted as false)."""
        self._metrics.condition_errors.inc()
        log.warning(
            "condition failed closed",
            execution_id=str(item.id),
            expression=expression,
            error=error,
        )

    async def run_hooks(self, item: ClaimedExecution, step: CompiledStep) -> Outcome | None:
        """Call the hooks the step reads, once each, into `item.facts.hooks`; a hook that
        fails is a transient failure of the step (retried with backoff, then failed)."""
        runner = self._hooks(step, item.tenant_key)
        for name in sorted(step.hooks - item.facts.hooks.keys()):
            kind = "python" if isinstance(step.hook_specs[name], PythonHookSpec) else "http"
            started = time.perf_counter()
            try:
                item.facts.hooks[name] = await runner.run(
                    name,
                    context=template_context(item, step),
                    webhook_id=f"{item.id}.{name}",
                    enrollment=_hook_enrollment(item, step),
                    step=HookStep(key=step.step.key, channel=step.step.channel),
                )
            except HookError as exc:
                self._metrics.hook_calls.labels(kind=kind, result="error").inc()
                return self._failure(
                    item, step, step.step.channel, None, None, TransientError(exc.message)
                )
            finally:
                self._metrics.hook_duration.labels(kind=kind).observe(time.perf_counter() - started)
            self._metrics.hook_calls.labels(kind=kind, result="ok").inc()
        return None

    def suppressed(self, p: Prepared) -> Outcome:
        return self._outcome(
            p.execution,
            Verdict.SKIPPED,
            channel=p.message.channel,
            provider=p.adapter.provider,
            adapter_id=p.adapter.id,
            recipient=p.address,
            reason=Reason.SUPPRESSED,
        )

    async def send(self, p: Prepared) -> Outcome:
        """Send through the adapter; errors become a retry, a failure or a give-up."""
        item, channel, adapter = p.execution, p.message.channel, p.adapter
        started = time.perf_counter()
        breaker = self._rules.breaker
        try:
            receipt = await p.channel.send(p.message)
        except TransientError as exc:
            if breaker is not None and exc.provider_wide:
                # The provider failed, not this message: no attempt is spent; the circuit
                # breaker counts it and says when to try again (not before the provider's
                # own Retry-After).
                now = self._clock.now()
                retry_at = await breaker.record_failure(adapter.id, now, str(exc))
                if exc.retry_after is not None:
                    retry_at = max(retry_at, now + timedelta(seconds=exc.retry_after))
                return self._deferred(p, Reason.PROVIDER_UNAVAILABLE, retry_at, error=str(exc))
            await self._reached(adapter)
            return self._failure(item, p.step, channel, adapter, p.address, exc)
        except AdapterError as exc:
            # The provider refused the adapter itself: pause it; the message waits for
            # `dripd ctl resume-adapter`, no attempt spent.
            await self._pause(adapter, str(exc))
            return self._deferred(
                p,
                Reason.ADAPTER_PAUSED,
                self._clock.now() + self._rules.paused_adapter_retry,
                error=str(exc),
            )
        except PermanentError as exc:
            await self._reached(adapter)  # the provider answered: it is up
            return self._failure(item, p.step, channel, adapter, p.address, exc)
        except Exception as exc:  # the per-step guard: an adapter bug is a transient error
            log.exception(
                "adapter raised an unexpected error",
                execution_id=str(item.id),
                provider=adapter.provider,
            )
            error = TransientError(f"{adapter.provider} adapter error: {type(exc).__name__}: {exc}")
            return self._failure(item, p.step, channel, adapter, p.address, error)
        finally:
            self._metrics.observe_send(channel, adapter.provider, time.perf_counter() - started)
        await self._reached(adapter)
        return self._outcome(
            item,
            Verdict.SENT,
            channel=channel,
            provider=adapter.provider,
            adapter_id=adapter.id,
            recipient=p.address,
            provider_message_id=receipt.provider_message_id,
        )

    async def _pause(self, adapter: Adapter, reason: str) -> None:
        pause = self._rules.pause_adapter
        if pause is None:
            return
        try:
            await pause(adapter, reason, self._clock.now())
        except DripdError as exc:  # the next send finds the same refusal and tries again
            log.warning("adapter pause not written", adapter=adapter.name, error=exc.message)

    async def _reached(self, adapter: Adapter) -> None:
        """A send reached the provider (accepted, or refused for the message's own sake):
        tell the circuit breaker, which closes the circuit if this was its probe."""
        breaker = self._rules.breaker
        if breaker is None:
            return
        try:
            await breaker.record_success(adapter.id, self._clock.now())
        except DripdError as exc:  # the send is over: never defer (and resend) it
            log.warning("circuit state not written", adapter=adapter.name, error=exc.message)

    def claimed(self, target: LaneTarget, now: datetime) -> None:
        """Rows of the lane target were claimed: if the circuit breaker gave its one probe
        to this daemon, the claimed row is that probe."""
        breaker = self._rules.breaker
        if breaker is not None and target.adapter is not None:
            breaker.take_probe(target.adapter.id, now)

    def _failure(
        self,
        item: ClaimedExecution,
        step: CompiledStep,
        channel: str | None,
        adapter: Adapter | None,
        address: str | None,
        exc: TransientError | PermanentError,
    ) -> Outcome:
        common: dict[str, Any] = {
            "attempted": True,
            "channel": channel,
            "recipient": address,
            "provider": adapter.provider if adapter else None,
            "adapter_id": adapter.id if adapter else None,
        }
        if isinstance(exc, PermanentError):
            return self._outcome(
                item, Verdict.FAILED, error=f"permanent: {exc}", bounced=exc.bounce, **common
            )
        spent = item.attempt + 1
        limit = self.max_attempts(step)
        if spent >= limit:
            return self._outcome(
                item, Verdict.FAILED, error=f"gave up after {spent} attempts: {exc}", **common
            )
        wait = self.backoff(spent)
        if exc.retry_after is not None:
            wait = max(wait, timedelta(seconds=exc.retry_after))
        return self._outcome(
            item,
            Verdict.RETRY,
            error=str(exc),
            retry_at=self._clock.now() + wait,
            **common,
        )

    def backoff(self, attempts_spent: int) -> timedelta:
        """Exponential backoff with jitter: base·2^(n-1), capped, then 50–100 % of it."""
        base = self._policy.retry_base.total_seconds()
        ceiling = self._policy.retry_max.total_seconds()
        delay = min(ceiling, base * 2 ** max(attempts_spent - 1, 0))
        return timedelta(seconds=delay * random.uniform(0.5, 1.0))


def _mailbox_field(rendered: dict[str, str], name: str) -> str | None:
    """A step's rendered `from` or `reply_to` as one RFC 5322 mailbox (display name kept,
    the domain in ASCII), or None when the step has none; InvalidAddress naming the field."""
    value = rendered.pop(name, None)
    if value is None or not value.strip():
        return None
    read = recipient("email", value, field=name)
    return mailbox_header(read.display_name, read.address)


def _first_due(item: ClaimedExecution, step: CompiledStep) -> datetime:
    """When the execution first fell due (its scheduling plus the step's delay): fixed
    across deferrals, so rows held back by a quota go out in the order they fell due."""
    if item.created_at is None:
        return item.due_at
    return item.created_at + step.step.delay


def _content_problem(
    channel: str, rendered: Mapping[str, str], step: CompiledStep, *, length: bool = True
) -> str | None:
    """A rendered message that cannot be sent as it is (a permanent failure), or None.
    `length`: check an SMS body's length too (not before its links are shortened)."""
    missing = missing_fields(channel, rendered)
    if WA_NAME in rendered:  # an approved template is sent instead of the body
        missing = [name for name in missing if name != "body"]
    if missing:
        return f"step {step.step.key!r}: rendered {', '.join(missing)} empty"
    if length and channel in SMS_CHANNELS:
        limit = step.step.max_length or SMS_MAX_LENGTH
        body = rendered.get("body", "")
        if sms_too_long(body, limit):
            return (
                f"step {step.step.key!r}: sms_too_long: the body has {len(body)} characters, "
                f"the limit is {limit}"
            )
    return None


def _adapter_label(adapter: Adapter) -> str:
    """An adapter as rate limits and quotas name it: a tenant's adapter is "acme/smtp"."""
    return f"{adapter.tenant_key}/{adapter.name}" if adapter.tenant_key else adapter.name


def _mailbox(adapter: Adapter) -> str | None:
    """The adapter's `from` in the one spelling of addresses (`"Name <A@B.c>"` → `a@b.c`),
    or None when it has none that reads as an address."""
    sender = adapter.config.get("from")
    if not isinstance(sender, str) or not sender.strip():
        return None
    return _mailbox_of(sender)


@functools.lru_cache(maxsize=1024)
def _mailbox_of(sender: str) -> str | None:
    # Every send asks (rate-limit and quota keys): parsing an address costs about 7 µs.
    try:
        return normalize("email", sender)
    except InvalidAddress:
        return None


def default_recipient(
    channel: str, data: Mapping[str, Any], *, subscriber_id: str | None = None
) -> str | None:
    """The recipient of a step without `to`: the channel's subscriber data key (`email`,
    `phone`, `chat_id`), else, for channels whose adapter is the destination, the
    subscriber id."""
    key = DEFAULT_RECIPIENT.get(channel)
    value = data.get(key) if key else None
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, int) and not isinstance(value, bool) and channel == "chat":
        return str(value)  # a Telegram chat id given as a number
    return subscriber_id if channel in SUBSCRIBER_RECIPIENT else None


# The fields a Python template may make for a step of each channel (headers: "header:…").
_USED_BY: Final = {
    "email": frozenset({"subject", "text", "html", "mjml", "to", "from", "reply_to"}),
    "*": frozenset({"body", "to"}),
}


def _utm(utm: bool | Mapping[str, str] | None, step: CompiledStep) -> dict[str, str]:
    """The UTM parameters of a `utm` setting (config.ShortLinkRules) for `step`'s messages:
    none for false, else source "dripd", medium the channel, campaign the sequence key and
    content the step key, overridden by a table's values ("" leaves one out)."""
    if not utm:
        return {}
    values = {
        "source": "dripd",
        "medium": step.step.channel or "",
        "campaign": step.step.sequence_key,
        "content": step.step.key,
    }
    if isinstance(utm, Mapping):
        values |= utm
    return {key: value for key, value in values.items() if value}


def _hook_enrollment(item: ClaimedExecution, step: CompiledStep) -> HookEnrollment:
    return HookEnrollment(
        id=str(item.enrollment_id),
        tenant_key=item.tenant_key,
        sequence_key=step.step.sequence_key,
        subscriber_type=item.subscriber_type,
        subscriber_id=item.subscriber_id,
        data=item.data,
    )


def _whatsapp_template(rendered: Mapping[str, str]) -> dict[str, str]:
    """A rendered `whatsapp_template` as the metadata the WhatsApp providers read
    (`template_name`, `template_language`, `template_params`: a JSON array of strings)."""
    if WA_NAME not in rendered:
        return {}
    params = sorted(
        (int(name.removeprefix(WA_PARAM)), value)
        for name, value in rendered.items()
        if name.startswith(WA_PARAM)
    )
    return {
        "template_name": rendered[WA_NAME],
        "template_language": rendered[WA_LANGUAGE],
        "template_params": json.dumps([value for _, value in params]),
    }


def _metadata(item: ClaimedExecution, step: CompiledStep) -> dict[str, str]:
    meta = {
        "enrollment_id": str(item.enrollment_id),
        "sequence_key": step.step.sequence_key,
        "step_key": step.step.key,
    }
    if item.tenant_key is not None:
        meta["tenant_key"] = item.tenant_key
    return meta
