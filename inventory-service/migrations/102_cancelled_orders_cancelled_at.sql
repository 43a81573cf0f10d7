-- The retention job deletes cancellations older than the duplicate window, found by age.
CREATE INDEX cancelled_orders_cancelled_at ON cancelled_orders (cancelled_at);
