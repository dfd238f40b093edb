//! `#[pg_test]`s: each runs inside one transaction that is rolled back, so they check what
//! one session sees: the SQL API, its errors, and what the capture writes. Behaviour across
//! sessions (commit order, wake-ups, crashes) is tested in the workspace's `tests/` crate
//! against a real cluster.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// One value; the log's held-back last row is written first (`sync._flush_log`), as
    /// these tests read the log inside the writing transaction.
    fn one<T: IntoDatum + FromDatum>(sql: &str) -> Option<T> {
        run("SELECT sync._flush_log()");
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn project() {
        run(
            "CREATE TABLE public.project (id int PRIMARY KEY, name text, secret text);
             SELECT sync.track('public.project');",
        );
    }

    /// The log's rows as `op entity_id data changed` lines, oldest first.
    fn log_lines() -> Vec<String> {
        run("SELECT sync._flush_log()");
        Spi::connect(|client| {
            client
                .select(
                    "SELECT concat_ws(' ', op, entity_id, data::text, changed_columns::text)
                       FROM sync.change_history ORDER BY id",
                    None,
                    &[],
                )
                .unwrap()
                .map(|row| row.get::<String>(1).unwrap().unwrap())
                .collect()
        })
    }

    #[pg_test]
    fn track_records_the_table_and_installs_always_enabled_triggers() {
        project();
        assert_eq!(
            one::<String>("SELECT entity_code FROM sync.tracked").as_deref(),
            Some("project")
        );
        assert_eq!(
            one::<String>(
                "SELECT string_agg(tgname || ':' || tgenabled::text, ',' ORDER BY tgname) FROM pg_trigger
                  WHERE tgrelid = 'public.project'::regclass"
            )
            .as_deref(),
            Some("sync_capture:A,sync_capture_truncate:A")
        );
        // A second call updates the options.
        run("SELECT sync.track('public.project', entity_code => 'projects')");
        assert_eq!(
            one::<String>("SELECT entity_code FROM sync.tracked").as_deref(),
            Some("projects")
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM sync.tracked"), Some(1));
    }

    #[pg_test(error = "sync.track: table public.nokey has no primary key")]
    fn track_refuses_a_table_without_primary_key() {
        run("CREATE TABLE nokey (a int); SELECT sync.track('nokey')");
    }

    #[pg_test(error = "sync.track: column nope does not exist in public.project")]
    fn track_refuses_an_unknown_column() {
        run("CREATE TABLE project (id int PRIMARY KEY, name text);
             SELECT sync.track('project', columns => ARRAY['name', 'nope'])");
    }

    #[pg_test(error = "sync.track: entity_code 'project' is already used by public.project")]
    fn track_refuses_a_duplicate_entity_code() {
        run("CREATE TABLE project (id int PRIMARY KEY);
             CREATE TABLE other (id int PRIMARY KEY);
             SELECT sync.track('project');
             SELECT sync.track('other', entity_code => 'project')");
    }

    #[pg_test(error = "sync.track: capture must be 'trigger' or 'wal', not 'log'")]
    fn track_refuses_an_unknown_capture() {
        run("CREATE TABLE project (id int PRIMARY KEY); SELECT sync.track('project', capture => 'log')");
    }

    #[pg_test(
        error = "sync.track: sync.change_history belongs to pg_sync itself and cannot be tracked"
    )]
    fn track_refuses_the_log_itself() {
        run("SELECT sync.track('sync.change_history')");
    }

    #[pg_test]
    fn untrack_removes_the_capture_and_keeps_the_history() {
        project();
        run(
            "INSERT INTO project VALUES (1, 'a'); SELECT sync.untrack('project');
             INSERT INTO project VALUES (2, 'b');",
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM sync.tracked"), Some(0));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'project'::regclass"),
            Some(0)
        );
        assert_eq!(
            log_lines(),
            [r#"INSERT 1 {"id": 1, "name": "a", "secret": null}"#]
        );
    }

    #[pg_test]
    fn capture_writes_inserts_updates_and_deletes() {
        project();
        run("INSERT INTO project VALUES (1, 'a', 's');
             UPDATE project SET name = 'b' WHERE id = 1;
             DELETE FROM project WHERE id = 1;");
        assert_eq!(
            log_lines(),
            [
                r#"INSERT 1 {"id": 1, "name": "a", "secret": "s"}"#,
                r#"UPDATE 1 {"id": 1, "name": "b", "secret": "s"} {name}"#,
                "DELETE 1",
            ]
        );
        assert_eq!(
            one::<String>("SELECT old_data::text FROM sync.change_history WHERE op = 'DELETE'")
                .as_deref(),
            Some(r#"{"id": 1, "name": "b", "secret": "s"}"#)
        );
    }

    #[pg_test]
    fn an_update_that_changes_nothing_published_writes_nothing() {
        run(
            "CREATE TABLE project (id int PRIMARY KEY, name text, secret text);
             SELECT sync.track('project', columns => ARRAY['name']);
             INSERT INTO project VALUES (1, 'a', 's');
             UPDATE project SET name = name;
             UPDATE project SET secret = 't';",
        );
        assert_eq!(log_lines(), [r#"INSERT 1 {"id": 1, "name": "a"}"#]);
    }

    #[pg_test]
    fn a_primary_key_change_is_a_delete_and_an_insert() {
        project();
        run("INSERT INTO project VALUES (1, 'a'); UPDATE project SET id = 2;");
        assert_eq!(
            log_lines(),
            [
                r#"INSERT 1 {"id": 1, "name": "a", "secret": null}"#,
                "DELETE 1",
                r#"INSERT 2 {"id": 2, "name": "a", "secret": null}"#,
            ]
        );
    }

    #[pg_test]
    fn composite_keys_become_json_arrays() {
        run(
            r#"CREATE TABLE member (org int, "user" text, role text, PRIMARY KEY (org, "user"));
               SELECT sync.track('member');
               INSERT INTO member VALUES (7, 'u"1', 'admin');"#,
        );
        assert_eq!(
            one::<String>("SELECT entity_id FROM sync.change_history").as_deref(),
            Some(r#"["7","u\"1"]"#)
        );
    }

    #[pg_test]
    fn truncate_is_logged_once_without_an_entity() {
        project();
        run("INSERT INTO project VALUES (1), (2); TRUNCATE project;");
        assert_eq!(
            one::<String>("SELECT concat_ws(' ', op, entity_id, data) FROM sync.change_history ORDER BY id DESC LIMIT 1")
                .as_deref(),
            Some("TRUNCATE")
        );
    }

    #[pg_test]
    fn the_client_id_setting_tags_changes() {
        project();
        run("SET LOCAL sync.client_id = 'tab-42'; INSERT INTO project VALUES (1);");
        assert_eq!(
            one::<String>("SELECT client_id FROM sync.change_history").as_deref(),
            Some("tab-42")
        );
    }

    #[pg_test]
    fn alter_table_bumps_the_schema_version_and_keeps_capturing() {
        project();
        run("ALTER TABLE project ADD COLUMN extra int; INSERT INTO project VALUES (1, 'a', 's', 5);");
        assert_eq!(
            one::<i32>("SELECT schema_version FROM sync.tracked"),
            Some(2)
        );
        assert_eq!(
            one::<String>(
                "SELECT schema_version || ' ' || data::text FROM sync.change_history WHERE op = 'INSERT'"
            )
                .as_deref(),
            Some(r#"2 {"id": 1, "name": "a", "extra": 5, "secret": "s"}"#)
        );
    }

    #[pg_test(error = "pg_sync: public.project is tracked and needs its primary key")]
    fn dropping_the_primary_key_of_a_tracked_table_is_refused() {
        project();
        run("ALTER TABLE project DROP CONSTRAINT project_pkey");
    }

    #[pg_test]
    fn dropping_a_tracked_table_ends_its_tracking() {
        project();
        run("DROP TABLE project");
        assert_eq!(one::<i64>("SELECT count(*) FROM sync.tracked"), Some(0));
    }

    /// Other sessions see a transaction's changes only once it commits, so they come after
    /// its cursor, also for the transaction itself.
    #[pg_test]
    fn a_transactions_own_changes_come_after_its_cursor() {
        project();
        run("INSERT INTO project VALUES (1), (2)");
        let cursor = one::<String>("SELECT sync.current_cursor()").unwrap();
        let count = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM sync.changes_since($1, 10)",
            &[cursor.as_str().into()],
        )
        .unwrap();
        assert_eq!(count, Some(0));
    }

    #[pg_test(error = "malformed cursor: unknown cursor version")]
    fn a_malformed_cursor_is_refused() {
        run("SELECT * FROM sync.changes_since('garbage')");
    }

    #[pg_test(error = "max_rows must be between 1 and 100000, not 0")]
    fn max_rows_is_bounded() {
        run("SELECT * FROM sync.changes_since(NULL, 0)");
    }

    #[pg_test(error = "sync.prune: keep must be a positive interval")]
    fn prune_refuses_a_negative_interval() {
        run("SELECT sync.prune('-1 day')");
    }

    #[pg_test]
    fn a_mutation_id_is_claimed_once_per_user() {
        assert_eq!(
            one::<bool>("SELECT sync.claim_mutation('alice', 'm1')"),
            Some(true)
        );
        assert_eq!(
            one::<bool>("SELECT sync.claim_mutation('alice', 'm1')"),
            Some(false)
        );
        assert_eq!(
            one::<bool>("SELECT sync.claim_mutation('bob', 'm1')"),
            Some(true)
        );
    }

    #[pg_test]
    fn enrich_types_values_as_to_jsonb_and_keeps_toasted_columns() {
        run("CREATE TABLE doc (id int PRIMARY KEY, at timestamptz, tags int[], body text, note text);
             SELECT sync.track('doc', columns => ARRAY['at', 'tags', 'body']);");
        let change = r#"{"action":"U","schema":"public","table":"doc","lsn":"0/16B3748",
            "columns":[{"name":"id","typeoid":23,"value":1},{"name":"at","typeoid":1184,"value":"2026-01-02 03:04:05+00"},
                       {"name":"tags","typeoid":1007,"value":"{1,2}"},{"name":"note","typeoid":25,"value":"n2"}],
            "identity":[{"name":"id","typeoid":23,"value":1},{"name":"at","typeoid":1184,"value":"2026-01-01 00:00:00+00"},
                        {"name":"tags","typeoid":1007,"value":"{1,2}"},{"name":"body","typeoid":25,"value":"long body"},
                        {"name":"note","typeoid":25,"value":"n1"}]}"#;
        let rows = Spi::get_one_with_args::<pgrx::JsonB>(
            "SELECT sync.enrich_wal2json($1::jsonb)",
            &[change.into()],
        )
        .unwrap()
        .unwrap()
        .0;
        let row = &rows[0];
        assert_eq!(row["op"], "UPDATE");
        assert_eq!(row["entity_id"], "1");
        assert_eq!(row["data"]["at"], "2026-01-02T03:04:05+00:00");
        assert_eq!(row["data"]["tags"], serde_json::json!([1, 2]));
        // Absent from `columns` (unchanged, TOASTed): taken from the old row, not NULL.
        assert_eq!(row["data"]["body"], "long body");
        assert!(row["data"].get("note").is_none());
        assert_eq!(row["changed_columns"], serde_json::json!(["at"]));
        assert_eq!(row["source"], "wal");
    }

    #[pg_test]
    fn status_reports_tables_mode_and_slot() {
        project();
        let status = one::<pgrx::JsonB>("SELECT sync.status()").unwrap().0;
        assert_eq!(status["wakeup"], "worker");
        assert_eq!(status["tracked"][0]["entity_code"], "project");
        assert_eq!(status["tracked"][0]["capture_enabled"], true);
        assert_eq!(status["wal_slot"]["exists"], false);
    }
}
