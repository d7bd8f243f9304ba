-- Release 2, step 2 of 3: fine on its own.
CREATE TABLE inventory_history (
    id         bigserial   PRIMARY KEY,
    product_id bigint      NOT NULL REFERENCES products (id),
    change     integer     NOT NULL,
    noted_at   timestamptz NOT NULL DEFAULT now()
);
