-- pg_sync 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_sync UPDATE), written by hand (the plpgsql
-- bodies are api.sql's, verbatim); the upgrade test checks that the result equals a fresh
-- install of 0.2.0, object by object.
--
-- Before: install the 0.2.0 files and restart PostgreSQL (with pg_sync preloaded, every backend
-- runs the library the postmaster loaded). Until this script runs, capture writes the 0.1.0
-- log; the gateway of 0.2.0 needs this script first.
--
-- What changes (README "Upgrading"): the log marks each transaction's last row (tx_first), so
-- reading a page is two range scans; least privilege (SPEC 1.9): nothing is granted to PUBLIC,
-- capture runs as the writer, track/untrack/prune and the event triggers as the extension's
-- owner for the callers they check; the gateway's policy compiler and its change counter;
-- pg_sync's locks are tables of the schema sync_lock instead of advisory lock keys.

-- The log stops while it is rewritten: writers of 0.1.0 finish first (they hold ROW
-- EXCLUSIVE), new ones wait for this transaction. Cursors carry over unchanged: they name ids
-- and snapshots, and every transaction gets its last row marked below.
LOCK TABLE sync.change_history IN ACCESS EXCLUSIVE MODE;
ALTER TABLE sync.change_history ADD COLUMN tx_first bigint;
UPDATE sync.change_history h SET tx_first = t.first_id
  FROM (SELECT txid, min(id) AS first_id, max(id) AS last_id
          FROM sync.change_history GROUP BY txid) t
 WHERE h.id = t.last_id;

ALTER TABLE sync.state ADD COLUMN policy_version bigint NOT NULL DEFAULT 0;

-- pg_sync's locks move from advisory keys, which every role may take, to tables of a schema
-- nobody else may use (schema.sql has the why).
CREATE SCHEMA sync_lock;
REVOKE ALL ON SCHEMA sync_lock FROM PUBLIC;
CREATE TABLE sync_lock.log_read ();
CREATE TABLE sync_lock.ingest ();
CREATE OR REPLACE FUNCTION sync._log_read_lock() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    LOCK TABLE sync_lock.log_read IN ROW SHARE MODE;
END
$$;

-- New functions of the library (as pgrx declares them in pg_sync--0.2.0.sql).
CREATE FUNCTION sync._flush_log() RETURNS void
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'flush_log_wrapper';
CREATE FUNCTION sync._in_internal_ddl() RETURNS bool
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'in_internal_ddl_wrapper';
CREATE FUNCTION sync._internal_ddl("on" bool) RETURNS void
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'internal_ddl_wrapper';
CREATE FUNCTION sync._require_owner(tbl oid) RETURNS void
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'require_owner_wrapper';
CREATE FUNCTION sync.create_wal_slot() RETURNS bool
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'create_wal_slot_wrapper';
CREATE FUNCTION sync.policy_plan(tbl oid, role text) RETURNS jsonb
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'policy_plan_wrapper';
CREATE FUNCTION sync.visible(tbl oid, groups jsonb, images jsonb) RETURNS jsonb
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'visible_wrapper';

-- A SECURITY DEFINER function's search_path names pg_temp last, so that temporary tables
-- cannot stand in for catalogs.
ALTER FUNCTION sync._wal2json_usable() SET search_path = pg_catalog, pg_temp;

-- Capture runs as the writer (to_jsonb calls user-defined casts, which must not run with the
-- extension owner's rights); it needs no privilege to write the log.
ALTER FUNCTION sync.capture() SECURITY INVOKER;

-- (Re)creates the capture triggers of one tracked table from its row in sync.tracked. The
-- triggers carry the table's options as arguments (entity_code, schema_version, then the
-- allow-listed columns), so the capture never looks anything up per row; any change of
-- options recreates them. A trigger that an administrator disabled stays disabled.
CREATE OR REPLACE FUNCTION sync._install_capture(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    t sync.tracked%ROWTYPE;
    args text;
    was_disabled boolean;
    trg text;
BEGIN
    SELECT * INTO t FROM sync.tracked WHERE relid = tbl;
    SELECT bool_or(tgenabled = 'D') INTO was_disabled
      FROM pg_trigger WHERE tgrelid = tbl AND tgname IN ('sync_capture', 'sync_capture_truncate');
    -- Our own ALTER TABLE below must not count as a schema change.
    PERFORM sync._internal_ddl(true);
    PERFORM sync._drop_capture(tbl);
    IF t.capture = 'wal' THEN
        -- Old rows in full: DELETEs and UPDATEs need them for old_data, filters and ids.
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl);
    ELSIF t.capture = 'trigger' THEN
        SELECT string_agg(quote_literal(a), ', ' ORDER BY ord) INTO args
          FROM unnest(ARRAY[t.entity_code, t.schema_version::text] || coalesce(t.columns, '{}'))
               WITH ORDINALITY AS u(a, ord);
        EXECUTE format('CREATE TRIGGER sync_capture AFTER INSERT OR UPDATE OR DELETE ON %s '
                       'FOR EACH ROW EXECUTE FUNCTION sync.capture(%s)', tbl, args);
        EXECUTE format('CREATE TRIGGER sync_capture_truncate AFTER TRUNCATE ON %s '
                       'FOR EACH STATEMENT EXECUTE FUNCTION sync.capture(%s)', tbl, args);
        -- ALWAYS: restores and logical-replication appliers run with
        -- session_replication_role = replica, which skips ordinary triggers.
        FOREACH trg IN ARRAY ARRAY['sync_capture', 'sync_capture_truncate'] LOOP
            EXECUTE format('ALTER TABLE %s %s TRIGGER %I', tbl,
                           CASE WHEN was_disabled THEN 'DISABLE' ELSE 'ENABLE ALWAYS' END, trg);
        END LOOP;
    END IF;
    PERFORM sync._internal_ddl(false);
END
$$;

-- For the table's owner (checked), as the extension's owner: it writes sync.tracked, makes
-- the capture triggers and, for WAL capture, the replication slot.
CREATE OR REPLACE FUNCTION sync.track(tbl regclass, entity_code text DEFAULT NULL,
                           capture text DEFAULT 'trigger', columns text[] DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    code text;
    unknown text;
    holder regclass;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'sync.track: tbl must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM sync._require_owner(tbl);
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'sync.track: % is not a table', tbl USING ERRCODE = '42809';
    END IF;
    IF (SELECT c.relnamespace FROM pg_class c WHERE c.oid = tbl) = 'sync'::regnamespace THEN
        RAISE EXCEPTION 'sync.track: % belongs to pg_sync itself and cannot be tracked', tbl
            USING ERRCODE = '42809';
    END IF;
    IF track.capture IS NULL OR track.capture NOT IN ('trigger', 'wal') THEN
        RAISE EXCEPTION 'sync.track: capture must be ''trigger'' or ''wal'', not %',
            coalesce(quote_literal(track.capture), 'NULL') USING ERRCODE = '22023';
    END IF;
    IF track.capture = 'wal' THEN
        IF current_setting('wal_level') <> 'logical' THEN
            RAISE EXCEPTION 'sync.track: capture => ''wal'' needs wal_level = logical, not %',
                current_setting('wal_level')
                USING ERRCODE = '55000', HINT = 'Set wal_level = logical and restart PostgreSQL.';
        END IF;
        IF NOT sync._wal2json_usable() THEN
            RAISE EXCEPTION 'sync.track: capture => ''wal'' needs the wal2json output plugin'
                USING ERRCODE = '55000',
                      HINT = 'Install it (Debian: postgresql-15-wal2json) and, where the server has the '
                             'output_plugin_libraries setting, list wal2json in it.';
        END IF;
    END IF;
    code := coalesce(track.entity_code, (SELECT c.relname::text FROM pg_class c WHERE c.oid = tbl));
    IF code = '' OR length(code) > 128 THEN
        RAISE EXCEPTION 'sync.track: entity_code must have 1 to 128 characters'
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = tbl AND i.indisprimary) THEN
        RAISE EXCEPTION 'sync.track: table % has no primary key', tbl
            USING ERRCODE = '55000',
                  HINT = 'pg_sync identifies rows by their primary key; add one, then track the table.';
    END IF;
    IF track.columns IS NOT NULL THEN
        SELECT c INTO unknown FROM unnest(track.columns) AS c
         WHERE c IS NULL OR NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = tbl
                               AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'sync.track: column % does not exist in %',
                coalesce(quote_ident(unknown), 'NULL'), tbl USING ERRCODE = '42703';
        END IF;
        -- An empty list publishes what the key alone publishes: the key is kept in it, as
        -- the capture's arguments cannot tell an empty list from none (all columns).
        IF cardinality(track.columns) = 0 THEN
            track.columns := ARRAY(SELECT a.attname::text FROM pg_index i
                                     JOIN pg_attribute a ON a.attrelid = i.indrelid
                                      AND a.attnum = ANY (i.indkey::int2[])
                                    WHERE i.indrelid = tbl AND i.indisprimary ORDER BY a.attnum);
        END IF;
    END IF;
    SELECT t.relid INTO holder FROM sync.tracked t WHERE t.entity_code = code AND t.relid <> tbl;
    IF FOUND THEN
        RAISE EXCEPTION 'sync.track: entity_code % is already used by %', quote_literal(code), holder
            USING ERRCODE = '23505';
    END IF;
    IF track.capture = 'wal' THEN
        -- Before anything is written (a slot cannot be made after): from here on, no change
        -- of the table can be missed, whether or not anything ingests yet (SPEC 1.5).
        PERFORM sync.create_wal_slot();
    END IF;

    INSERT INTO sync.tracked AS t (relid, entity_code, capture, columns)
    VALUES (tbl, code, track.capture,
            -- the allow-list in column order, without duplicates
            (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
              WHERE a.attrelid = tbl AND a.attname = ANY (track.columns)))
    ON CONFLICT (relid) DO UPDATE
       SET entity_code = excluded.entity_code,
           capture = excluded.capture,
           columns = excluded.columns,
           schema_version = t.schema_version
               + CASE WHEN t.columns IS DISTINCT FROM excluded.columns THEN 1 ELSE 0 END;
    PERFORM sync._install_capture(tbl);
END
$$;

-- For the table's owner (checked), as the extension's owner.
CREATE OR REPLACE FUNCTION sync.untrack(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM sync._require_owner(tbl);
    DELETE FROM sync.tracked WHERE relid = tbl;
    IF NOT FOUND THEN
        RAISE NOTICE 'sync.untrack: % is not tracked', tbl;
        RETURN;
    END IF;
    PERFORM sync._internal_ddl(true);
    PERFORM sync._drop_capture(tbl);
    PERFORM sync._internal_ddl(false);
END
$$;

-- ALTER TABLE on a tracked table: a new schema_version, and triggers that carry it. Columns of
-- the allow-list that no longer exist leave it (with a warning); the primary key stays.
-- SECURITY DEFINER: it runs for every role's ALTER TABLE, most of which have no rights on
-- sync; it only reads the command's targets and re-installs pg_sync's own triggers.
CREATE OR REPLACE FUNCTION sync._on_alter_table() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    altered regclass;
    gone text[];
BEGIN
    IF sync._in_internal_ddl() THEN
        RETURN;
    END IF;
    FOR altered IN
        SELECT DISTINCT c.objid::regclass FROM pg_event_trigger_ddl_commands() c
          JOIN sync.tracked t ON t.relid = c.objid::regclass
         WHERE c.object_type IN ('table', 'table column') -- a RENAME COLUMN is a 'table column'
    LOOP
        IF NOT EXISTS (SELECT FROM pg_index i WHERE i.indrelid = altered AND i.indisprimary) THEN
            RAISE EXCEPTION 'pg_sync: % is tracked and needs its primary key', altered
                USING ERRCODE = '55000', HINT = 'Run sync.untrack first.';
        END IF;
        SELECT array_agg(c) INTO gone FROM sync.tracked t, unnest(t.columns) AS c
         WHERE t.relid = altered
           AND NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = altered
                              AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped);
        IF gone IS NOT NULL THEN
            RAISE WARNING 'pg_sync: columns % of % left its published columns', gone, altered;
        END IF;
        -- Never left empty: an empty list publishes what the key alone publishes.
        UPDATE sync.tracked t
           SET schema_version = t.schema_version + 1,
               columns = CASE WHEN gone IS NULL THEN t.columns
                              ELSE coalesce(nullif(ARRAY(SELECT c FROM unnest(t.columns) AS c
                                                          WHERE c <> ALL (gone)), '{}'),
                                            ARRAY(SELECT a.attname::text FROM pg_index i
                                                   JOIN pg_attribute a ON a.attrelid = i.indrelid
                                                    AND a.attnum = ANY (i.indkey::int2[])
                                                  WHERE i.indrelid = altered AND i.indisprimary
                                                  ORDER BY a.attnum)) END
         WHERE t.relid = altered;
        PERFORM sync._install_capture(altered);
    END LOOP;
END
$$;

-- DROP TABLE of a tracked table ends its tracking; its history stays. SECURITY DEFINER, as
-- _on_alter_table: every role's DROP runs it.
CREATE OR REPLACE FUNCTION sync._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM sync.tracked
     WHERE relid::oid IN (SELECT objid FROM pg_event_trigger_dropped_objects()
                           WHERE object_type = 'table');
END
$$;

-- Policies, grants and tables changed: the gateway re-reads how it judges row-level
-- security (sync.policy_plan) before routing the next page of changes. SECURITY DEFINER, as
-- the other event triggers: every role's GRANT runs it.
CREATE OR REPLACE FUNCTION sync._on_access_change() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE sync.state SET policy_version = policy_version + 1;
END
$$;

CREATE EVENT TRIGGER sync_access_change ON ddl_command_end
    WHEN TAG IN ('CREATE POLICY', 'ALTER POLICY', 'DROP POLICY', 'GRANT', 'REVOKE', 'ALTER TABLE')
    EXECUTE FUNCTION sync._on_access_change();
ALTER EVENT TRIGGER sync_access_change ENABLE ALWAYS;

-- Removes the changes older than `keep` and moves the retention horizon past them. Only whole
-- transactions that every snapshot already sees are removed. SECURITY DEFINER: for the
-- administrators granted EXECUTE, who need no rights on the log itself.
CREATE OR REPLACE FUNCTION sync.prune(keep interval DEFAULT '7 days') RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    new_horizon xid8;
    removed bigint;
BEGIN
    IF keep IS NULL OR keep < interval '0' THEN
        RAISE EXCEPTION 'sync.prune: keep must be a positive interval' USING ERRCODE = '22023';
    END IF;
    LOCK TABLE sync_lock.log_read IN EXCLUSIVE MODE;
    -- A retried write older than the retained log is no longer recognised either.
    DELETE FROM sync.applied_mutation m WHERE m.applied_at < now() - keep;
    -- Below the oldest transaction still running, and below every change younger than keep.
    SELECT least(pg_snapshot_xmin(pg_current_snapshot()),
                 (SELECT min(h.txid) FROM sync.change_history h WHERE h.captured_at >= now() - keep))
      INTO new_horizon;
    IF new_horizon <= (SELECT s.horizon FROM sync.state s) THEN
        RETURN 0;
    END IF;
    DELETE FROM sync.change_history h WHERE h.txid < new_horizon;
    GET DIAGNOSTICS removed = ROW_COUNT;
    UPDATE sync.state SET horizon = new_horizon;
    RETURN removed;
END
$$;

-- Records that `user_id` applies mutation `id` in this transaction; false when it was
-- applied before. The gateway calls it in the writing transaction before it takes on the
-- user's role. SECURITY DEFINER so that the authenticator (below) needs no right on
-- sync.applied_mutation; it runs no code a caller can define.
CREATE OR REPLACE FUNCTION sync.claim_mutation(user_id text, id text) RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH claimed AS (INSERT INTO sync.applied_mutation (user_id, id) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING RETURNING 1)
    SELECT EXISTS (SELECT FROM claimed)
$$;

-- What a gateway's login role needs, and nothing that bypasses row-level security: reading
-- the log and the tracked tables, keeping its subscriptions and heartbeat, claiming mutation
-- ids and tagging writes, ingesting the WAL (which runs as the extension's owner).
CREATE OR REPLACE FUNCTION sync.grant_gateway(gateway regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    f regprocedure;
BEGIN
    IF gateway IS NULL THEN
        RAISE EXCEPTION 'sync.grant_gateway: gateway must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF (SELECT r.rolsuper OR r.rolbypassrls FROM pg_roles r WHERE r.oid = gateway) THEN
        RAISE WARNING 'pg_sync: % is a superuser or bypasses row-level security; the gateway refuses to run as it', gateway;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA sync TO %s', gateway);
    EXECUTE format('GRANT USAGE ON TYPE sync.change TO %s', gateway);
    EXECUTE format('GRANT SELECT ON sync.change_history, sync.state, sync.tracked TO %s', gateway);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON sync.subscription, sync.gateway TO %s', gateway);
    EXECUTE format('GRANT SELECT, INSERT ON sync.applied_mutation TO %s', gateway);
    FOREACH f IN ARRAY ARRAY[
        'sync.current_cursor()', 'sync.changes_since(text, integer, text)',
        'sync._changes_page(text, integer, text)', 'sync._cursor_problem(text)',
        'sync._log_read_lock()', 'sync.cursor_reached(text, text)',
        'sync.ingest_wal(integer)', 'sync._wal_settled(text)', 'sync.status()',
        'sync._wakeup_mode()', 'sync.claim_mutation(text, text)', 'sync.tag_origin(text)',
        'sync.policy_plan(oid, text)', 'sync.visible(oid, jsonb, jsonb)'
    ]::regprocedure[] LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, gateway);
    END LOOP;
END
$$;

-- The gateway's authenticator: the login its users' queries run on (snapshots, writes) before
-- and under their role. Code of a table's owner runs in those sessions and can RESET ROLE back
-- to it, so it may do only what is harmless to expose: read the current cursor, wait for WAL
-- ingestion, claim mutation ids and tag origins. It reads nothing of the log.
CREATE OR REPLACE FUNCTION sync.grant_authenticator(authenticator regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog AS $$
DECLARE
    f regprocedure;
BEGIN
    IF authenticator IS NULL THEN
        RAISE EXCEPTION 'sync.grant_authenticator: authenticator must not be NULL' USING ERRCODE = '22004';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA sync TO %s', authenticator);
    FOREACH f IN ARRAY ARRAY[
        'sync.current_cursor()', 'sync._wal_settled(text)', 'sync.claim_mutation(text, text)',
        'sync.tag_origin(text)'
    ]::regprocedure[] LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, authenticator);
    END LOOP;
END
$$;

-- Nothing of pg_sync's is anyone's by default (SPEC 1.9): the grants above, and those the
-- README lists for writers and administrators, are the only way in. Capture needs none.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA sync FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA sync FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA sync FROM PUBLIC;
REVOKE ALL ON TYPE sync.change FROM PUBLIC;
-- Deparsed policies are planned again in sync.visible: both under one search_path, so that
-- every name they hold resolves to what it named in the policy.
ALTER FUNCTION sync.visible(oid, jsonb, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION sync.create_wal_slot() SECURITY DEFINER;
ALTER FUNCTION sync.create_wal_slot() SET search_path = pg_catalog, pg_temp;
-- current_cursor reads sync.state, which the authenticator may not.
ALTER FUNCTION sync.current_cursor() SECURITY DEFINER;
ALTER FUNCTION sync.current_cursor() SET search_path = pg_catalog, pg_temp;
