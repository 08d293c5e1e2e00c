-- Complaints attached to a work order other than the one they opened: thread follow-ups
-- (and, later, merges). Lets GetComplaintStatus answer for every complaint.
CREATE TABLE complaint_links (
    tenant        text        NOT NULL,
    complaint_id  uuid        NOT NULL,
    work_order_id uuid        NOT NULL REFERENCES work_orders (work_order_id),
    linked_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, complaint_id)
);

CREATE INDEX work_orders_open_threads ON work_orders (tenant, thread_id) WHERE thread_id <> '';
