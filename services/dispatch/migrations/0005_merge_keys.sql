-- Open work orders by merge key (tenant, thread) and (tenant, poster, category), each one
-- expression. Every other index on work_orders leads with tenant, and before the first
-- ANALYZE the planner costed a tenant-only scan of one of them the same as the right index:
-- placement then read every open work order once per complaint in its batch, and a batch of
-- 256 took seconds. An expression only these indexes serve leaves no such choice.
DROP INDEX work_orders_open_by_poster;
DROP INDEX work_orders_open_threads;
CREATE INDEX work_orders_open_by_poster ON work_orders ((tenant || E'\x1f' || poster_id || E'\x1f' || category))
    WHERE state IN (1, 2, 3, 4, 7) AND poster_id <> '';
CREATE INDEX work_orders_open_by_thread ON work_orders ((tenant || E'\x1f' || thread_id))
    WHERE state IN (1, 2, 3, 4, 7) AND thread_id <> '';
