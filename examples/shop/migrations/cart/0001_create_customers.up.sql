-- The users the cart service has heard of, from UserRegistered events: the cart keeps its own
-- copy instead of reading users_schema, which its role cannot do.
CREATE TABLE customers (
    user_id    bigint      PRIMARY KEY,
    email      text        NOT NULL,
    learned_at timestamptz NOT NULL DEFAULT now()
);
