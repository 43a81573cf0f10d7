-- Which consumer instance reads which partitions (messaging::ownership). Every live consumer writes
-- its assignment here every few seconds, so a partition that no live instance reads is noticed and
-- its group made to rebalance. One row per instance, group and topic; rows of instances gone for an
-- hour are deleted by the consumers themselves.
CREATE TABLE consumer_members (
    consumer_group TEXT        NOT NULL,
    member         UUID        NOT NULL,
    topic          TEXT        NOT NULL,
    partitions     INT[]       NOT NULL,
    seen_at        TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (consumer_group, topic, member)
);
