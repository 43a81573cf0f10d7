-- The order aggregate (write model). Every change also appends to the outbox in the same transaction.
CREATE TABLE orders (
    order_id    UUID        PRIMARY KEY,
    customer_id UUID        NOT NULL,
    status      TEXT        NOT NULL,
    items       JSONB       NOT NULL,
    total_cents BIGINT,
    reason      TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- The read model served by GET /orders: the order as users see it, with its status history.
CREATE TABLE order_status_view (
    order_id    UUID        PRIMARY KEY,
    customer_id UUID        NOT NULL,
    status      TEXT        NOT NULL,
    items       JSONB       NOT NULL,
    total_cents BIGINT,
    reason      TEXT,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL,
    history     JSONB       NOT NULL
);
CREATE INDEX order_status_view_status_created ON order_status_view (status, created_at DESC);
CREATE INDEX order_status_view_created ON order_status_view (created_at DESC);

-- Idempotency-Key of POST /orders: the normalized request and the response it got, kept forever.
CREATE TABLE idempotency_keys (
    idempotency_key TEXT        PRIMARY KEY,
    request         JSONB       NOT NULL,
    order_id        UUID        NOT NULL REFERENCES orders (order_id),
    response        JSONB       NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
