-- The reference the capture benchmark compares pg_sync against: a classic PL/pgSQL audit
-- trigger doing the same work (row to jsonb, old row, changed-column diff, one log insert
-- and a pg_notify in the writing transaction).

CREATE TABLE IF NOT EXISTS bench_audit_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name      text NOT NULL,
    op              text NOT NULL,
    entity_id       text,
    data            jsonb,
    old_data        jsonb,
    changed_columns text[],
    txid            xid8 NOT NULL DEFAULT pg_current_xact_id(),
    captured_at     timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION bench_audit() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
    old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
    changed text[];
BEGIN
    IF TG_OP = 'UPDATE' THEN
        SELECT array_agg(n.key) INTO changed
          FROM jsonb_each(new_row) n
         WHERE n.value IS DISTINCT FROM old_row -> n.key;
        IF changed IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;
    INSERT INTO bench_audit_log (table_name, op, entity_id, data, old_data, changed_columns)
    VALUES (TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME, TG_OP,
            coalesce(new_row, old_row) ->> 'id', new_row, old_row, changed);
    PERFORM pg_notify('bench_audit', '');
    RETURN NULL;
END
$$;
