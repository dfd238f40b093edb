-- pg_sync 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_sync UPDATE), written by hand; the function
-- definitions are api.sql's, verbatim, and the upgrade test checks that the result equals a
-- fresh install of 0.3.0, object by object.
--
-- Before: install the 0.3.0 files and restart PostgreSQL (with pg_sync preloaded, every backend
-- runs the library the postmaster loaded). Until this script runs, capture writes the 0.2.0
-- log; the gateway of 0.3.0 needs this script first.
--
-- What changes (README "Upgrading"):
-- - Each tracked table has a tracking number, the entity's identity in the log, and each log
--   row the tracking that wrote it: history of an untracked or replaced table is never
--   delivered as another table's under a reused entity code. The rows already in the log get
--   the number of the table now tracked under their entity code and table name; rows of
--   tables no longer tracked keep none, and are never delivered again.
-- - Who may read each tracked table is noted as a digest (sync._note_access, by the event
--   triggers and by gateways for what no event trigger sees); a changed digest writes an ACCESS
--   row into the log, so that every reader meets the change in the log's order (instead of a
--   counter in sync.state that any role's open DDL could hold locked).
-- - Pages of the log say where each transaction ends (tx_end).
-- - The primary marks the log (sync.tick()) so that hot standbys can say exact cursors.
-- - Every function of sync searches pg_catalog, then pg_temp, and names catalogs qualified.

-- The event trigger of access changes goes first: its old body bumps a column dropped below
-- (it comes back at the end).
DROP EVENT TRIGGER sync_access_change;

-- The log stops while it is rewritten: writers of 0.2.0 finish first, new ones wait.
LOCK TABLE sync.change_history IN ACCESS EXCLUSIVE MODE;
LOCK TABLE sync.tracked IN ACCESS EXCLUSIVE MODE;

CREATE SEQUENCE sync.tracking_seq;
SELECT pg_catalog.pg_extension_config_dump('sync.tracking_seq', '');
ALTER TABLE sync.tracked
    ADD COLUMN tracking bigint NOT NULL DEFAULT pg_catalog.nextval('sync.tracking_seq') UNIQUE;
ALTER TABLE sync.change_history ADD COLUMN tracking bigint;
UPDATE sync.change_history h SET tracking = t.tracking
  FROM sync.tracked t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE h.entity_code = t.entity_code AND h.table_name = n.nspname || '.' || c.relname;

ALTER TABLE sync.state DROP COLUMN policy_version;
CREATE TABLE sync.access_event (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    entity_code text,
    kind        text,
    digest      text
);
CREATE INDEX access_event_entity ON sync.access_event (entity_code, kind, id);

-- Marks of the log made on the primary, the anchors of cursors read on hot standbys.
CREATE TABLE sync.tick (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cursor  text NOT NULL,
    made_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE sync_lock.tick ();

-- A change as sync.changes_since returns it gains the tracking and the transaction's end.
ALTER TYPE sync.change ADD ATTRIBUTE tracking bigint, ADD ATTRIBUTE tx_end boolean;
-- The page function returns whether each change ends its transaction (as pgrx declares it
-- in pg_sync--0.3.0.sql).
DROP FUNCTION sync._changes_page(text, integer, text);
CREATE FUNCTION sync._changes_page("cursor" text, "max_rows" int, "until" text)
RETURNS TABLE ("change_id" bigint, "cursor" text, "tx_end" bool)
    VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'changes_page_wrapper';

-- The ACCESS rows of the log (as pgrx declares the function in pg_sync--0.3.0.sql).
CREATE FUNCTION sync._log_access("tbl" oid) RETURNS void
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'log_access_wrapper';
-- The trigger on tables that policies read (as pgrx declares it in pg_sync--0.3.0.sql).
CREATE FUNCTION sync."_policy_input"() RETURNS TRIGGER
    LANGUAGE c AS 'MODULE_PATHNAME', '_policy_input_wrapper';
-- A membership table's rows, for a compiled membership policy (as pgrx declares it in
-- pg_sync--0.3.0.sql).
CREATE FUNCTION sync."members"("role" text, "member" jsonb, "keys" text[], "wanted" jsonb) RETURNS jsonb
    STRICT VOLATILE PARALLEL UNSAFE LANGUAGE c AS 'MODULE_PATHNAME', 'members_wrapper';




-- (Re)creates the capture triggers of one tracked table from its row in sync.tracked. The
-- triggers carry the table's options as arguments (entity_code, `schema_version@tracking`,
-- then the allow-listed columns), so the capture never looks anything up per row; any
-- change of options recreates them. A trigger that an administrator disabled stays
-- disabled.
CREATE OR REPLACE FUNCTION sync._install_capture(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t sync.tracked%ROWTYPE;
    args text;
    was_disabled boolean;
    trg text;
BEGIN
    SELECT * INTO t FROM sync.tracked WHERE relid = tbl;
    SELECT bool_or(tgenabled = 'D') INTO was_disabled
      FROM pg_catalog.pg_trigger WHERE tgrelid = tbl AND tgname IN ('sync_capture', 'sync_capture_truncate');
    -- Our own ALTER TABLE below must not count as a schema change.
    PERFORM sync._internal_ddl(true);
    PERFORM sync._drop_capture(tbl);
    IF t.capture = 'wal' THEN
        -- Old rows in full: DELETEs and UPDATEs need them for old_data, filters and ids.
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl);
    ELSIF t.capture = 'trigger' THEN
        SELECT string_agg(quote_literal(a), ', ' ORDER BY ord) INTO args
          FROM unnest(ARRAY[t.entity_code, t.schema_version || '@' || t.tracking]
                       || coalesce(t.columns, '{}'))
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

