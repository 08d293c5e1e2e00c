-- Cheaper writes on placement's hot path, found with pg_stat_statements and perf in
-- bench-loop (BENCHMARKS.md).

-- History rows and complaint links are written only in the transaction that writes their
-- work order, and work orders are never deleted, so these foreign keys guarded nothing the
-- code does not. They cost a trigger and an index probe per row: about a fifth of
-- PostgreSQL's CPU in the whole-loop benchmark.
ALTER TABLE work_order_history DROP CONSTRAINT work_order_history_work_order_id_fkey;
ALTER TABLE complaint_links DROP CONSTRAINT complaint_links_work_order_id_fkey;

-- The relay deletes what it published instead of marking it: the outbox holds only what is
-- still to send, rather than growing with every event ever written. (A re-publish after a
-- crash keeps its Nats-Msg-Id, which the stream drops as a duplicate.)
DELETE FROM outbox WHERE published_at IS NOT NULL;
DROP INDEX outbox_unpublished;
ALTER TABLE outbox DROP COLUMN published_at;
CREATE INDEX outbox_by_seq ON outbox (seq);
