"""Prometheus metrics of one daemon, on its own registry, with cached children for the hot path."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from dripd import __version__
from dripd.model import Verdict

OUTCOMES = ("sent", "skipped", "deferred", "retried", "failed", "done")

OUTCOME_OF_VERDICT: dict[Verdict, str] = {
    Verdict.SENT: "sent",
    Verdict.SKIPPED: "skipped",
    Verdict.DEFERRED: "deferred",
    Verdict.RETRY: "retried",
    Verdict.FAILED: "failed",
    Verdict.DONE: "done",
}

# Label value for an outcome that never reached a channel or provider.
NONE_LABEL = "none"

_DB_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
_SEND_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_END_TO_END_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class Metrics:
    """Every `dripd_*` metric of one daemon. Tests create their own; nothing is global."""

    def __init__(self, *, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.executions_claimed = Counter(
            "dripd_executions_claimed_total",
            "Executions claimed by this daemon.",
            ["channel"],
            registry=r,
        )
        self.executions = Counter(
            "dripd_executions_total",
            "Claimed executions by outcome (sent, skipped, deferred, retried, failed, done).",
            ["outcome", "channel", "provider"],
            registry=r,
        )
        self.claim_duration = Histogram(
            "dripd_claim_duration_seconds",
            "Time of one claim query.",
            buckets=_DB_BUCKETS,
            registry=r,
        )
        self.send_duration = Histogram(
            "dripd_send_duration_seconds",
            "Time of one provider send call.",
            ["channel", "provider"],
            buckets=_SEND_BUCKETS,
            registry=r,
        )
        self.record_duration = Histogram(
            "dripd_record_duration_seconds",
            "Time of one batched record write.",
            buckets=_DB_BUCKETS,
            registry=r,
        )
        self.claim_to_record = Histogram(
            "dripd_claim_to_record_seconds",
            "Time from claiming one execution to recording its outcome, in this daemon.",
            buckets=_END_TO_END_BUCKETS,
            registry=r,
        )
        self.lease_renewals = Counter(
            "dripd_lease_renewals_total",
            "Leases of held executions renewed (one statement renews all of a round).",
            registry=r,
        )
        self.leases_lost = Counter(
            "dripd_leases_lost_total",
            "Held executions whose renewal found another claim: dropped, never sent by us.",
            registry=r,
        )
        self.clock_skew = Gauge(
            "dripd_clock_skew_seconds",
            "This host's wall clock minus the database's (dripd runs on the database's).",
            registry=r,
        )
        self.due_backlog = Gauge(
            "dripd_due_backlog", "Executions due now and not yet claimed.", registry=r
        )
        self.oldest_due_age = Gauge(
            "dripd_oldest_due_age_seconds",
            "Age of the oldest due, unclaimed execution.",
            registry=r,
        )
        self.in_flight = Gauge(
            "dripd_in_flight", "Executions claimed and not yet recorded.", registry=r
        )
        self.listen_reconnects = Counter(
            "dripd_listen_reconnects_total",
            "Reconnections of the LISTEN connection.",
            registry=r,
        )
        self.condition_errors = Counter(
            "dripd_condition_errors_total",
            "Conditions that could not be evaluated and failed closed (counted false).",
            registry=r,
        )
        self.hook_calls = Counter(
            "dripd_hook_calls_total",
            "Hook calls by kind (http, python) and result (ok, error).",
            ["kind", "result"],
            registry=r,
        )
        self.hook_duration = Histogram(
            "dripd_hook_duration_seconds",
            "Time of one hook call, retries included.",
            ["kind"],
            buckets=_SEND_BUCKETS,
            registry=r,
        )
        self.waits_released = Counter(
            "dripd_waits_total",
            "Waiting steps that ended, by how (event, timeout).",
            ["how"],
            registry=r,
        )
        self.deferrals = Counter(
            "dripd_deferrals_total",
            "Executions deferred by a sending rule, by reason (outside_window, rate_limited, "
            "quota_exhausted, adapter_paused, enrollment_paused, provider_unavailable).",
            ["reason"],
            registry=r,
        )
        self.adapter_paused = Gauge(
            "dripd_adapter_paused",
            "1 while an adapter is paused by a bounce or complaint threshold, else 0.",
            ["adapter"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "dripd_circuit_state",
            "An adapter's circuit breaker as this daemon last saw it: 0 closed, 1 open, "
            "2 half-open (one daemon probes the provider).",
            ["adapter"],
            registry=r,
        )
        self.circuit_transitions = Counter(
            "dripd_circuit_transitions_total",
            "Circuit breaker transitions this daemon made, by adapter and the state entered "
            "(open, half_open, closed).",
            ["adapter", "to"],
            registry=r,
        )
        self.leads = Counter(
            "dripd_leads_total",
            "Lead posts and confirmations by outcome (created, pending, confirmed, duplicate, "
            "mailbox_limited, honeypot, rate_limited, invalid, unavailable); replays excluded.",
            ["outcome"],
            registry=r,
        )
        self.webhooks = Counter(
            "dripd_webhooks_total",
            "Provider webhook requests by provider and outcome (accepted, unverified, "
            "bad_payload, too_large, not_found, unavailable, error).",
            ["provider", "outcome"],
            registry=r,
        )
        self.feedback_events = Counter(
            "dripd_feedback_events_total",
            "Provider feedback events by provider and type (delivered, bounced, …); "
            "`duplicate` counts redeliveries that changed nothing.",
            ["provider", "type"],
            registry=r,
        )
        self.short_links_created = Counter(
            "dripd_short_links_created_total",
            "Short links made and stored, by provider (dripd, webhook); links a retry "
            "reused are not counted.",
            ["provider"],
            registry=r,
        )
        self.short_link_errors = Counter(
            "dripd_short_link_errors_total",
            "Messages whose links could not be shortened (shortener or database failed), "
            "by provider (dripd, webhook).",
            ["provider"],
            registry=r,
        )
        self.short_link_clicks = Counter(
            "dripd_short_link_clicks_total",
            "Requests to dripd's redirect `/l/{code}` by outcome (redirected, unknown).",
            ["outcome"],
            registry=r,
        )
        self.short_links_fallback = Counter(
            "dripd_short_links_fallback_total",
            "Messages sent with their original links after shortening failed (on_error = "
            '"send_originals").',
            registry=r,
        )
        self.spintax_unbalanced = Counter(
            "dripd_spintax_unbalanced_total",
            "Rendered fields left as they were because their spintax braces do not balance "
            "(the braces came from data), by field.",
            ["field"],
            registry=r,
        )
        self.info = Gauge("dripd_info", "Build information; always 1.", ["version"], registry=r)
        self.info.labels(version=version).set(1)

        self._claimed: dict[str, Counter] = {}
        self._outcomes: dict[tuple[str, str, str], Counter] = {}
        self._sends: dict[tuple[str, str], Histogram] = {}

    def claimed(self, channel: str | None, n: int = 1) -> None:
        """Count `n` executions claimed for `channel`."""
        key = channel or NONE_LABEL
        child = self._claimed.get(key)
        if child is None:
            child = self._claimed[key] = self.executions_claimed.labels(channel=key)
        child.inc(n)

    def outcome(self, outcome: str, channel: str | None, provider: str | None, n: int = 1) -> None:
        """Count `n` executions that ended in `outcome` (one of OUTCOMES)."""
        key = (outcome, channel or NONE_LABEL, provider or NONE_LABEL)
        child = self._outcomes.get(key)
        if child is None:
            if outcome not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
            child = self._outcomes[key] = self.executions.labels(*key)
        child.inc(n)

    def verdict(self, verdict: Verdict, channel: str | None, provider: str | None) -> None:
        """Count one execution by the pipeline's verdict."""
        self.outcome(OUTCOME_OF_VERDICT[verdict], channel, provider)

    def observe_send(self, channel: str | None, provider: str | None, seconds: float) -> None:
        """Record the duration of one send call."""
        key = (channel or NONE_LABEL, provider or NONE_LABEL)
        child = self._sends.get(key)
        if child is None:
            child = self._sends[key] = self.send_duration.labels(*key)
        child.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
