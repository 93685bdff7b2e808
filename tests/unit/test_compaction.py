"""The haven's tables rewritten when appends have left them in many row groups
(``safehaven.core.compaction``): the same rows in the same order, the same columns, constraints,
comments and declared compression, the audit trail still verifying; a rewrite DuckDB refuses
leaves the table as it was; a run rewrites them at its start."""

from __future__ import annotations

import dagster as dg
import duckdb
import pytest

from resources.haven import COMPACTION_DEFERRED, COMPACTION_TAG, SafeHavenResource
from safehaven.core import audit, compaction, schema
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import vault
from tests.conftest import copy_haven

BATCHES = schema.BATCHES


def _row_groups(con: duckdb.DuckDBPyConnection, table: str) -> int:
    return con.execute(f"SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('{table}')").fetchone()[0]


def _append_one_a_connection(store: Store, rows: int, start: int = 0) -> None:
    """``rows`` batch register rows, each by a store connection of its own (as the haven's steps append)."""
    for i in range(start, start + rows):
        with store.connect() as con:
            schema.ensure(con, BATCHES)
            con.execute(
                f"INSERT INTO {BATCHES} (batch_id, collection, rows) VALUES (?, 'gp_events', ?)", [f"b{i:03}", i]
            )


def _shape(con: duckdb.DuckDBPyConnection, table: str) -> tuple[list, list, list, list]:
    """A table's rows as stored (no ORDER BY), columns, constraints and comments."""
    zone, name = table.split(".")
    where = "WHERE database_name = current_database() AND schema_name = ? AND table_name = ?"
    return (
        con.execute(f"SELECT * FROM {table}").fetchall(),
        con.execute(
            f"SELECT column_name, data_type, is_nullable, column_default, comment FROM duckdb_columns() {where} "
            "ORDER BY column_index",
            [zone, name],
        ).fetchall(),
        con.execute(
            f"SELECT constraint_type, constraint_column_names FROM duckdb_constraints() {where} ORDER BY ALL",
            [zone, name],
        ).fetchall(),
        con.execute(f"SELECT comment FROM duckdb_tables() {where}", [zone, name]).fetchall(),
    )


def _zone_tables(con: duckdb.DuckDBPyConnection, zone: str) -> list[str]:
    return [
        r[0]
        for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() AND schema_name = ? "
            "ORDER BY 1",
            [zone],
        ).fetchall()
    ]


def test_each_connection_that_appends_to_a_table_with_a_primary_key_leaves_a_row_group(home: Home) -> None:
    """The DuckDB behaviour the rewrite answers (duckdb/duckdb#21316, DuckDB 1.4.4): when this fails
    after an upgrade, the haven's tables no longer fragment and the rewrite can go."""
    store = Store(home)
    _append_one_a_connection(store, 12)
    with store.connect(read_only=True) as con:
        assert _row_groups(con, BATCHES) == 12
        assert compaction.fragmented(con) == [BATCHES]


@pytest.mark.parametrize("comment", ["every batch landed", ""])
def test_a_rewrite_keeps_the_rows_in_order_the_columns_constraints_and_comments_in_one_row_group(
    home: Home, comment: str
) -> None:
    store = Store(home)
    _append_one_a_connection(store, 15)
    with store.connect() as con:
        con.execute(f"DELETE FROM {BATCHES} WHERE batch_id = 'b007'")  # a deleted row stays deleted
        con.execute(f"COMMENT ON TABLE {BATCHES} IS '{comment}'")
        con.execute(f"COMMENT ON COLUMN {BATCHES}.rows IS 'rows of the file'")
        before = _shape(con, BATCHES)
        tables = _zone_tables(con, "governance")
        done = compaction.compact(con)
        assert done.rewritten == [BATCHES] and done.refused == {}
    with store.connect() as con:
        assert _row_groups(con, BATCHES) == 1
        assert _shape(con, BATCHES) == before
        assert len(before[0]) == 14 and before[2] == [("NOT NULL", ["batch_id"]), ("PRIMARY KEY", ["batch_id"])]
        assert _zone_tables(con, "governance") == tables  # nothing left aside
        with pytest.raises(duckdb.ConstraintException):  # the primary key still holds
            con.execute(f"INSERT INTO {BATCHES} (batch_id) VALUES ('b001')")