CREATE OR REPLACE FUNCTION sync._drop_capture(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trg name;
BEGIN
    FOR trg IN SELECT tgname FROM pg_catalog.pg_trigger
                WHERE tgrelid = tbl AND tgname IN ('sync_capture', 'sync_capture_truncate') LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', trg, tbl);
    END LOOP;
END
$$;

-- Whether wal2json is installed and allowed as an output plugin. SECURITY DEFINER: reading
-- the library directory needs privileges the caller may lack.
CREATE OR REPLACE FUNCTION sync._wal2json_usable() RETURNS boolean
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT (SELECT (pg_stat_file(setting || '/wal2json.so', true)).size IS NOT NULL
              FROM pg_catalog.pg_config WHERE name = 'PKGLIBDIR')
       AND coalesce(current_setting('output_plugin_libraries', true) ~ '(^|[ ,])wal2json($|[ ,])', true)
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
    IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = tbl) NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'sync.track: % is not a table', tbl USING ERRCODE = '42809';
    END IF;
    IF (SELECT c.relnamespace FROM pg_catalog.pg_class c WHERE c.oid = tbl) = 'sync'::regnamespace THEN
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
    code := coalesce(track.entity_code, (SELECT c.relname::text FROM pg_catalog.pg_class c WHERE c.oid = tbl));
    IF code = '' OR length(code) > 128 THEN
        RAISE EXCEPTION 'sync.track: entity_code must have 1 to 128 characters'
            USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = tbl AND i.indisprimary) THEN
        RAISE EXCEPTION 'sync.track: table % has no primary key', tbl
            USING ERRCODE = '55000',
                  HINT = 'pg_sync identifies rows by their primary key; add one, then track the table.';
    END IF;
    IF track.columns IS NOT NULL THEN
        SELECT c INTO unknown FROM unnest(track.columns) AS c
         WHERE c IS NULL OR NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid = tbl
                               AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'sync.track: column % does not exist in %',
                coalesce(quote_ident(unknown), 'NULL'), tbl USING ERRCODE = '42703';
        END IF;
        -- An empty list publishes what the key alone publishes: the key is kept in it, as
        -- the capture's arguments cannot tell an empty list from none (all columns).
        IF cardinality(track.columns) = 0 THEN
            track.columns := ARRAY(SELECT a.attname::text FROM pg_catalog.pg_index i
                                     JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid
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
            (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = tbl AND a.attname = ANY (track.columns)))
    ON CONFLICT (relid) DO UPDATE
       SET entity_code = excluded.entity_code,
           capture = excluded.capture,
           columns = excluded.columns,
           schema_version = t.schema_version
               + CASE WHEN t.columns IS DISTINCT FROM excluded.columns THEN 1 ELSE 0 END;
    PERFORM sync._install_capture(tbl);
    -- Re-configured (another allow-list): its subscribers refetch.
    PERFORM sync._note_access();
END
$$;

-- For the table's owner (checked), as the extension's owner.
CREATE OR REPLACE FUNCTION sync.untrack(tbl regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    code text;
BEGIN
    PERFORM sync._require_owner(tbl);
    DELETE FROM sync.tracked WHERE relid = tbl RETURNING entity_code INTO code;
    IF NOT FOUND THEN
        RAISE NOTICE 'sync.untrack: % is not tracked', tbl;
        RETURN;
    END IF;
    -- Gateways read the catalog again (its subscribers refetch: the entity is gone).
    INSERT INTO sync.access_event (entity_code, kind) VALUES (code, 'untracked');
    PERFORM sync._internal_ddl(true);
    PERFORM sync._drop_capture(tbl);
    PERFORM sync._internal_ddl(false);
    -- The tables its policies read are watched for the others only (the triggers' arguments
    -- move, and with them the others' digests).
    PERFORM sync._note_access();
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
        SELECT DISTINCT c.objid::regclass FROM pg_catalog.pg_event_trigger_ddl_commands() c
          JOIN sync.tracked t ON t.relid = c.objid::regclass
         WHERE c.object_type IN ('table', 'table column') -- a RENAME COLUMN is a 'table column'
    LOOP
        IF NOT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = altered AND i.indisprimary) THEN
            RAISE EXCEPTION 'pg_sync: % is tracked and needs its primary key', altered
                USING ERRCODE = '55000', HINT = 'Run sync.untrack first.';
        END IF;
        SELECT array_agg(c) INTO gone FROM sync.tracked t, unnest(t.columns) AS c
         WHERE t.relid = altered
           AND NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid = altered
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
                                            ARRAY(SELECT a.attname::text FROM pg_catalog.pg_index i
                                                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid
                                                    AND a.attnum = ANY (i.indkey::int2[])
                                                  WHERE i.indrelid = altered AND i.indisprimary
                                                  ORDER BY a.attnum)) END
         WHERE t.relid = altered;
        PERFORM sync._install_capture(altered);
    END LOOP;
    -- A new schema version (and perhaps row-level security switched): noted after the bump.
    PERFORM sync._note_access();
