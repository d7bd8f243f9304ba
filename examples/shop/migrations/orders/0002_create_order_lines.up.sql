-- What was ordered, copied from the cart when the order was placed (the cart may change later;
-- the order must not).
CREATE TABLE order_lines (
    order_id   bigint  NOT NULL REFERENCES orders (id),
    product_id bigint  NOT NULL,
    quantity   integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
