-- Stock per sku. Conservation: stock_added = available + reserved + sold, always; none negative.
CREATE TABLE products (
    sku         TEXT        PRIMARY KEY,
    name        TEXT        NOT NULL,
    price_cents BIGINT      NOT NULL CHECK (price_cents >= 0),
    available   BIGINT      NOT NULL CHECK (available >= 0),
    reserved    BIGINT      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    sold        BIGINT      NOT NULL DEFAULT 0 CHECK (sold >= 0),
    stock_added BIGINT      NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (stock_added = available + reserved + sold)
);

-- One reservation per order: all of its lines, or none.
CREATE TABLE reservations (
    reservation_id UUID        PRIMARY KEY,
    order_id       UUID        NOT NULL UNIQUE,
    status         TEXT        NOT NULL,
    lines          JSONB       NOT NULL,
    total_cents    BIGINT      NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
