-- Release 2 of the catalog, step 1 of 3: fine on its own.
CREATE TABLE categories (
    id   bigserial PRIMARY KEY,
    name text      NOT NULL UNIQUE
);
