-- Items added to a cart after its order was placed (the order service read the cart, and the
-- OrderPlaced event that closes it was still on its way) are moved to a new open cart of the
-- same user when the cart closes: `carried_to` names it.
ALTER TABLE carts ADD COLUMN carried_to bigint;
