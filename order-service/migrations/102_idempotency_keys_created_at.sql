-- Idempotency keys expire after --idempotency-key-ttl; the retention job finds them by age.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
