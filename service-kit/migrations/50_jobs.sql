-- The job runner's queue (service-kit/src/jobs.rs): work that must run outside any consumer's
-- transaction (a call to an outside API) or later (a step's timeout). A job is enqueued in the
-- transaction of the business change that needs it, so it exists if and only if that change
-- commits; it is deleted in the transaction that does its work. One job per (kind, key): enqueuing
-- it again is a no-op.
CREATE TABLE jobs (
    id uuid PRIMARY KEY,
    kind text NOT NULL,
    -- What the job is about, e.g. an order id.
    key text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}',
    -- When it may run next: while a runner holds it, when its claim runs out.
    run_at timestamptz NOT NULL,
    -- The runner's claim on it: only the holder of this token can complete or reschedule it.
    claim uuid,
    -- Attempts spent (a "not now" spends none).
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Set when the runner gave up on it; the row stays as the record of that until the retention
    -- job prunes it.
    failed_at timestamptz,
    UNIQUE (kind, key)
);

CREATE INDEX jobs_due ON jobs (run_at) WHERE failed_at IS NULL;
CREATE INDEX jobs_failed_at ON jobs (failed_at) WHERE failed_at IS NOT NULL;
