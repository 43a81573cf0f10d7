-- The retention job deletes inbox rows older than the duplicate window (see messaging/src/retention.rs)
-- and measures the oldest one: both read by processed_at.
CREATE INDEX inbox_processed_at ON inbox (processed_at);
