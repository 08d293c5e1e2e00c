-- A sender leases a pending delivery before calling the gateway, so two senders of the
-- same delivery (say, the first-response watchdog and the classified path) never both send.
-- A crashed sender's lease runs out and the redelivered event takes over.
ALTER TABLE deliveries ADD COLUMN lease_until timestamptz;

-- The newest work-order version the customer has been told about: a status update for an
-- older version arriving late is not sent.
CREATE TABLE customer_progress (
    work_order_id text PRIMARY KEY,
    last_version  bigint NOT NULL
);
