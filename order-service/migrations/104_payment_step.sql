-- The payment step (issue 22): why an order is being cancelled, kept from the moment the
-- cancellation is decided (through REFUNDING) for the OrderCancelled that follows the refund.
ALTER TABLE orders ADD COLUMN cancel_reason TEXT;
