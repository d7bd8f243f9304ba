-- Release 2, step 3 of 3: the bug. It was written against a developer's database that had a
-- `discontinued` column nobody committed a migration for, so it fails in every other database
-- with "column discontinued does not exist". The deploy must leave the schema as it was.
INSERT INTO inventory_history (product_id, change)
SELECT id, stock FROM products WHERE NOT discontinued;
