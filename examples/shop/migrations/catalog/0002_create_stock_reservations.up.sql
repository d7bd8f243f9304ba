-- One row per order line whose stock was taken. There is deliberately no unique key on
-- (order_id, product_id): what makes a redelivered OrderPlaced reserve nothing the second time
-- is the consumer's idempotency claim (svcdb's process_once), and `shop demo` counts these rows
-- per order to prove it.
CREATE TABLE stock_reservations (
    id          bigserial   PRIMARY KEY,
    order_id    bigint      NOT NULL,
    product_id  bigint      NOT NULL REFERENCES products (id),
    quantity    integer     NOT NULL CHECK (quantity > 0),
    event_id    uuid        NOT NULL,
    reserved_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stock_reservations_order_idx ON stock_reservations (order_id);
