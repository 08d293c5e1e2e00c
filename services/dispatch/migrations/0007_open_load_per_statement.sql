-- New work orders count toward their agents' open load once per statement, not once per row.
-- Placement inserts a batch in one statement; the row trigger ran one UPDATE of `agents` per
-- work order (20,000 a bench-loop run, each planned afresh under the pools' custom plans).
-- This runs one UPDATE per batch, adding each agent's count. Updates and deletes, which
-- come a few rows at a time and must compare old with new, keep the row trigger.
CREATE FUNCTION count_inserted_open_load() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE agents a SET open_load = a.open_load + n.added
    FROM (SELECT tenant, assignee, count(*)::integer AS added FROM inserted
          WHERE assignee <> '' AND state IN (1, 2, 3, 4, 7)
          GROUP BY tenant, assignee) n
    WHERE a.tenant = n.tenant AND a.agent_id = n.assignee;
    RETURN NULL;
END $$;

DROP TRIGGER work_orders_open_load ON work_orders;

CREATE TRIGGER work_orders_open_load
    AFTER DELETE OR UPDATE OF state, assignee, tenant ON work_orders
    FOR EACH ROW EXECUTE FUNCTION track_open_load();

CREATE TRIGGER work_orders_open_load_inserted
    AFTER INSERT ON work_orders REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION count_inserted_open_load();
