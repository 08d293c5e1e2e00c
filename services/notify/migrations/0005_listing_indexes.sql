-- The delivery log is read per complaint, per work order or per recipient, newest first:
-- each from an index in that order (keyset pagination on seq), not by walking the tenant's
-- whole log for the few rows that match.
DROP INDEX deliveries_by_complaint;
CREATE INDEX deliveries_by_complaint ON deliveries (tenant, complaint_id, seq DESC);
CREATE INDEX deliveries_by_work_order ON deliveries (tenant, work_order_id, seq DESC);
CREATE INDEX deliveries_by_recipient ON deliveries (tenant, recipient, seq DESC);
