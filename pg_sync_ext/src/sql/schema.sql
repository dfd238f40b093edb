-- pg_sync's tables. Runs first when `CREATE EXTENSION pg_sync` builds the schema `sync`;
-- the functions over these tables come from Rust (capture, cursors, wake-ups) and from
-- api.sql (tracking, pruning, status).

-- One row: what identifies this log and how far back it reaches.
CREATE TABLE sync.state (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- A random id of this log. Cursors carry it, so that a cursor from another database, or
    -- from before a dump and restore (transaction ids start again), is expired, not wrong.
    -- Not dumped: a restore creates the extension anew and so a new generation.
    generation     text NOT NULL DEFAULT pg_catalog.md5(pg_catalog.gen_random_uuid()::text),
    -- Every change of a transaction older than this is gone (pruned) or never existed.
    -- A cursor whose snapshot does not see all of them is expired.
    horizon        xid8 NOT NULL DEFAULT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot()),
    -- WAL capture: the commit LSN of the last transaction stored from the slot (the slot
    -- moves past it at the next ingest), when an ingest last ran, and when the slot was found
    -- lost after it had been read (its gap was announced as a TRUNCATE per WAL entity).
    wal_stored_lsn   pg_lsn,
    last_ingest_at   timestamptz,
    wal_slot_lost_at timestamptz
);
INSERT INTO sync.state DEFAULT VALUES;

-- Who may read each tracked table, as it was last noted (sync._note_access): a digest per
-- entity and kind (`table`: what the table itself decides, noted by the event triggers;
-- `roles:<hash>`: what depends on the roles a gateway acts as, noted by the gateways). A new
-- digest comes with an ACCESS row in the log for that entity, so that every reader meets the
-- change in the log's order. Readers also read the newest id with every page: a new one
-- means the gateway reads the catalog again before judging the page. Rows, not a counter in
-- one row: a counter's row would be locked by any role's open DDL transaction, stalling
-- every other writer of it. sync.prune keeps the newest row of each entity and kind.
CREATE TABLE sync.access_event (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT pg_catalog.now(),
    entity_code text,
    kind        text,
    digest      text
);
CREATE INDEX access_event_entity ON sync.access_event (entity_code, kind, id);

-- Marks of the log made on the primary (`sync.tick()`), as cursors. A hot standby cannot
-- make a mark of its own (in recovery PostgreSQL's snapshots do not list the transactions in
-- progress, and its next xid knows only what was replayed): its `current_cursor()` is the
-- newest tick it has replayed, plus the transactions it has replayed since (changes.rs).
-- Ticks are anchors only: readers on a standby read whatever it has replayed, not tick to
-- tick. `sync.tick()` keeps the newest few.
CREATE TABLE sync.tick (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    cursor  text NOT NULL,
    made_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- The change log. Written by log.rs straight into the heap and indexes (no constraints,
-- triggers or defaults apply there: keep the column order in step with log.rs). `id` comes from a CACHE 1 sequence inside the capturing transaction after
-- it wrote (and so locked) the row: ids of one row's changes follow its commit order, and a
-- transaction that starts after a snapshot takes only ids above that snapshot's largest
-- visible id. Both facts carry the cursor design (see core/src/cursor.rs).
CREATE TABLE sync.change_history (
    id              bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    table_name      text NOT NULL,
    entity_code     text NOT NULL,
    op              text NOT NULL,    -- INSERT, UPDATE, DELETE or TRUNCATE
    entity_id       text,
    data            jsonb,
    old_data        jsonb,
    changed_columns text[],
    client_id       text,
    txid            xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    lsn             pg_lsn,
    schema_version  integer NOT NULL,
    source          text NOT NULL DEFAULT 'trigger',    -- trigger or wal
    captured_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- On a transaction's last row only: its first id (see log.rs). A reader finds a page's
    -- transactions by their last rows and their rows by one id range.
    tx_first        bigint,
    -- sync.tracked.tracking of the table that wrote the row: a row is only ever judged and
    -- delivered under the tracking that wrote it, never under another table tracked later
    -- with the same entity_code (NULL: written before 0.3.0 by a table no longer tracked).
    tracking        bigint
);
-- The rows of a transaction that was running at a cursor are found by its txid.
CREATE INDEX change_history_txid_id ON sync.change_history (txid, id);

-- Each track of a table that was not tracked takes a new number: an entity's identity in
-- the log, which survives renames and re-configuration, and changes on untrack/retrack and
-- when a dropped table is replaced. Dumped with sync.tracked, so numbers never repeat.
CREATE SEQUENCE sync.tracking_seq;
SELECT pg_catalog.pg_extension_config_dump('sync.tracking_seq', '');

-- One row per tracked table. Dumped with the database, so tracking survives a restore.
CREATE TABLE sync.tracked (
    relid          regclass PRIMARY KEY,
    entity_code    text NOT NULL UNIQUE CHECK (entity_code <> '' AND pg_catalog.length(entity_code) <= 128),
    capture        text NOT NULL DEFAULT 'trigger' CHECK (capture IN ('trigger', 'wal')),
    columns        text[],
    schema_version integer NOT NULL DEFAULT 1,
    tracked_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    tracking       bigint NOT NULL DEFAULT pg_catalog.nextval('sync.tracking_seq') UNIQUE
);
SELECT pg_catalog.pg_extension_config_dump('sync.tracked', '');

-- Live subscriptions of the gateways' connections (kept current by the gateways).
CREATE TABLE sync.subscription (
    connection_id text NOT NULL,
    user_id       text NOT NULL,
    entity_code   text NOT NULL,
    entity_id     text,
    filter        jsonb,
    mode          text NOT NULL DEFAULT 'invalidate' CHECK (mode IN ('invalidate', 'delta')),
    gateway_id    text NOT NULL,
    subscribed_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX subscription_connection ON sync.subscription (connection_id);
CREATE INDEX subscription_entity ON sync.subscription (entity_code, entity_id);
CREATE INDEX subscription_gateway ON sync.subscription (gateway_id);

-- Gateways' heartbeats: the subscriptions of a gateway whose heartbeat went stale are removed.
CREATE TABLE sync.gateway (
    gateway_id   text PRIMARY KEY,
    started_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    heartbeat_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Mutation ids the gateway's POST /v1/write has applied, so that a retried batch applies
-- nothing twice. Pruned with the log (sync.prune).
CREATE TABLE sync.applied_mutation (
    user_id    text NOT NULL,
    id         text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    PRIMARY KEY (user_id, id)
);

-- The locks that order pg_sync's own work, as tables in a schema of their own that no role
-- but the extension's owner may use: advisory lock keys are open to every role, which could
-- hold one for its session and stall the log's readers or WAL ingestion; these can be taken
-- only through pg_sync's functions. (Not even named: a statement refused for want of rights
-- can still lock a table it names.)
CREATE SCHEMA sync_lock;
REVOKE ALL ON SCHEMA sync_lock FROM PUBLIC;
-- Readers of the log hold it in ROW SHARE mode, sync.prune in EXCLUSIVE mode, so that a page
-- is never read across a prune that moves the horizon under it.
CREATE TABLE sync_lock.log_read ();
-- WAL ingestion and slot creation hold it in EXCLUSIVE mode: one at a time.
CREATE TABLE sync_lock.ingest ();
-- sync.tick() holds it in EXCLUSIVE mode (without waiting): one tick at a time.
CREATE TABLE sync_lock.tick ();
