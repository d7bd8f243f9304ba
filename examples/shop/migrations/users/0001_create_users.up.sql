-- Who can shop. The email is the natural key: registering twice is a conflict, not a second user.
CREATE TABLE users (
    id         bigserial   PRIMARY KEY,
    email      text        NOT NULL UNIQUE,
    name       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
