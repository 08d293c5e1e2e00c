-- The delivery log records outcomes, written from notify's own `notification.*` events.
-- Who sends a delivery, and what each customer has been told, live in the JetStream
-- key-value bucket CLOSEDLOOP_NOTIFY, so that replies go out while PostgreSQL is away.
ALTER TABLE deliveries DROP COLUMN lease_until;
DROP TABLE customer_progress;