def test_a_table_within_its_slack_is_left_alone(home: Home) -> None:
    """Rewritten only past ``SLACK`` row groups more than its rows need (one here)."""
    store = Store(home)
    _append_one_a_connection(store, 1 + compaction.SLACK)
    with store.connect() as con:
        assert compaction.compact(con).rewritten == []
        assert _row_groups(con, BATCHES) == 1 + compaction.SLACK
    _append_one_a_connection(store, 1, start=1 + compaction.SLACK)
    with store.connect() as con:
        assert compaction.compact(con).rewritten == [BATCHES]
        assert _row_groups(con, BATCHES) == 1


def test_the_audit_trail_verifies_after_its_log_is_rewritten(home: Home) -> None:
    store, keyring = Store(home), KeyRing(home.keys)
    for i in range(compaction.SLACK + 3):
        with store.connect() as con:
            audit.append(con, actor="test", role="pipeline", action="test.step", object=f"step:{i}", home=home)
    with store.connect() as con:
        entries = audit.entries_for(con)
        assert _row_groups(con, audit.TABLE) > compaction.SLACK + 1
        assert audit.TABLE in compaction.compact(con).rewritten
    with store.connect() as con:
        assert _row_groups(con, audit.TABLE) == 1
        assert audit.entries_for(con) == entries
        assert audit.verify(con, home, keyring=keyring).ok


def test_a_rewrite_duckdb_refuses_leaves_that_table_as_it_was_and_rewrites_the_others(home: Home) -> None:
    """An index someone made on a haven table stops its rename: that rewrite is rolled back and
    named by the kind of error only (DuckDB's text may quote a row's values)."""
    store = Store(home)
    _append_one_a_connection(store, compaction.SLACK + 4)
    for i in range(compaction.SLACK + 3):
        with store.connect() as con:
            audit.append(con, actor="test", role="pipeline", action="test.step", object=f"step:{i}", home=home)
    with store.connect() as con:
        con.execute(f"CREATE INDEX by_collection ON {BATCHES} (collection)")
        before, groups = _shape(con, BATCHES), _row_groups(con, BATCHES)
        tables = _zone_tables(con, "governance")
        done = compaction.compact(con)
    assert done.rewritten == [audit.TABLE]
    assert done.refused == {BATCHES: "DuckDB refused it (DependencyException); the table is as it was"}
    with store.connect() as con:
        assert (_shape(con, BATCHES), _row_groups(con, BATCHES)) == (before, groups)
        assert _zone_tables(con, "governance") == tables


def test_a_table_the_haven_did_not_declare_is_left_as_it_is(home: Home) -> None:
    """Not the haven's to rewrite; a name holding a dot once stopped every run at its start
    (found by review)."""
    store = Store(home)
    for i in range(compaction.SLACK + 3):
        with store.connect() as con:
            con.execute('CREATE TABLE IF NOT EXISTS governance."notes.v2" (id INTEGER PRIMARY KEY)')
            con.execute('INSERT INTO governance."notes.v2" VALUES (?)', [i])
    with store.connect() as con:
        assert compaction.compact(con) == compaction.Compaction()
        assert _row_groups(con, 'governance."notes.v2"') == compaction.SLACK + 3


def test_a_rewrite_is_refused_inside_a_transaction_of_the_callers(home: Home) -> None:
    """A ``BEGIN`` inside it would abort the caller's work, which its ``COMMIT`` would then drop
    without a word (found by review)."""
    store = Store(home)
    _append_one_a_connection(store, compaction.SLACK + 2)
    with store.connect() as con:
        con.execute("BEGIN TRANSACTION")
        con.execute(f"INSERT INTO {BATCHES} (batch_id) VALUES ('kept')")
        with pytest.raises(ValueError, match="outside any transaction"):
            compaction.compact(con)
        con.execute("COMMIT")
        assert con.execute(f"SELECT count(*) FROM {BATCHES} WHERE batch_id = 'kept'").fetchone() == (1,)
        assert _row_groups(con, BATCHES) == compaction.SLACK + 3


