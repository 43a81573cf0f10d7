-- One payment per order (payment-service's write model, served by GET /payments). Every change
-- that other services must hear of appends to the outbox in the same transaction.
CREATE TABLE payments (
    payment_id      UUID        PRIMARY KEY,
    order_id        UUID        NOT NULL UNIQUE,
    -- NULL only for a payment voided before its OrderAwaitingPayment arrived (nothing to charge).
    customer_id     UUID,
    amount_cents    BIGINT      NOT NULL CHECK (amount_cents >= 0),
    -- REQUESTED, CONFIRMED, DECLINED, REFUNDED, VOIDED (src/domain.rs).
    status          TEXT        NOT NULL,
    reason          TEXT,
    decline_code    TEXT,
    -- The processor's charge, once it answered that it charged.
    charge_id       UUID,
    refunded_cents  BIGINT      NOT NULL DEFAULT 0 CHECK (refunded_cents >= 0),
    -- Charge requests sent to the processor (each with the payment id as Idempotency-Key).
    attempts        INTEGER     NOT NULL DEFAULT 0,
    -- Until when a charge request sent may still be in flight: a refund of a payment whose
    -- outcome is unknown waits until then before it asks the processor's ledger what happened.
    charge_in_flight_until TIMESTAMPTZ,
    -- When the order asked for its money back (OrderRefundRequested): from then on no charge is
    -- sent, and the refund job refunds what was charged or voids the payment.
    refund_requested_at    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL
);
CREATE INDEX payments_created ON payments (created_at DESC);
-- The payments whose work is not done (the in-flight gauges read these, not the whole table).
CREATE INDEX payments_charging ON payments (created_at)
    WHERE status = 'REQUESTED' AND refund_requested_at IS NULL;
CREATE INDEX payments_refunding ON payments (refund_requested_at)
    WHERE status IN ('REQUESTED', 'CONFIRMED') AND refund_requested_at IS NOT NULL;
