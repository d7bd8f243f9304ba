ALTER TABLE orders DROP COLUMN decided_by;
