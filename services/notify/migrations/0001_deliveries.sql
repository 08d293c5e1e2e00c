-- The delivery log: one row per message notify owes someone. The id is deterministic
-- (what it is about and which version), so redelivered events find the row and send
-- nothing twice; it is also the Idempotency-Key the gateway sees.
CREATE TABLE deliveries (
    delivery_id   uuid PRIMARY KEY,
    tenant        text        NOT NULL,
    kind          smallint    NOT NULL,
    state         smallint    NOT NULL,
    channel       smallint    NOT NULL,
    recipient     text        NOT NULL,
    complaint_id  text        NOT NULL DEFAULT '',
    work_order_id text        NOT NULL DEFAULT '',
    body          text        NOT NULL,
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text        NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    delivered_at  timestamptz,
    seq           bigserial
);

CREATE INDEX deliveries_listing ON deliveries (tenant, seq DESC);
CREATE INDEX deliveries_by_complaint ON deliveries (tenant, complaint_id);
