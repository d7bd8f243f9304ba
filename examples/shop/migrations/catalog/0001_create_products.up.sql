-- What is for sale and how many are left. The CHECK is the last line of defence: a reservation
-- that would oversell fails instead of leaving negative stock.
CREATE TABLE products (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    price_cents bigint      NOT NULL CHECK (price_cents >= 0),
    stock       integer     NOT NULL CHECK (stock >= 0),
    created_at  timestamptz NOT NULL DEFAULT now()
);
