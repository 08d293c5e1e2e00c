-- Delivery log entries older than the retention age (CLOSEDLOOP_ARCHIVE_AFTER) move here,
-- so the log the desks read holds months, not years. ListDeliveries reads this table on
-- request. Same columns in the same order as deliveries (rows move with INSERT ... SELECT *):
-- a migration that adds a column to deliveries adds it here too.
CREATE TABLE deliveries_archive (LIKE deliveries);
ALTER TABLE deliveries_archive ADD PRIMARY KEY (delivery_id);
CREATE INDEX deliveries_archive_listing ON deliveries_archive (tenant, seq DESC);
CREATE INDEX deliveries_archive_by_complaint ON deliveries_archive (tenant, complaint_id, seq DESC);
CREATE INDEX deliveries_archive_by_work_order ON deliveries_archive (tenant, work_order_id, seq DESC);
CREATE INDEX deliveries_archive_by_recipient ON deliveries_archive (tenant, recipient, seq DESC);

-- What the archiver looks for: the oldest entries first.
CREATE INDEX deliveries_by_age ON deliveries (created_at);
