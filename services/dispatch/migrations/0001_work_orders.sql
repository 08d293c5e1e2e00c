-- Work orders: the system of record. One per complaint (unique per tenant).
CREATE TABLE work_orders (
    work_order_id         uuid PRIMARY KEY,
    tenant                text        NOT NULL,
    complaint_id          uuid        NOT NULL,
    state                 smallint    NOT NULL,
    version               bigint      NOT NULL,
    team                  text        NOT NULL,
    assignee              text        NOT NULL DEFAULT '',
    category              text        NOT NULL,
    priority              smallint    NOT NULL,
    intent                smallint    NOT NULL,
    channel               smallint    NOT NULL,
    channel_message_id    text        NOT NULL,
    poster_id             text        NOT NULL,
    poster_name           text        NOT NULL DEFAULT '',
    poster_followers      bigint      NOT NULL DEFAULT 0,
    poster_verified       boolean     NOT NULL DEFAULT false,
    summary               text        NOT NULL,
    thread_id             text        NOT NULL DEFAULT '',
    locale                text        NOT NULL DEFAULT '',
    needs_private_channel boolean     NOT NULL DEFAULT false,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL,
    first_response_due    timestamptz NOT NULL,
    resolution_due        timestamptz NOT NULL,
    resolved_at           timestamptz,
    resolution_note       text        NOT NULL DEFAULT '',
    UNIQUE (tenant, complaint_id)
);

CREATE INDEX work_orders_listing ON work_orders (tenant, created_at DESC, work_order_id DESC);

-- The audit timeline: one row per version of a work order.
CREATE TABLE work_order_history (
    work_order_id uuid        NOT NULL REFERENCES work_orders (work_order_id),
    version       bigint      NOT NULL,
    kind          text        NOT NULL,
    actor         text        NOT NULL,
    note          text        NOT NULL DEFAULT '',
    occurred_at   timestamptz NOT NULL,
    PRIMARY KEY (work_order_id, version)
);

-- Transactional outbox: events written with the change that caused them, published by
-- the relay with Nats-Msg-Id = event_id.
CREATE TABLE outbox (
    event_id      text PRIMARY KEY,
    subject       text        NOT NULL,
    event_type    text        NOT NULL,
    payload       bytea       NOT NULL,
    trace_headers jsonb       NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    seq           bigserial,
    published_at  timestamptz
);

CREATE INDEX outbox_unpublished ON outbox (seq) WHERE published_at IS NULL;
