-- A parked key's head record itself, and since when it heads the key: a head whose retry copy
-- never comes back (its retry topic is no longer read after --retry-delays was shortened, or the
-- copy expired with the topic's retention) is dead-lettered from here by the sweep after
-- --parked-key-timeout, and the key's parked messages are applied. Rows parked before this
-- migration have no stored record (NULL): the sweep releases them with an error log instead.
ALTER TABLE parked_keys
    ADD COLUMN head_topic      TEXT,
    ADD COLUMN head_partition  INT,
    ADD COLUMN head_offset     BIGINT,
    ADD COLUMN head_headers    JSONB,
    ADD COLUMN head_payload    BYTEA,
    ADD COLUMN head_since      TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp();
CREATE INDEX parked_keys_by_age ON parked_keys (consumer_group, head_since);
