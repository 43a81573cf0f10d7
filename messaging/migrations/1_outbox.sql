-- The transactional outbox: a service inserts a row in the same transaction as its state change;
-- outbox-relay publishes the row to Kafka and deletes it once the broker acknowledged it.
CREATE TABLE outbox (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id     UUID        NOT NULL UNIQUE,
    aggregate_type TEXT        NOT NULL,
    aggregate_id   TEXT        NOT NULL,
    event_type     TEXT        NOT NULL,
    content_type   TEXT        NOT NULL,
    payload        BYTEA       NOT NULL,
    causation_id   UUID,
    traceparent    TEXT,
    tracestate     TEXT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