def test_a_run_rewrites_the_tables_left_in_many_row_groups_at_its_start(home: Home) -> None:
    """Through the resource, once the run's audit trail has verified (``resources.haven``): the
    declared tables and its contracts' (here a collection's rejected rows)."""
    store = Store(home)
    _append_one_a_connection(store, compaction.SLACK + 2)
    rejected = "landing.gp_events_rejected"
    with store.connect() as con:  # landed rows with no audit entry at all would refuse the run (truncation)
        audit.append(con, actor="test", role="pipeline", action="test.step", object="step:0", home=home)
        con.execute(f"CREATE TABLE {rejected} (_batch VARCHAR, _row BIGINT, failed_rules VARCHAR[])")
    for i in range(compaction.SLACK + 2):
        with store.connect() as con:
            con.execute(f"INSERT INTO {rejected} VALUES ('b', ?, ['r'])", [i])

    @dg.asset(required_resource_keys={"haven"})
    def reads_the_store(context) -> int:  # unannotated: Dagster cannot read an annotation held as a string
        with context.resources.haven.connect(read_only=True) as con:
            return _row_groups(con, BATCHES)

    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([reads_the_store], resources={"haven": SafeHavenResource()}, instance=instance)
    assert result.output_for_node("reads_the_store") == 1
    said = [entry.user_message for entry in instance.all_logs(result.run_id)]
    rewrote = f"store: rewrote 2 table(s) left in many row groups: governance.batches, {rejected} ("
    assert any(m.startswith(rewrote) and m.endswith(" s)") for m in said)
    with store.connect(read_only=True) as con:
        assert _row_groups(con, rejected) == 1


def test_a_collections_intake_runs_leave_the_rewrite_to_the_nights_run(home: Home) -> None:
    """A job tagged to defer it (``resources.haven.COMPACTION_TAG``: every collection's intake job,
    whose runs come one per drop before the night's) rewrites nothing at its start; the next run
    without the tag does (issue 22: the check reads every table's storage, 40-110 ms a run)."""
    from assets.automation import INTAKE_PREFIX, NIGHTLY
    from assets.definitions import build_definitions

    store = Store(home)
    _append_one_a_connection(store, compaction.SLACK + 2)
    with store.connect() as con:
        audit.append(con, actor="test", role="pipeline", action="test.step", object="step:0", home=home)

    @dg.asset(required_resource_keys={"haven"})
    def reads_the_store(context) -> int:  # unannotated: Dagster cannot read an annotation held as a string
        with context.resources.haven.connect(read_only=True) as con:
            return _row_groups(con, BATCHES)

    deferred = dg.materialize(
        [reads_the_store], resources={"haven": SafeHavenResource()}, tags={COMPACTION_TAG: COMPACTION_DEFERRED}
    )
    assert deferred.output_for_node("reads_the_store") == compaction.SLACK + 2
    after = dg.materialize([reads_the_store], resources={"haven": SafeHavenResource()})
    assert after.output_for_node("reads_the_store") == 1
    jobs = {job.name: job for job in build_definitions().resolve_all_job_defs()}
    intake = [job for name, job in jobs.items() if name.startswith(INTAKE_PREFIX)]
    assert len(intake) == len(ContractRegistry().contracts)
    assert all(job.tags.get(COMPACTION_TAG) == COMPACTION_DEFERRED for job in intake)
    assert COMPACTION_TAG not in jobs[NIGHTLY].tags


