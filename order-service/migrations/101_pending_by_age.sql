-- The saga deadline check looks for old PENDING orders.
CREATE INDEX orders_status_created ON orders (status, created_at);
