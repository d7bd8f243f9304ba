ALTER TABLE carts DROP COLUMN checked_out_by;