def test_a_rewrite_that_fails_part_way_is_rolled_back_whole(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the copy (here as the table's comment is set again) leaves the old table
    in its place, not a half-made new one beside it."""
    store = Store(home)
    _append_one_a_connection(store, compaction.SLACK + 4)
    with store.connect() as con:
        con.execute(f"COMMENT ON TABLE {BATCHES} IS 'every batch landed'")
        before, groups, tables = _shape(con, BATCHES), _row_groups(con, BATCHES), _zone_tables(con, "governance")
    real_lit = compaction.lit

    def failing_lit(value: str) -> str:
        if value == "every batch landed":
            raise duckdb.IOException("the disk is full")
        return real_lit(value)

    monkeypatch.setattr(compaction, "lit", failing_lit)
    with store.connect() as con:
        assert compaction.compact(con).refused == {BATCHES: "DuckDB refused it (IOException); the table is as it was"}
    with store.connect() as con:
        assert (_shape(con, BATCHES), _row_groups(con, BATCHES)) == (before, groups)
        assert _zone_tables(con, "governance") == tables


def _compressions(con: duckdb.DuckDBPyConnection, table: str, column: str) -> set[str]:
    """How ``column`` of ``table`` is stored, over its segments (random bytes would compress no smaller)."""
    return {
        r[0]
        for r in con.execute(
            f"SELECT DISTINCT compression FROM pragma_storage_info('{table}') WHERE column_name = ? "
            "AND segment_type <> 'VALIDITY'",
            [column],
        ).fetchall()
    }


def test_a_table_declared_with_a_compression_is_made_again_from_its_declaration(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog's SQL of a table does not carry a column's declared compression, so a rewrite
    from it would drop the declaration (``schema.RANDOM_BYTES``): such a table is made again from
    its declaration, with its rows in order and its comment, and stays uncompressed. Bytes that
    would compress make the difference show."""
    name, columns = "vault.test_keys", f"key_id VARCHAR PRIMARY KEY, material {schema.RANDOM_BYTES}"
    monkeypatch.setitem(schema.TABLES, name, schema.Table(name, f"CREATE TABLE IF NOT EXISTS {name} ({columns})", ""))
    store = Store(home)
    for i in range(compaction.SLACK + 3):
        with store.connect() as con:
            schema.ensure(con, name)
            con.execute(f"INSERT INTO {name} VALUES (?, ?)", [f"k{i}", bytes(4000)])
    with store.connect() as con:
        con.execute(f"COMMENT ON TABLE {name} IS 'test keys'")
        before = _shape(con, name)
        assert compaction.compact(con).rewritten == [name]
    with store.connect() as con:
        assert _shape(con, name) == before and _row_groups(con, name) == 1
        assert _compressions(con, name, "material") == {"Uncompressed"}


def test_a_table_whose_columns_are_no_longer_its_declaration_is_left_as_it_was(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Made again from its declaration, a table holding a column the declaration lacks cannot take
    its rows: the copy is refused and rolled back, and the table stays whole."""
    name = "vault.test_keys"
    monkeypatch.setitem(
        schema.TABLES,
        name,
        schema.Table(name, f"CREATE TABLE IF NOT EXISTS {name} (key_id VARCHAR, material {schema.RANDOM_BYTES})", ""),
    )
    store = Store(home)
    with store.connect() as con:
        con.execute(f"CREATE TABLE {name} (key_id VARCHAR, material {schema.RANDOM_BYTES}, note VARCHAR)")
    for i in range(compaction.SLACK + 3):
        with store.connect() as con:
            con.execute(f"INSERT INTO {name} VALUES (?, ?, 'kept')", [f"k{i}", bytes(12)])
    with store.connect() as con:
        before, groups = _shape(con, name), _row_groups(con, name)
        assert list(compaction.compact(con).refused) == [name]
    with store.connect() as con:
        assert (_shape(con, name), _row_groups(con, name)) == (before, groups)
        assert [t for t in _zone_tables(con, "vault") if t.startswith("test_keys")] == ["test_keys"]


def test_an_older_vault_made_again_from_its_declaration_is_marked_so_the_vault_does_not_copy_it_again(
    home: Home,
) -> None:
    """A store made before ``schema.RANDOM_BYTES`` has ``vault.identity`` without the declaration
    and without its mark; compaction makes it again as declared, so it marks it, and the next
    vault write finds nothing to copy (found by review: it copied the whole table a second time)."""
    store = Store(home)
    with store.connect() as con:
        con.execute(
            "CREATE TABLE vault.identity (pid VARCHAR, field VARCHAR, nonce BLOB, ciphertext BLOB, "
            "dek_id VARCHAR, collection VARCHAR, added_at TIMESTAMPTZ)"
        )
    for i in range(compaction.SLACK + 3):
        with store.connect() as con:
            con.execute(
                "INSERT INTO vault.identity VALUES (?, 'f', ?, ?, 'd', 'c', now())", [f"p{i}", bytes(12), bytes(40)]
            )
    with store.connect() as con:
        before = con.execute("SELECT * FROM vault.identity").fetchall()
        assert compaction.compact(con).rewritten == [vault.IDENTITY]
    with store.connect() as con:
        assert con.execute("SELECT * FROM vault.identity").fetchall() == before
        assert _compressions(con, vault.IDENTITY, "ciphertext") == {"Uncompressed"}
        assert vault._random_bytes_as_declared(con) is False


def test_every_table_a_night_makes_is_one_the_compaction_looks_at(home: Home, populated_haven) -> None:
    """Every table of a populated haven is declared (``safehaven.core.schema``) or named by its
    contracts (``Contract.store_tables``, passed by the run's resource): none is left to grow in
    row groups unseen (found by review: the contracts' list was untested)."""
    copy_haven(populated_haven, home)
    named = {t for c in ContractRegistry().contracts.values() for t in c.store_tables}
    with Store(home).connect(read_only=True) as con:
        tables = {
            f"{zone}.{name}"
            for zone, name in con.execute(
                "SELECT schema_name, table_name FROM duckdb_tables() WHERE database_name = current_database() "
                "AND NOT temporary"
            ).fetchall()
        }
    assert {t for t in tables if t.split(".")[0] in ("landing", "haven")} <= named
    assert tables - named <= set(schema.TABLES)
    assert {"landing.gp_events", "landing.gp_events_valid", "haven.gp_events"} <= tables & named


def test_a_contract_table_is_rewritten_only_when_named_and_past_twice_what_its_rows_need(home: Home) -> None:
    """A collection's tables are the haven's when its contracts name them (``also``). A large table
    in up to twice the row groups its rows need (what a night's landing leaves) is left alone;
    past that, and past ``SLACK`` for a small one, it is rewritten."""
    store = Store(home)
    table, rows = "landing.test_events", 3 * compaction.ROW_GROUP_ROWS  # needs 3 row groups
    with store.connect() as con:
        con.execute(f"CREATE TABLE {table} (id BIGINT, note VARCHAR)")
    appended = 0
    for part in (rows // 6,) * 6:  # six appends, each in a row group of its own: twice the need
        with store.connect() as con:
            con.execute(f"INSERT INTO {table} SELECT range, 'n' || range FROM range({appended}, {appended + part})")
        appended += part
    with store.connect() as con:
        assert _row_groups(con, table) == 6
        assert compaction.fragmented(con, [table]) == []
    for i in range(compaction.SLACK - 1):  # 7 small appends: 13 row groups, past the 4 needed + max(SLACK, 4)
        with store.connect() as con:
            con.execute(f"INSERT INTO {table} VALUES (?, 'late')", [appended + i])
    with store.connect() as con:
        before = con.execute(f"SELECT * FROM {table}").fetchall()
        assert _row_groups(con, table) == 13
        assert compaction.fragmented(con) == []  # not declared, not named: not the haven's
        assert compaction.compact(con, [table]).rewritten == [table]
    with store.connect() as con:
        assert con.execute(f"SELECT * FROM {table}").fetchall() == before
        assert _row_groups(con, table) == 4


@pytest.mark.parametrize(
    ("groups", "rows", "past"),
    [
        (9, 1, False),
        (10, 1, True),
        (2 * 56, 56 * compaction.ROW_GROUP_ROWS, False),
        (2 * 56 + 1, 56 * compaction.ROW_GROUP_ROWS, True),
        (103, 6_819_750, False),
    ],
)
def test_the_limit_is_the_need_plus_slack_or_twice_the_need(groups: int, rows: int, past: bool) -> None:
    """The GP landing of the benchmark's night (103 row groups for 6.8M rows) is within it."""
    assert compaction.over(groups, rows) is past


def test_a_run_whose_audit_trail_does_not_verify_rewrites_nothing(home: Home) -> None:
    """The run is refused at its start (``audit.begin_run``) before any table is rewritten: the
    store stays as the trail's breaker left it, for whoever looks into it."""
    store = Store(home)
    _append_one_a_connection(store, compaction.SLACK + 2)
    with store.connect() as con:
        for i in range(3):
            audit.append(con, actor="test", role="pipeline", action="test.step", object=f"step:{i}", home=home)
        con.execute(f"UPDATE {audit.TABLE} SET actor = 'someone else' WHERE seq = 2")
        groups = _row_groups(con, BATCHES)

    @dg.asset(required_resource_keys={"haven"})
    def reads_the_store(context) -> int:  # unannotated: Dagster cannot read an annotation held as a string
        with context.resources.haven.connect(read_only=True) as con:
            return _row_groups(con, BATCHES)

    result = dg.materialize([reads_the_store], resources={"haven": SafeHavenResource()}, raise_on_error=False)
    assert not result.success
    with store.connect(read_only=True) as con:
        assert _row_groups(con, BATCHES) == groups == compaction.SLACK + 2
