DELETE FROM inventory_history;
