-- A delivery row is written twice: claimed (inserted with a lease), then recorded (state,
-- attempts, error, lease, delivery time). None of those columns is indexed, so the record
-- can be a heap-only update, which writes no index entries, but only when the row's page
-- has room for the new version. Packed full by the inserts, pages had none, and every
-- record added entries to all three indexes. Leave room; the same for customer progress,
-- which is updated in place as a work order advances.
ALTER TABLE deliveries SET (fillfactor = 70);
ALTER TABLE customer_progress SET (fillfactor = 70);
