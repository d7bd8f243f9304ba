-- Which OrderPlaced event closed the cart: `shop demo` joins it with the orders service's
-- outbox, one to one, to prove every event was applied (closing a cart is an UPDATE, which
-- would otherwise leave no trace of the event that did it).
ALTER TABLE carts ADD COLUMN checked_out_by uuid;
