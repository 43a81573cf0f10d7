-- The inbox: one row per message a consumer group applied, inserted in the same transaction as the
-- effect, so that a redelivered message (same message-id) is recognised and skipped.
CREATE TABLE inbox (
    consumer_group TEXT        NOT NULL,
    message_id     UUID        NOT NULL,
    event_type     TEXT        NOT NULL,
    topic          TEXT        NOT NULL,
    kafka_partition INT        NOT NULL,
    kafka_offset   BIGINT      NOT NULL,
    processed_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, message_id)
);
