DROP TABLE inventory_history;
