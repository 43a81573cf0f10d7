-- Orders whose cancellation inventory has seen: a later OrderPlaced for one of them is rejected and
-- reserves nothing (it can arrive later when it was dead-lettered and redriven, for example).
CREATE TABLE cancelled_orders (
    order_id     UUID        PRIMARY KEY,
    reason       TEXT        NOT NULL,
    cancelled_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
