-- Counters that keep placement's cost independent of how much work is open or how many
-- complaints arrived lately: before them, every batch counted each agent's open work orders
-- and every recent arrival of its categories and regions, and slowed as those grew.

-- Each agent's open work orders, kept by a trigger so every path that assigns, resolves,
-- reopens or reassigns (placement, the API, the watcher, incidents, feedback) keeps it
-- right in the same transaction.
ALTER TABLE agents ADD COLUMN open_load integer NOT NULL DEFAULT 0;

UPDATE agents a SET open_load = (
    SELECT count(*) FROM work_orders w
    WHERE w.tenant = a.tenant AND w.assignee = a.agent_id AND w.assignee <> ''
      AND w.state IN (1, 2, 3, 4, 7));

CREATE FUNCTION track_open_load() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_counted boolean := TG_OP <> 'INSERT' AND OLD.assignee <> '' AND OLD.state IN (1, 2, 3, 4, 7);
    is_counted  boolean := TG_OP <> 'DELETE' AND NEW.assignee <> '' AND NEW.state IN (1, 2, 3, 4, 7);
BEGIN
    IF was_counted AND is_counted AND OLD.tenant = NEW.tenant AND OLD.assignee = NEW.assignee THEN
        RETURN NULL;
    END IF;
    IF was_counted THEN
        UPDATE agents SET open_load = open_load - 1 WHERE tenant = OLD.tenant AND agent_id = OLD.assignee;
    END IF;
    IF is_counted THEN
        UPDATE agents SET open_load = open_load + 1 WHERE tenant = NEW.tenant AND agent_id = NEW.assignee;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER work_orders_open_load
    AFTER INSERT OR DELETE OR UPDATE OF state, assignee, tenant ON work_orders
    FOR EACH ROW EXECUTE FUNCTION track_open_load();

-- Arrivals counted per minute rather than kept one row each.
CREATE TABLE arrival_counts (
    tenant    text        NOT NULL,
    category  text        NOT NULL,
    region    text        NOT NULL,
    minute    timestamptz NOT NULL,
    arrivals  integer     NOT NULL,
    PRIMARY KEY (tenant, category, region, minute)
);

INSERT INTO arrival_counts (tenant, category, region, minute, arrivals)
    SELECT tenant, category, region, date_trunc('minute', arrived_at), count(*)
    FROM arrivals GROUP BY 1, 2, 3, 4;

DROP TABLE arrivals;

CREATE INDEX arrival_counts_by_minute ON arrival_counts (minute);
