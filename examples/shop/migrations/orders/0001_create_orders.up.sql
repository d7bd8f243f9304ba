-- An order goes placed -> confirmed | rejected, decided by the catalog's answer to OrderPlaced.
-- One order per cart: placing the same cart again returns the existing order.
CREATE TABLE orders (
    id         bigserial   PRIMARY KEY,
    cart_id    bigint      NOT NULL UNIQUE,
    user_id    bigint      NOT NULL,
    status     text        NOT NULL DEFAULT 'placed'
                           CHECK (status IN ('placed', 'confirmed', 'rejected')),
    reason     text,
    placed_at  timestamptz NOT NULL DEFAULT now(),
    decided_at timestamptz
);
