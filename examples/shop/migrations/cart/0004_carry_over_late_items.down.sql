ALTER TABLE carts DROP COLUMN carried_to;
