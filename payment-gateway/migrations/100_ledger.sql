-- The stand-in processor's ledger. A charge or a refund is recorded once per Idempotency-Key,
-- with the request it answered and the answer it got, so that the same key always gets the same
-- answer, across restarts.
CREATE TABLE charges (
    charge_id       UUID        PRIMARY KEY,
    idempotency_key TEXT        NOT NULL UNIQUE,
    payment_id      UUID        NOT NULL,
    customer_id     UUID        NOT NULL,
    amount_cents    BIGINT      NOT NULL CHECK (amount_cents > 0),
    status          TEXT        NOT NULL CHECK (status IN ('succeeded', 'declined')),
    decline_code    TEXT,
    -- What the refunds of this charge returned so far; never more than was charged.
    refunded_cents  BIGINT      NOT NULL DEFAULT 0
                    CHECK (refunded_cents >= 0 AND refunded_cents <= amount_cents),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (status = 'succeeded' OR refunded_cents = 0)
);
CREATE INDEX charges_payment_id ON charges (payment_id);
CREATE INDEX charges_created_at ON charges (created_at);

CREATE TABLE refunds (
    refund_id       UUID        PRIMARY KEY,
    idempotency_key TEXT        NOT NULL UNIQUE,
    -- No foreign key: the retention job prunes both tables by age, charges first.
    charge_id       UUID        NOT NULL,
    amount_cents    BIGINT      NOT NULL CHECK (amount_cents > 0),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX refunds_charge_id ON refunds (charge_id);
CREATE INDEX refunds_created_at ON refunds (created_at);
