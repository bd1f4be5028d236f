"""One claimed execution's path: gate → render → send → outcome. No SQL here."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog

from dripd.channels.base import Channel, Message, PermanentError, TransientError
from dripd.clock import Clock
from dripd.conditions.expr import evaluate_safely
from dripd.conditions.hooks import HookEnrollment, HookError, Hooks, HookStep, PythonHookSpec
from dripd.content.liquid import TemplateError
from dripd.engine.advance import CompiledStep
from dripd.metrics import Metrics
from dripd.model import (
    DEFAULT_RECIPIENT,
    Adapter,
    ClaimedExecution,
    EnrollmentStatus,
    Outcome,
    Verdict,
)
from dripd.rules.suppression import normalize

log = structlog.get_logger("dripd.pipeline")

Resolve = Callable[[str | None, str, str | None], "tuple[Adapter, Channel] | str"]
HooksFor = Callable[[CompiledStep, str | None], Hooks]


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The retry policy from the configuration."""

    max_attempts: int
    retry_base: timedelta
    retry_max: timedelta
    message_id_domain: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepared:
    """A rendered message ready to send, with the address suppressions are checked under."""

    execution: ClaimedExecution
    step: CompiledStep
    adapter: Adapter
    channel: Channel
    message: Message
    address: str


def template_context(item: ClaimedExecution, step: CompiledStep) -> dict[str, Any]:
    """Flat variables: the subscriber's data, then dripd's own names (which win)."""
    return {
        **item.data,
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
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._policy = policy
        self._resolve = resolve
        self._hooks = hooks

    def _outcome(self, item: ClaimedExecution, verdict: Verdict, **kw: Any) -> Outcome:
        return Outcome(execution=item, verdict=verdict, finished_at=self._clock.now(), **kw)

    def max_attempts(self, step: CompiledStep) -> int:
        return step.step.max_attempts or self._policy.max_attempts

    def prepare(self, item: ClaimedExecution, step: CompiledStep) -> Prepared | Outcome:
        """Gate, decide and render; an Outcome when the execution ends here (a step that
        sends nothing, a skip, a defer or a failure). Hooks must have run (`run_hooks`)."""
        channel = step.step.channel
        if item.enrollment_status is EnrollmentStatus.PAUSED:
            # The record statement holds the row until the enrollment resumes.
            return self._outcome(
                item,
                Verdict.DEFERRED,
                channel=channel,
                reason="enrollment_paused",
                retry_at=self._clock.now(),
            )
        if item.enrollment_status is not EnrollmentStatus.ACTIVE:
            return self._outcome(
                item,
                Verdict.SKIPPED,
                channel=channel,
                reason=f"enrollment_{item.enrollment_status.value}",
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
            reason = f"event:{step.step.wait_event}" if how == "event" else "wait_timeout"
            return self._outcome(item, Verdict.DONE, reason=reason)
        if step.when is not None:
            holds, error = evaluate_safely(step.when, condition_context(item, self._clock.now()))
            if error is not None:
                self.condition_failed(item, step.when.source, error)
            if not holds:
                return self._outcome(
                    item, Verdict.SKIPPED, channel=channel, reason="condition_false"
                )
        if channel is None:
            return self._outcome(item, Verdict.DONE, reason="no_channel")
        context = template_context(item, step)
        try:
            rendered = {name: t.render(context) for name, t in step.templates.items()}
        except TemplateError as exc:
            return self._outcome(
                item,
                Verdict.FAILED,
                channel=channel,
                error=f"template error in step {step.step.key!r}: {exc}",
            )
        to = rendered.pop("to", None) or default_recipient(channel, item.data)
        if not to or not to.strip():
            return self._outcome(item, Verdict.SKIPPED, channel=channel, reason="no_recipient")
        resolved = self._resolve(item.tenant_key, channel, step.step.adapter)
        if isinstance(resolved, str):
            return self._failure(item, step, channel, None, None, TransientError(resolved))
        adapter, impl = resolved
        message = Message(
            execution_id=item.id,
            idempotency_key=f"{item.id}:{item.replay}",
            message_id=f"<{item.id}.{item.replay}@{self._policy.message_id_domain}>",
            channel=channel,
            to=to.strip(),
            subject=rendered.get("subject"),
            text=rendered.get("text"),
            html=rendered.get("html"),
            body=rendered.get("body"),
            metadata=_metadata(item, step),
        )
        return Prepared(
            execution=item,
            step=step,
            adapter=adapter,
            channel=impl,
            message=message,
            address=normalize(channel, to),
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
                    enrollment=HookEnrollment(
                        id=str(item.enrollment_id),
                        tenant_key=item.tenant_key,
                        sequence_key=step.step.sequence_key,
                        subscriber_type=item.subscriber_type,
                        subscriber_id=item.subscriber_id,
                        data=item.data,
                    ),
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
            reason="suppressed",
        )

    async def send(self, p: Prepared) -> Outcome:
        """Send through the adapter; errors become a retry, a failure or a give-up."""
        item, channel, adapter = p.execution, p.message.channel, p.adapter
        started = time.perf_counter()
        try:
            receipt = await p.channel.send(p.message)
        except (TransientError, PermanentError) as exc:
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
        return self._outcome(
            item,
            Verdict.SENT,
            channel=channel,
            provider=adapter.provider,
            adapter_id=adapter.id,
            recipient=p.address,
            provider_message_id=receipt.provider_message_id,
        )

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
            return self._outcome(item, Verdict.FAILED, error=f"permanent: {exc}", **common)
        spent = item.attempt + 1
        limit = self.max_attempts(step)
        if spent >= limit:
            return self._outcome(
                item, Verdict.FAILED, error=f"gave up after {spent} attempts: {exc}", **common
            )
        return self._outcome(
            item,
            Verdict.RETRY,
            error=str(exc),
            retry_at=self._clock.now() + self.backoff(spent),
            **common,
        )

    def backoff(self, attempts_spent: int) -> timedelta:
        """Exponential backoff with jitter: base·2^(n-1), capped, then 50–100 % of it."""
        base = self._policy.retry_base.total_seconds()
        ceiling = self._policy.retry_max.total_seconds()
        delay = min(ceiling, base * 2 ** max(attempts_spent - 1, 0))
        return timedelta(seconds=delay * random.uniform(0.5, 1.0))


def default_recipient(channel: str, data: Mapping[str, Any]) -> str | None:
    key = DEFAULT_RECIPIENT.get(channel)
    value = data.get(key) if key else None
    return value if isinstance(value, str) else None


def _metadata(item: ClaimedExecution, step: CompiledStep) -> dict[str, str]:
    meta = {
        "enrollment_id": str(item.enrollment_id),
        "sequence_key": step.step.sequence_key,
        "step_key": step.step.key,
    }
    if item.tenant_key is not None:
        meta["tenant_key"] = item.tenant_key
    return meta