END
$$;

-- DROP TABLE of a tracked table ends its tracking; its history stays. A dropped policy
-- changes who may read its table. SECURITY DEFINER, as _on_alter_table: every role's DROP
-- runs it.
CREATE OR REPLACE FUNCTION sync._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    WITH gone AS (
        DELETE FROM sync.tracked
         WHERE relid::oid IN (SELECT objid FROM pg_catalog.pg_event_trigger_dropped_objects()
                               WHERE object_type = 'table')
        RETURNING entity_code)
    INSERT INTO sync.access_event (entity_code, kind) SELECT g.entity_code, 'untracked' FROM gone g;
    PERFORM sync._note_access();
END
$$;

-- The tracked entities as readers need them: the gateway's catalog and the WAL path read
-- them here, from one query. `columns` is the allow-list as tracked (NULL: every column),
-- `published` the columns that reach the log (the key included), `key_columns` and
-- `key_types` the primary key in key order.
CREATE OR REPLACE FUNCTION sync.entities()
RETURNS TABLE (entity_code text, relid oid, schema_name text, table_name text, capture text,
               schema_version integer, tracking bigint, columns text[], published text[],
               key_columns text[], key_types text[], rls boolean, owner oid)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT t.entity_code, t.relid::oid, n.nspname::text, c.relname::text, t.capture,
       t.schema_version, t.tracking, t.columns,
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = t.relid AND a.attnum > 0 AND NOT a.attisdropped
                AND (t.columns IS NULL OR a.attname = ANY (t.columns) OR a.attnum = ANY (k.indkey::int2[]))
              ORDER BY a.attnum),
       ARRAY(SELECT a.attname::text FROM pg_catalog.unnest(k.indkey::int2[]) WITH ORDINALITY u(attnum, o)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = t.relid AND a.attnum = u.attnum
              ORDER BY u.o),
       ARRAY(SELECT pg_catalog.format_type(a.atttypid, a.atttypmod)
               FROM pg_catalog.unnest(k.indkey::int2[]) WITH ORDINALITY u(attnum, o)
               JOIN pg_catalog.pg_attribute a ON a.attrelid = t.relid AND a.attnum = u.attnum
              ORDER BY u.o),
       c.relrowsecurity, c.relowner
  FROM sync.tracked t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_index k ON k.indrelid = t.relid AND k.indisprimary
$$;

-- The tables inheriting from `parent`, at any depth: a policy reading `parent` reads their
-- rows too.
CREATE OR REPLACE FUNCTION sync._heirs(parent oid) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH RECURSIVE heirs(oid) AS (
    SELECT h.inhrelid FROM pg_catalog.pg_inherits h WHERE h.inhparent = parent
    UNION
    SELECT h.inhrelid FROM heirs JOIN pg_catalog.pg_inherits h ON h.inhparent = heirs.oid)
SELECT heirs.oid FROM heirs
$$;

-- What of who may read `tbl` the table itself decides: its tracking and published columns,
-- owner, table, column and schema privileges, row-level security enabled or forced, its
-- policies, and the tables they read (their privileges, security, columns and watch).
CREATE OR REPLACE FUNCTION sync._table_access(tbl regclass) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT pg_catalog.md5(pg_catalog.concat_ws(',',
           t.tracking, t.schema_version, t.capture, t.columns,
           c.relowner, c.relacl, c.relrowsecurity, c.relforcerowsecurity, n.oid, n.nspowner, n.nspacl,
           (SELECT pg_catalog.string_agg(a.attnum || ':' || a.attacl::text, ';' ORDER BY a.attnum)
              FROM pg_catalog.pg_attribute a WHERE a.attrelid = t.relid AND a.attacl IS NOT NULL),
           (SELECT pg_catalog.string_agg(pg_catalog.concat_ws(':', p.oid, p.polcmd, p.polpermissive,
                                                              p.polroles, p.polqual::text), ';' ORDER BY p.oid)
              FROM pg_catalog.pg_policy p WHERE p.polrelid = t.relid),
           -- The tables its policies read and the tables inheriting from them (their rows
           -- are read too): who may read them, their columns (a policy names
           -- them by number; a compiled one by name too), and pg_sync's triggers on them:
           -- enabled, and what they name (sync._watch_policy_inputs; a trigger replaced late,
           -- after a lock wait, may let a policy compile that did not).
           (SELECT pg_catalog.string_agg(pg_catalog.concat_ws(':', i.oid, i.relacl, i.relrowsecurity,
                       i.relforcerowsecurity,
                       (SELECT pg_catalog.string_agg(a.attnum || '=' || a.attname || '/' || coalesce(a.attacl::text, ''),
                                                     ';' ORDER BY a.attnum)
                          FROM pg_catalog.pg_attribute a
                         WHERE a.attrelid = i.oid AND a.attnum > 0 AND NOT a.attisdropped),
                       (SELECT pg_catalog.string_agg(g.tgenabled::text || pg_catalog.encode(g.tgargs, 'hex'),
                                                     ';' ORDER BY g.oid)
                          FROM pg_catalog.pg_trigger g
                          JOIN pg_catalog.pg_proc f ON f.oid = g.tgfoid
                         WHERE g.tgrelid = i.oid AND f.proname = '_policy_input'
                           AND f.pronamespace = 'sync'::pg_catalog.regnamespace)), ';' ORDER BY i.oid)
              FROM pg_catalog.pg_class i
             WHERE i.relpersistence <> 't'
               AND i.oid IN (SELECT x.oid FROM pg_catalog.pg_policy p
                               JOIN pg_catalog.pg_depend d
                                 ON d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND d.objid = p.oid
                                AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
                              CROSS JOIN LATERAL (SELECT d.refobjid UNION SELECT sync._heirs(d.refobjid)) x(oid)
                              WHERE p.polrelid = t.relid AND d.refobjid <> t.relid))))
  FROM sync.tracked t
  JOIN pg_catalog.pg_class c ON c.oid = t.relid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE t.relid = tbl
