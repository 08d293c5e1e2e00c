-- Agents' corrections of what classify decided: each a labelled example (the work order's
-- masked summary with the intent and category the agent chose) that classify-train learns
-- from (`dispatch-corrections` exports a tenant's). Kept apart from the work orders, so
-- archiving a work order keeps what it taught.
CREATE TABLE classification_corrections (
    tenant            text        NOT NULL,
    work_order_id     uuid        NOT NULL,
    -- The work order's version the correction made.
    version           bigint      NOT NULL,
    text              text        NOT NULL,
    intent            smallint    NOT NULL,
    category          text        NOT NULL,
    previous_intent   smallint    NOT NULL,
    previous_category text        NOT NULL,
    actor             text        NOT NULL,
    corrected_at      timestamptz NOT NULL,
    PRIMARY KEY (work_order_id, version)
);
CREATE INDEX classification_corrections_by_tenant
    ON classification_corrections (tenant, corrected_at);
