-- dripd 0007: every channel real (issue 13). Provider feedback arrives through webhooks and is
-- correlated by the provider's message id. Forward-only; never edit once released.

-- The provider events already recorded, by adapter and the provider's event id: a webhook
-- delivered twice (providers retry on any doubt) changes nothing the second time. Pruned
-- after `webhooks.retention`, longer than any provider retries.
CREATE TABLE dripd.provider_events (
    adapter_id   uuid NOT NULL REFERENCES dripd.channel_adapters ON DELETE CASCADE,
    event_id     text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 512),
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (adapter_id, event_id)
);
CREATE INDEX provider_events_received_idx ON dripd.provider_events (received_at);

-- Feedback names the message by the id its provider gave it at the send.
CREATE INDEX step_executions_provider_message_idx
    ON dripd.step_executions (adapter_id, provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Which provider event a message event came from.
ALTER TABLE dripd.message_events ADD COLUMN provider_event_id text;