$$;

-- What of who may read `tbl` depends on the roles a gateway acts as (`roles`): each role's
-- SUPERUSER, BYPASSRLS and INHERIT, and which of the roles the table names (its owner, the
-- grantees of the table, its columns and its schema, its policies' roles) it has the
-- privileges of. Not who else is a member of those: granting a role to a new login changes
-- nothing here.
CREATE OR REPLACE FUNCTION sync._role_access(tbl regclass, roles text[]) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
WITH named AS (
        SELECT c.relowner AS g FROM pg_catalog.pg_class c WHERE c.oid = tbl
    UNION SELECT (pg_catalog.aclexplode(c.relacl)).grantee FROM pg_catalog.pg_class c WHERE c.oid = tbl
    UNION SELECT (pg_catalog.aclexplode(a.attacl)).grantee FROM pg_catalog.pg_attribute a
           WHERE a.attrelid = tbl AND a.attacl IS NOT NULL
    UNION SELECT (pg_catalog.aclexplode(n.nspacl)).grantee FROM pg_catalog.pg_class c
            JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl
    UNION SELECT pg_catalog.unnest(p.polroles) FROM pg_catalog.pg_policy p WHERE p.polrelid = tbl)
SELECT pg_catalog.md5(pg_catalog.string_agg(
           r.rolname || ':' || r.rolsuper || r.rolbypassrls || r.rolinherit || ':'
           || coalesce((SELECT pg_catalog.string_agg(named.g::text, ',' ORDER BY named.g) FROM named
                         WHERE named.g <> 0 AND pg_catalog.pg_has_role(r.oid, named.g, 'USAGE')), ''),
           ';' ORDER BY r.rolname))
  FROM pg_catalog.pg_roles r WHERE r.rolname = ANY (roles)
$$;

-- Who may read what, summarised for a gateway acting as `roles`: each tracked entity's table
-- and role digests, as one digest, read in the caller's snapshot. The gateway reads them
-- again when a page shows a newer sync.access_event than its catalog was read with, and at
-- every poll (for what no event trigger sees: ALTER ROLE, GRANT of a role, REASSIGN OWNED),
-- and rebuilds what it judges with (catalog, policy plans) when any moved. An entity's digest
-- is also part of its pages' audience: a change of another table's access leaves it alone.
CREATE OR REPLACE FUNCTION sync.access_digests(roles text[])
RETURNS TABLE (entity_code text, digest text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT t.entity_code,
       pg_catalog.md5(coalesce(sync._table_access(t.relid), '') || '/' || coalesce(sync._role_access(t.relid, roles), ''))
  FROM sync.tracked t
$$;

-- The newest row of sync.access_event visible to the caller (0: none).
CREATE OR REPLACE FUNCTION sync.access_serial() RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT coalesce(max(e.id), 0) FROM sync.access_event e
$$;

-- Notes who may read each tracked table now: the table's own digest (`roles` NULL: the event
-- triggers, track), or the digest of what depends on `roles` (a gateway, when its access
-- fingerprint moved). An entity whose digest of that kind differs from the one noted last
-- gets a row of sync.access_event and an ACCESS row in the log: its subscribers refetch,
-- wherever they read the log. The first digest of a kind is only noted. A table's digest
-- includes pg_sync's triggers on the tables its policies read, so they are put right first
-- (else the digest moves again at the next command); nothing is noted during pg_sync's own
-- DDL, which the event triggers see too. Returns the entities whose access changed. SECURITY
-- DEFINER: it writes pg_sync's tables for any role's DDL and for the gateway; it runs no code
-- a caller can define.
CREATE OR REPLACE FUNCTION sync._note_access(roles text[] DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t record;
    noted_kind text := CASE WHEN roles IS NULL THEN 'table'
                            ELSE 'roles:' || pg_catalog.md5(pg_catalog.array_to_string(
                                     ARRAY(SELECT r FROM pg_catalog.unnest(roles) r ORDER BY r), ',')) END;
    digest text;
    last record;
    noted_before boolean;
    changed integer := 0;
BEGIN
    IF sync._in_internal_ddl() THEN
        RETURN 0; -- pg_sync's own DDL (its event triggers): the caller notes access when done
    END IF;
    IF roles IS NULL THEN
        PERFORM sync._watch_policy_inputs();
    END IF;
    FOR t IN SELECT k.relid, k.entity_code FROM sync.tracked k ORDER BY k.entity_code LOOP
        digest := CASE WHEN roles IS NULL THEN sync._table_access(t.relid)
                       ELSE sync._role_access(t.relid, roles) END;
        SELECT e.digest INTO last FROM sync.access_event e
         WHERE e.entity_code = t.entity_code AND e.kind = noted_kind
         ORDER BY e.id DESC LIMIT 1;
        noted_before := FOUND;
        CONTINUE WHEN noted_before AND last.digest IS NOT DISTINCT FROM digest;
        INSERT INTO sync.access_event (entity_code, kind, digest)
        VALUES (t.entity_code, noted_kind, digest);
        IF noted_before THEN
            PERFORM sync._log_access(t.relid);
            changed := changed + 1;
        END IF;
    END LOOP;
    IF changed > 0 THEN
        PERFORM pg_catalog.pg_notify('sync_changes', 'access');
    END IF;
    RETURN changed;
END
$$;

-- Rows enter and leave a user's sight without changing themselves when a table that a policy
-- reads changes (a membership table in `EXISTS (SELECT 1 FROM member m WHERE ...)`). Each such
-- table gets two triggers of sync._policy_input, one per row (INSERT, UPDATE, DELETE) and one
-- at TRUNCATE, whose arguments name the tracked tables whose policies read it; a statement
-- that changes rows of it (or truncates it) then puts an ACCESS row of each into the log, once
-- (their subscribers refetch at that point), and one that changes none, nothing. The tables read are PostgreSQL's own dependencies of
-- each policy (pg_depend): one read through a function or a view is not seen, nor a policy
-- reading its own table. A table is watched only when the tracked table's owner owns it or
-- may create triggers on it, so that no one can have pg_sync put a trigger on a table they
-- could not. The trigger is found by its function, whatever it is named, and made under a
-- name no one can take first. Called whenever who may read what is noted again (policies,
-- tables, tracking changed); it touches a table only when its trigger's arguments differ, and
-- waits at most 1 s for a table's lock (then warns; a later command catches up).
CREATE OR REPLACE FUNCTION sync._watch_policy_inputs() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w record;
    name name;
    args text;
    waited text := pg_catalog.current_setting('lock_timeout');
BEGIN
    FOR w IN
        -- Per watched table: the tracked tables whose policies read it, and the first
        -- argument, naming the table and the columns the policies read (PostgreSQL records a
        -- policy's dependency on each column its quals read, and on the table alone when
        -- they read no column of it: then no column is named; nor for a table inheriting from
        -- another, whose rows a policy reading the parent reads too, where the gateway would
        -- look for the parent's).
        WITH reads AS (
            SELECT d.refobjid AS input, d.refobjsubid AS attnum, p.polrelid::oid AS relid,
                   tc.relowner AS owner,
                   NOT c.relispartition AND EXISTS (SELECT FROM pg_catalog.pg_inherits h
                                                     WHERE h.inhrelid = c.oid) AS inherits
              FROM sync.tracked t
              JOIN pg_catalog.pg_class tc ON tc.oid = t.relid
              JOIN pg_catalog.pg_policy p ON p.polrelid = t.relid
              JOIN pg_catalog.pg_depend d
                ON d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND d.objid = p.oid
               AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.refobjid <> p.polrelid
              JOIN pg_catalog.pg_class c ON c.oid = d.refobjid
             WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
               AND (pg_catalog.pg_has_role(tc.relowner, c.relowner, 'USAGE')
                    OR pg_catalog.has_table_privilege(tc.relowner, c.oid, 'TRIGGER'))),
        -- Each table to watch, and a reading of it: its own, or an input's it inherits from,
        -- under the same condition on its owner (the policy reads an heir's rows with the
        -- input's, but a write of one fires its own row triggers, not the input's; PostgreSQL
        -- copies a partitioned table's onto its partitions, not these).
        watch AS (
            SELECT r.input AS watched, r.* FROM reads r
            UNION ALL
            SELECT s.heir, r.* FROM reads r
             CROSS JOIN LATERAL sync._heirs(r.input) s(heir)
              JOIN pg_catalog.pg_class c ON c.oid = s.heir
             WHERE c.relkind = 'r' AND NOT c.relispartition AND c.relpersistence <> 't'
               AND (pg_catalog.pg_has_role(r.owner, c.relowner, 'USAGE')
                    OR pg_catalog.has_table_privilege(r.owner, c.oid, 'TRIGGER'))),
        -- Its trigger's arguments: the input its rows are read as (itself when it is read
        -- as more than one) and the columns read of it (by name, an heir having them too).
        wanted AS (
            SELECT x.watched AS input,
                   pg_catalog.array_prepend(
                       pg_catalog.json_build_object(
                           'input', CASE WHEN pg_catalog.count(DISTINCT x.input) = 1
                                         THEN pg_catalog.min(x.input::pg_catalog.int8)
                                         ELSE x.watched::pg_catalog.int8 END,
                           'columns', CASE WHEN pg_catalog.bool_or(x.attnum <= 0)
                                                  OR pg_catalog.bool_or(x.inherits)
                                                  OR pg_catalog.count(DISTINCT x.input) > 1 THEN NULL
                                           ELSE pg_catalog.array_agg(DISTINCT a.attname::text) END)::text,
                       pg_catalog.array_agg(DISTINCT x.relid::text)) AS args
              FROM watch x
              LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = x.input AND a.attnum = x.attnum
             GROUP BY x.watched),
        -- Each trigger as its type (29: AFTER INSERT OR UPDATE OR DELETE FOR EACH ROW; 32:
        -- AFTER TRUNCATE FOR EACH STATEMENT) and its arguments.
        present AS (
            SELECT g.tgrelid AS input, pg_catalog.array_agg(g.tgname) AS tgnames,
                   pg_catalog.array_agg(g.tgtype::int || ':' || pg_catalog.encode(g.tgargs, 'hex')
                                        ORDER BY g.tgtype) AS triggers
              FROM pg_catalog.pg_trigger g
             WHERE g.tgfoid = 'sync._policy_input()'::pg_catalog.regprocedure
               AND g.tgparentid = 0 -- not the copies a partitioned table's row trigger makes
             GROUP BY g.tgrelid)
        SELECT coalesce(wanted.input, present.input)::regclass AS input, wanted.args,
               present.tgnames
          FROM wanted FULL JOIN present ON present.input = wanted.input
         WHERE present.triggers IS DISTINCT FROM
               (SELECT ARRAY['29:' || a.hex, '32:' || a.hex]
                  FROM (SELECT pg_catalog.string_agg(
                                   pg_catalog.encode(pg_catalog.convert_to(r, 'UTF8'), 'hex') || '00',
                                   '' ORDER BY o) AS hex
                          FROM pg_catalog.unnest(wanted.args) WITH ORDINALITY u(r, o)) a)
    LOOP
        BEGIN
            -- (A subtransaction: the DDL below is pg_sync's own in it too.)
            PERFORM sync._internal_ddl(true);
            PERFORM pg_catalog.set_config('lock_timeout', '1s', true);
            FOR name IN SELECT pg_catalog.unnest(w.tgnames) LOOP
                EXECUTE format('DROP TRIGGER %I ON %s', name, w.input);
            END LOOP;
            IF w.args IS NOT NULL THEN
                args := (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(r), ', ' ORDER BY o)
                           FROM pg_catalog.unnest(w.args) WITH ORDINALITY u(r, o));
                EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE OR DELETE ON %s '
                               'FOR EACH ROW EXECUTE FUNCTION sync._policy_input(%s)',
                               'sync_policy_input_' || pg_catalog.md5(pg_catalog.random()::text), w.input, args);
                EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s '
                               'FOR EACH STATEMENT EXECUTE FUNCTION sync._policy_input(%s)',
                               'sync_policy_input_' || pg_catalog.md5(pg_catalog.random()::text), w.input, args);
                FOR name IN SELECT g.tgname FROM pg_catalog.pg_trigger g
                             WHERE g.tgrelid = w.input AND g.tgparentid = 0
                               AND g.tgfoid = 'sync._policy_input()'::pg_catalog.regprocedure LOOP
                    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER %I', w.input, name);
                END LOOP;
            END IF;
            PERFORM sync._internal_ddl(false);
            PERFORM pg_catalog.set_config('lock_timeout', waited, true);
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'pg_sync: % is locked: the trigger that tells subscribers of its changes is updated by a later command', w.input;
        END;
    END LOOP;
END
$$;

-- Policies, grants, owners and tables changed: who may read each tracked table is noted
-- again (sync._note_access). SECURITY DEFINER, as the other event triggers: every role's
-- GRANT runs it. An entity's noted digest changes only by commands of roles with rights on
-- its table; another role's open transaction holds nothing anyone waits for. A new table
-- matters only when it inherits (a policy reading its parent reads its rows: it is watched
-- as the parent is, and the parent's readers' digests move), also made by CREATE SCHEMA;
-- the others pass at once.
CREATE OR REPLACE FUNCTION sync._on_access_change() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TAG IN ('CREATE TABLE', 'CREATE SCHEMA') AND NOT EXISTS (
            SELECT FROM pg_catalog.pg_event_trigger_ddl_commands() c
              JOIN pg_catalog.pg_inherits h ON h.inhrelid = c.objid) THEN
        RETURN;
    END IF;
    PERFORM sync._note_access();
END
$$;

-- Readers of the log take sync_lock.log_read shared (schema.sql), for their transaction.
CREATE OR REPLACE FUNCTION sync._log_read_lock() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    LOCK TABLE sync_lock.log_read IN ROW SHARE MODE;
END
$$;

-- `until` (a cursor from sync.current_cursor()) ends the read there instead of at the current
-- snapshot: a gateway replays a client's gap up to where its live stream stands.
CREATE OR REPLACE FUNCTION sync.changes_since(cursor text, max_rows integer DEFAULT 1000, until text DEFAULT NULL)
RETURNS SETOF sync.change
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    problem text;
BEGIN
    PERFORM sync._log_read_lock();
    problem := sync._cursor_problem(changes_since.cursor);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'cursor expired: %', problem
            USING ERRCODE = 'SY410', HINT = 'Refetch a snapshot and continue from its cursor.';
    END IF;
    -- EXECUTE: planned for each call. A cached generic plan made while the log was small
    -- stayed in use as the log grew, and a reader draining a
    -- backlog read 9k changes/s instead of 70k.
    RETURN QUERY EXECUTE
        'SELECT h.id, h.table_name, h.entity_code, h.op, h.entity_id, h.data, h.old_data,
                h.changed_columns, h.client_id, h.txid, h.lsn, h.schema_version, h.source,
                h.captured_at, p.cursor, h.tracking, p.tx_end
           FROM sync._changes_page($1, $2, $3) WITH ORDINALITY AS p(change_id, cursor, tx_end, ord)
           JOIN sync.change_history h ON h.id = p.change_id
          ORDER BY p.ord'
        USING changes_since.cursor, changes_since.max_rows, changes_since.until;
END
$$;

-- Makes a mark of the log on the primary (SPEC 2.7), unless one that sees as much exists or
-- another session is making one: the anchor a hot standby's cursors start from (see
-- sync.tick in schema.sql). A gateway that reads from a standby calls it on the primary when
-- the log moved. Returns the new tick's cursor, or NULL. Keeps the newest 100 ticks.
-- SECURITY DEFINER: it writes sync.tick for the gateways; it runs no code a caller defines.
CREATE OR REPLACE FUNCTION sync.tick() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    now_cursor text;
    last_cursor text;
