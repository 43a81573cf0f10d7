-- A charge that reached the processor after its payment was voided (a request that arrived, or
-- was recorded, later than its in-flight window). Found by that charge's own answer or by the
-- recheck of the processor's ledger that follows every void of a payment whose charge was sent,
-- and refunded in full (src/charging.rs, job refund-late-charge). The payment stays VOIDED: its
-- order was answered "nothing charged", and once this refund is made the processor holds
-- nothing of it again.
ALTER TABLE payments
    ADD COLUMN late_charge_id UUID,
    ADD COLUMN late_refunded_cents BIGINT NOT NULL DEFAULT 0 CHECK (late_refunded_cents >= 0);
