-- Closed work orders older than the retention age (CLOSEDLOOP_ARCHIVE_AFTER) move here with
-- their history and follow-up links, so the tables the loop writes and the desks page
-- through hold months, not years. The API still reads these: point lookups fall back to
-- them, listings include them on request.
--
-- The archive keeps work_orders' columns in work_orders' order (rows move with
-- INSERT ... SELECT *): a migration that adds a column to work_orders adds it here too.
CREATE TABLE work_orders_archive (LIKE work_orders INCLUDING DEFAULTS);
ALTER TABLE work_orders_archive ADD PRIMARY KEY (work_order_id);
CREATE UNIQUE INDEX work_orders_archive_by_complaint ON work_orders_archive (tenant, complaint_id);
CREATE INDEX work_orders_archive_listing
    ON work_orders_archive (tenant, created_at DESC, work_order_id DESC);
CREATE INDEX work_orders_archive_by_team
    ON work_orders_archive (tenant, team, created_at DESC, work_order_id DESC);

-- History keeps the timeline, not the relayed events (published long before).
CREATE TABLE work_order_history_archive (
    work_order_id uuid        NOT NULL,
    version       bigint      NOT NULL,
    kind          text        NOT NULL,
    actor         text        NOT NULL,
    note          text        NOT NULL DEFAULT '',
    occurred_at   timestamptz NOT NULL,
    PRIMARY KEY (work_order_id, version)
);

CREATE TABLE complaint_links_archive (
    tenant        text        NOT NULL,
    complaint_id  uuid        NOT NULL,
    work_order_id uuid        NOT NULL,
    linked_at     timestamptz NOT NULL,
    PRIMARY KEY (tenant, complaint_id)
);

-- What the archiver looks for: closed work orders by when they last changed. Only closed
-- rows, and with archiving on only those younger than the retention age, so it stays small.
CREATE INDEX work_orders_closed ON work_orders (updated_at) WHERE state = 6;

-- Archiving finds a work order's follow-up links by work order, and old incidents still
-- count their archived work orders.
CREATE INDEX complaint_links_by_work_order ON complaint_links (work_order_id);
CREATE INDEX work_orders_archive_incident ON work_orders_archive (incident_id)
    WHERE incident_id IS NOT NULL;

-- Which feedback was applied is kept as long as work orders stay hot, then forgotten.
CREATE INDEX feedback_seen_by_age ON feedback_seen (seen_at);
