-- A cart and its items. `order_id` is set when the OrderPlaced event for the cart arrives;
-- after that the cart is closed.
CREATE TABLE carts (
    id             bigserial   PRIMARY KEY,
    user_id        bigint      NOT NULL REFERENCES customers (user_id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    order_id       bigint,
    checked_out_at timestamptz
);
CREATE TABLE cart_items (
    cart_id    bigint  NOT NULL REFERENCES carts (id),
    product_id bigint  NOT NULL,
    quantity   integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (cart_id, product_id)
);
