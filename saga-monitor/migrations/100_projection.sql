-- The live projection: its tables live in schema `projection` so that a rebuild can build a
-- whole new set beside them and swap it in at once.
CREATE SCHEMA projection;

-- One row per distinct record of a saga: a record redelivered at its offset, or copied again to
-- the same topic under the same message id, is one step.
CREATE TABLE projection.steps (
    topic        TEXT        NOT NULL,
    partition    INTEGER     NOT NULL,
    "offset"     BIGINT      NOT NULL,
    order_id     UUID        NOT NULL,
    -- The event's own time (for retries and dead letters: when the copy was made).
    at           TIMESTAMPTZ NOT NULL,
    service      TEXT        NOT NULL,
    event_type   TEXT,
    kind         TEXT        NOT NULL CHECK (kind IN ('event', 'retry', 'dead_letter')),
    message_id   UUID,
    causation_id UUID,
    trace_id     TEXT,
    -- Why it was retried or dead-lettered, or why it could not be decoded.
    note         TEXT,
    decoded      BOOLEAN     NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
);
CREATE UNIQUE INDEX steps_once_per_message ON projection.steps (topic, message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX steps_of_saga ON projection.steps (order_id);

-- One row per saga, recomputed from its steps whenever one arrives.
CREATE TABLE projection.sagas (
    order_id      UUID        PRIMARY KEY,
    -- The order's status as its events tell it; none when no order event was seen.
    status        TEXT,
    outcome       TEXT        NOT NULL CHECK (outcome IN ('in_progress', 'confirmed', 'rejected', 'cancelled')),
    started_at    TIMESTAMPTZ NOT NULL,
    ended_at      TIMESTAMPTZ,
    waiting_for   TEXT        CHECK (waiting_for IN ('reservation', 'payment', 'refund', 'release')),
    waiting_since TIMESTAMPTZ,
    compensations INTEGER     NOT NULL,
    retries       INTEGER     NOT NULL,
    dead_letters  INTEGER     NOT NULL,
    steps         INTEGER     NOT NULL,
    trace_id      TEXT,
    CHECK ((waiting_for IS NULL) = (waiting_since IS NULL))
);
CREATE INDEX sagas_newest ON projection.sagas (started_at DESC, order_id);
CREATE INDEX sagas_waiting ON projection.sagas (waiting_for, waiting_since) WHERE waiting_for IS NOT NULL;
CREATE INDEX sagas_ended ON projection.sagas (ended_at) WHERE ended_at IS NOT NULL;

-- Where the projection stands in each partition: the next offset to project. Written in the
-- same transaction as the steps, so a kill at any moment neither loses nor doubles a step.
CREATE TABLE projection.checkpoints (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT  NOT NULL CHECK (next_offset >= 0),
    PRIMARY KEY (topic, partition)
);

-- Snapshots of the projection: every step with the checkpoints they were projected up to, read
-- in one consistent snapshot, and the projection version of the code that took them. A rebuild
-- starts from the newest snapshot of its own version and ignores the others.
CREATE TABLE snapshots (
    snapshot_id BIGSERIAL   PRIMARY KEY,
    version     INTEGER     NOT NULL,
    taken_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- [[topic, partition, next_offset], ...]
    checkpoints JSONB       NOT NULL,
    steps       BIGINT      NOT NULL
);
CREATE INDEX snapshots_newest ON snapshots (version, snapshot_id DESC);

CREATE TABLE snapshot_steps (
    snapshot_id  BIGINT      NOT NULL REFERENCES snapshots ON DELETE CASCADE,
    topic        TEXT        NOT NULL,
    partition    INTEGER     NOT NULL,
    "offset"     BIGINT      NOT NULL,
    order_id     UUID        NOT NULL,
    at           TIMESTAMPTZ NOT NULL,
    service      TEXT        NOT NULL,
    event_type   TEXT,
    kind         TEXT        NOT NULL,
    message_id   UUID,
    causation_id UUID,
    trace_id     TEXT,
    note         TEXT,
    decoded      BOOLEAN     NOT NULL,
    PRIMARY KEY (snapshot_id, topic, partition, "offset")
);