BEGIN
    IF pg_catalog.pg_is_in_recovery() THEN
        RAISE EXCEPTION 'sync.tick: a standby cannot make marks; call it on the primary'
            USING ERRCODE = '25006';
    END IF;
    BEGIN
        LOCK TABLE sync_lock.tick IN EXCLUSIVE MODE NOWAIT;
    EXCEPTION WHEN lock_not_available THEN
        RETURN NULL;
    END;
    now_cursor := sync.current_cursor();
    SELECT t.cursor INTO last_cursor FROM sync.tick t ORDER BY t.id DESC LIMIT 1;
    IF last_cursor IS NOT NULL AND sync.cursor_reached(last_cursor, now_cursor) THEN
        RETURN NULL;
    END IF;
    INSERT INTO sync.tick (cursor) VALUES (now_cursor);
    DELETE FROM sync.tick t WHERE t.id <= (SELECT max(n.id) - 100 FROM sync.tick n);
    RETURN now_cursor;
END
$$;

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
    -- What is noted of each entity's access is its newest row of each kind.
    DELETE FROM sync.access_event e
     WHERE e.id < (SELECT max(n.id) FROM sync.access_event n
                    WHERE n.entity_code IS NOT DISTINCT FROM e.entity_code
                      AND n.kind IS NOT DISTINCT FROM e.kind);
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

