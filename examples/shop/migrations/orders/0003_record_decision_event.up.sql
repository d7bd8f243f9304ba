-- Which ProductStockReserved / StockReservationFailed event decided the order: `shop demo`
-- joins it with the catalog's outbox to prove every answer was applied.
ALTER TABLE orders ADD COLUMN decided_by uuid;
