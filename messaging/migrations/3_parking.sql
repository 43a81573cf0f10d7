-- Per-key parking (see messaging::parking): while a message of a key (an order) waits in a retry
-- topic, the key is parked here and the key's later messages wait in parked_messages, in order.
CREATE TABLE parked_keys (
    consumer_group  TEXT        NOT NULL,
    message_key     TEXT        NOT NULL,
    head_message_id UUID        NOT NULL,
    reason          TEXT        NOT NULL,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, message_key)
);

CREATE TABLE parked_messages (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group  TEXT        NOT NULL,
    message_key     TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INT         NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    headers         JSONB       NOT NULL,
    payload         BYTEA,
    parked_at       TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX parked_messages_by_key ON parked_messages (consumer_group, message_key, id);