CREATE OR REPLACE FUNCTION sync.status() RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
SELECT jsonb_build_object(
    'tracked', coalesce((
        SELECT jsonb_agg(jsonb_build_object(
                   'table', t.relid::text,
                   'entity_code', t.entity_code,
                   'capture', t.capture,
                   'columns', t.columns,
                   'schema_version', t.schema_version,
                   -- trigger capture is healthy when both triggers exist and fire ALWAYS
                   'capture_enabled', t.capture <> 'trigger' OR (
                       SELECT count(*) = 2 AND bool_and(g.tgenabled = 'A') FROM pg_catalog.pg_trigger g
                        WHERE g.tgrelid = t.relid
                          AND g.tgname IN ('sync_capture', 'sync_capture_truncate')))
                 ORDER BY t.entity_code)
          FROM sync.tracked t), '[]'::jsonb),
    'log_rows_estimate', (SELECT greatest(s.n_live_tup, 0) FROM pg_catalog.pg_stat_user_tables s
                           WHERE s.relid = 'sync.change_history'::regclass),
    'oldest_change_at', (SELECT h.captured_at FROM sync.change_history h ORDER BY h.id LIMIT 1),
    'horizon', (SELECT s.horizon::text FROM sync.state s),
    'wakeup', sync._wakeup_mode(),
    'wal_slot', coalesce((
        SELECT jsonb_build_object(
                   'exists', true,
                   'retained_bytes', pg_wal_lsn_diff(pg_current_wal_lsn(), r.restart_lsn)::bigint,
                   'lost_at', (SELECT s.wal_slot_lost_at FROM sync.state s))
          FROM pg_catalog.pg_replication_slots r WHERE r.slot_name = 'pg_sync'),
        jsonb_build_object('exists', false, 'retained_bytes', 0,
                           'lost_at', (SELECT s.wal_slot_lost_at FROM sync.state s))),
    'last_ingest_at', (SELECT s.last_ingest_at FROM sync.state s))
