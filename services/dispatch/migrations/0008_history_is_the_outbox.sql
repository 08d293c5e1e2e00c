-- Work-order events are relayed from the history rows written with their changes, instead of
-- from a copy in the outbox that was inserted, read and deleted: that copy was a quarter of
-- the row writes per complaint and a fifth of PostgreSQL's CPU in bench-loop
-- (BENCHMARKS.md). The outbox stays for the other events (incident alerts).
--
-- The relay keeps a cursor, not a mark per row. A sequence alone cannot order it: a number
-- taken by a transaction that commits late would land behind the cursor and be skipped. So
-- rows are ordered by the id of the transaction that wrote them, then by sequence, and the
-- relay reads only rows written by transactions older than every transaction still running
-- (`pg_snapshot_xmin`): none of those can commit another row before the cursor.

-- Rows written before this migration have NULL here; their events went through the outbox.
-- (Columns added without a default leave existing rows as they are, without a rewrite.)
ALTER TABLE work_order_history
    ADD COLUMN subject       text,
    ADD COLUMN payload       bytea,
    ADD COLUMN trace_headers jsonb,
    ADD COLUMN written_by    xid8,
    ADD COLUMN seq           bigint;

CREATE SEQUENCE work_order_history_seq OWNED BY work_order_history.seq;

ALTER TABLE work_order_history
    ALTER COLUMN written_by SET DEFAULT pg_current_xact_id(),
    ALTER COLUMN seq SET DEFAULT nextval('work_order_history_seq');

-- Built inside the migration, so on a long history it holds writes to the table until done;
-- existing rows (all NULL here) only make it take longer.
CREATE INDEX work_order_history_relay_order ON work_order_history (written_by, seq);

-- Where the relay has got to: the last history row published. One row; a relay locks it for
-- its round, so replicas take turns rather than publishing the same rows side by side.
CREATE TABLE history_relay_cursor (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    written_by xid8   NOT NULL,
    seq        bigint NOT NULL
);

INSERT INTO history_relay_cursor (written_by, seq) VALUES ('0', 0);

-- Events committed but not yet published, from either source: what tests and benchmarks wait
-- on before they call the pipeline idle.
-- (The cursor is read by subqueries, which the index scan starts from; joined, it was not.)
CREATE VIEW unpublished_events AS
SELECT (SELECT count(*) FROM outbox)
     + (SELECT count(*) FROM work_order_history
        WHERE (written_by, seq) > ((SELECT written_by FROM history_relay_cursor),
                                   (SELECT seq FROM history_relay_cursor))) AS events;
