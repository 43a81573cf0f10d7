-- The saga deadline moved onto the job runner (order-service/src/deadline.rs): every order
-- placed from now on gets a `saga-deadline` job in the transaction that places it. The orders
-- already PENDING get theirs here, due at once: each job checks the order against the current
-- --saga-deadline when it runs and waits until then if it is not due yet.
INSERT INTO jobs (id, kind, key, payload, run_at)
SELECT gen_random_uuid(), 'saga-deadline', order_id::text, 'null', created_at
FROM orders WHERE status = 'PENDING'
ON CONFLICT (kind, key) DO NOTHING;