$$;

-- Raises SY412 unless `tbl` is tracked now with this tracking and schema version: a
-- gateway checks, in the transaction of a snapshot or a write, after locking the table and
-- before its snapshot, that the rows it is about to shape (published columns, the table
-- itself) are the entity's as it knows it; else it reads the catalog again. SECURITY
-- DEFINER: the authenticator that runs it may not read sync.tracked; it tells only what
-- the catalog tells.
CREATE OR REPLACE FUNCTION sync._entity_is(tbl regclass, tracking bigint, schema_version integer)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM sync.tracked t
                    WHERE t.relid = tbl AND t.tracking = _entity_is.tracking
                      AND t.schema_version = _entity_is.schema_version) THEN
        RAISE EXCEPTION 'pg_sync: entity changed: % was altered, re-tracked or replaced', tbl
            USING ERRCODE = 'SY412', HINT = 'Read the tracked entities again and retry.';
    END IF;
    RETURN true;
END
$$;

-- Tags the calling transaction's changes with an origin: a transactional logical message
-- that WAL enrichment attaches to every change of the transaction, and sync.client_id for
-- trigger capture. (wal2json cuts a message at a NUL byte; text cannot hold one anyway.)
CREATE OR REPLACE FUNCTION sync.tag_origin(client_id text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF client_id IS NULL OR client_id = '' THEN
        RAISE EXCEPTION 'sync.tag_origin: client_id must not be empty' USING ERRCODE = '22023';
    END IF;
    PERFORM pg_catalog.pg_logical_emit_message(true, 'pg_sync', client_id);
    PERFORM pg_catalog.set_config('sync.client_id', client_id, true);
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
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f regprocedure;
BEGIN
    IF gateway IS NULL THEN
        RAISE EXCEPTION 'sync.grant_gateway: gateway must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF (SELECT r.rolsuper OR r.rolbypassrls FROM pg_catalog.pg_roles r WHERE r.oid = gateway) THEN
        RAISE WARNING 'pg_sync: % is a superuser or bypasses row-level security; the gateway refuses to run as it', gateway;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA sync TO %s', gateway);
    EXECUTE format('GRANT USAGE ON TYPE sync.change TO %s', gateway);
    EXECUTE format('GRANT SELECT ON sync.change_history, sync.state, sync.tracked, sync.access_event, sync.tick TO %s', gateway);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON sync.subscription, sync.gateway TO %s', gateway);
    EXECUTE format('GRANT SELECT, INSERT ON sync.applied_mutation TO %s', gateway);
    FOREACH f IN ARRAY ARRAY[
        'sync.current_cursor()', 'sync.changes_since(text, integer, text)',
        'sync._changes_page(text, integer, text)', 'sync._cursor_problem(text)',
        'sync._log_read_lock()', 'sync.cursor_reached(text, text)',
        'sync.ingest_wal(integer)', 'sync._wal_settled(text)', 'sync.status()',
        'sync._wakeup_mode()', 'sync.claim_mutation(text, text)', 'sync.tag_origin(text)',
        'sync.policy_plan(oid, text)', 'sync.visible(oid, jsonb, jsonb)',
        'sync.members(text, jsonb, text[], jsonb)', 'sync.entities()', 'sync.tick()', 'sync.access_digests(text[])', 'sync._table_access(regclass)', 'sync._heirs(oid)',
        'sync._role_access(regclass, text[])', 'sync.access_serial()', 'sync._note_access(text[])',
        'sync._entity_is(regclass, bigint, integer)'
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
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f regprocedure;
BEGIN
    IF authenticator IS NULL THEN
        RAISE EXCEPTION 'sync.grant_authenticator: authenticator must not be NULL' USING ERRCODE = '22004';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA sync TO %s', authenticator);
    FOREACH f IN ARRAY ARRAY[
        'sync.current_cursor()', 'sync._wal_settled(text)', 'sync.claim_mutation(text, text)',
        'sync.tag_origin(text)', 'sync._entity_is(regclass, bigint, integer)'
    ]::regprocedure[] LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', f, authenticator);
    END LOOP;
END
$$;
-- The event trigger of access changes also fires for DROP OWNED, ALTER SCHEMA, CREATE TABLE
-- and CREATE SCHEMA.
CREATE EVENT TRIGGER sync_access_change ON ddl_command_end
    WHEN TAG IN ('CREATE POLICY', 'ALTER POLICY', 'DROP POLICY', 'GRANT', 'REVOKE', 'ALTER TABLE',
                 'DROP OWNED', 'ALTER SCHEMA', 'CREATE TABLE', 'CREATE SCHEMA')
    EXECUTE FUNCTION sync._on_access_change();
ALTER EVENT TRIGGER sync_access_change ENABLE ALWAYS;

-- Capture triggers carry the tracking from now on (`schema_version@tracking`).
SELECT sync._install_capture(t.relid) FROM sync.tracked t WHERE t.capture = 'trigger';
-- Who may read each tracked table, noted as it is now (the first note logs nothing).
SELECT sync._note_access();

-- Nothing of pg_sync's is anyone's by default (SPEC 1.9).
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA sync FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA sync FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA sync FROM PUBLIC;

-- The roles granted before get what this version adds for them: gateways (they may read the
-- log) and authenticators (they may claim mutation ids but not read the log).
DO $$
DECLARE
    r regrole;
BEGIN
    FOR r IN SELECT a.oid::regrole FROM pg_catalog.pg_roles a
              WHERE pg_catalog.has_function_privilege(a.oid, 'sync.changes_since(text, integer, text)', 'EXECUTE')
                AND NOT a.rolsuper LOOP
        PERFORM sync.grant_gateway(r);
    END LOOP;
    FOR r IN SELECT a.oid::regrole FROM pg_catalog.pg_roles a
              WHERE pg_catalog.has_function_privilege(a.oid, 'sync.claim_mutation(text, text)', 'EXECUTE')
                AND NOT pg_catalog.has_function_privilege(a.oid, 'sync.changes_since(text, integer, text)', 'EXECUTE')
                AND NOT a.rolsuper LOOP
        PERFORM sync.grant_authenticator(r);
    END LOOP;
END
$$;
