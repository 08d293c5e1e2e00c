-- Listings an agent desk pages through, each answered from one index in its own order
-- (keyset pagination on created_at, work_order_id), so a page costs the same on the first
-- and the last page, at any table size. A tenant-wide listing uses work_orders_listing.
-- Built inside the migration: on a large table this holds writes to work_orders until done.
CREATE INDEX work_orders_by_team_state
    ON work_orders (tenant, team, state, created_at DESC, work_order_id DESC);
CREATE INDEX work_orders_by_state
    ON work_orders (tenant, state, created_at DESC, work_order_id DESC);
CREATE INDEX work_orders_by_assignee
    ON work_orders (tenant, assignee, created_at DESC, work_order_id DESC)
    WHERE assignee <> '';
