"""One schema module declares every fixed store table (issue 13; ``safehaven.core.schema``)."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from safehaven.core import schema
from safehaven.core.store import ZONES, Store, table_exists

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_MODULE = ROOT / "safehaven" / "core" / "schema.py"

#: ``CREATE [OR REPLACE] [TEMP|TEMPORARY] TABLE [IF NOT EXISTS] <name>`` and what follows the name
_CREATE = re.compile(
    r"CREATE\s+(?P<replace>OR\s+REPLACE\s+)?(?P<temp>(?:TEMP|TEMPORARY)\s+)?TABLE\s+"
    r"(?P<ine>IF\s+NOT\s+EXISTS\s+)?(?P<name>(?:[\w.\"]|\{[^{}]*\})+)\s*(?P<next>\(|AS\b)?",
    re.IGNORECASE,
)
#: a name built from data: ``<zone>.{<expression>}...`` (a contract's collection, not a constant)
_FROM_DATA = re.compile(r"(?P<zone>\w+)\.\{(?![A-Z_]+\})[^{}]+\}")


def _catalog(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Every table and view of the store, by qualified name, with its SQL."""
    rows = con.execute(
        "SELECT schema_name || '.' || table_name, sql FROM duckdb_tables() WHERE database_name = current_database() "
        "UNION ALL SELECT schema_name || '.' || view_name, sql FROM duckdb_views() "
        "WHERE database_name = current_database() AND NOT internal"
    ).fetchall()
    return dict(rows)


def test_ensure_creates_every_declared_table_once(store: Store) -> None:
    with store.connect() as con:
        assert not set(schema.TABLES) & set(_catalog(con))
        schema.ensure(con, *schema.TABLES)
        first = _catalog(con)
        assert set(schema.TABLES) <= set(first)
        for name in schema.TABLES:
            assert table_exists(con, *name.split(".")), name
        schema.ensure(con, *schema.TABLES)
        assert _catalog(con) == first
    with store.connect() as con:  # and in a later connection: nothing to do
        schema.ensure(con, *reversed(schema.TABLES))
        assert _catalog(con) == first


def test_ensure_is_one_catalog_query_when_all_exist(store: Store) -> None:
    class Counting:
        def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
            self.con, self.sql = con, []

        def execute(self, sql: str, params: object = None) -> duckdb.DuckDBPyConnection:
            self.sql.append(sql)
            return self.con.execute(sql, params)

    with store.connect() as con:
        schema.ensure(con, *schema.TABLES)
        counting = Counting(con)
        schema.ensure(counting, *schema.TABLES)  # type: ignore[arg-type]
        # one catalog query, which also tells the columns the migrations need
        assert len(counting.sql) == 1
        assert counting.sql[0].startswith("SELECT") and "duckdb_columns()" in counting.sql[0]
        counting.sql.clear()
        schema.ensure(counting, schema.BREACH_REGISTER)  # type: ignore[arg-type]
        assert len(counting.sql) == 1
        assert "pragma_table_info" in counting.sql[0]  # a few tables: each looked up in the catalog directly


def test_tables_looked_up_one_by_one_answer_as_the_catalog_scan(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two ways ``ensure`` asks the catalog agree: on a table present, one missing, a view, and a
    table lacking a column a migration adds."""
    wanted = schema._closure([schema.RELEASE_AUDIT_HEADS, schema.BATCHES, schema.BREACH_REGISTER])
    assert len(wanted) > schema.LOOKED_UP_AT_MOST
    with store.connect() as con:
        schema.ensure(con, schema.RELEASE_AUDIT_HEADS, schema.BATCHES)
        migrated = schema.TABLES[schema.BATCHES].added[0].split()[0]
        con.execute(f"ALTER TABLE {schema.BATCHES} DROP COLUMN {migrated}")
        scanned = schema._catalog(con, wanted)
        monkeypatch.setattr(schema, "LOOKED_UP_AT_MOST", len(wanted))
        looked_up = schema._catalog(con, wanted)
    asked = {t.name for t in wanted if t.added or t.is_view}  # the tables whose columns ensure reads

    def meaning(pairs: set[tuple[str, str | None]]) -> tuple[set[str], set[tuple[str, str | None]]]:
        return {name for name, _ in pairs}, {(name, column) for name, column in pairs if name in asked}

    assert meaning(looked_up) == meaning(scanned)
    assert (schema.BATCHES, migrated) not in looked_up and schema.BREACH_REGISTER not in {n for n, _ in looked_up}
    assert (schema.RELEASE_REGISTER_PUBLIC, "release_id") in looked_up


def test_ensure_makes_a_views_tables_and_dependencies_in_order(store: Store) -> None:
    with store.connect() as con:
        schema.ensure(con, schema.RELEASE_AUDIT_HEADS)
        made = _catalog(con)
        assert {schema.RELEASE_AUDIT_HEADS, schema.RELEASE_REGISTER, schema.RELEASE_REGISTER_PUBLIC} <= set(made)
        assert schema.BREACH_REGISTER not in made
        assert con.execute(f"SELECT count(*) FROM {schema.RELEASE_REGISTER_PUBLIC}").fetchone() == (0,)


def test_ensure_refuses_an_undeclared_table(store: Store) -> None:
    with store.connect() as con, pytest.raises(KeyError, match="not a table declared"):
        schema.ensure(con, "governance.no_such_table")


def test_an_older_release_register_is_migrated_and_its_view_made_again(store: Store) -> None:
    added = schema.TABLES[schema.RELEASE_REGISTER].added
    assert added
    with store.connect() as con:
        schema.ensure(con, schema.RELEASE_AUDIT_HEADS)
        # an older store: the register (and its view) without the columns added since
        con.execute(f"DROP VIEW {schema.RELEASE_REGISTER_PUBLIC}")
        for column in added:
            con.execute(f"ALTER TABLE {schema.RELEASE_REGISTER} DROP COLUMN {column.split()[0]}")
        con.execute(schema.TABLES[schema.RELEASE_REGISTER_PUBLIC].ddl)
        schema.ensure(con, schema.RELEASE_REGISTER)
        columns = {
            name
            for (name,) in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE database_name = current_database() "
                "AND schema_name = 'governance' AND table_name = 'release_register_public'"
            ).fetchall()
        }
        assert {column.split()[0] for column in added} <= columns


def test_recreate_empties_a_table_rewritten_whole(store: Store) -> None:
    with store.connect() as con:
        schema.ensure(con, schema.CODE_LIST)
        con.execute(f"INSERT INTO {schema.CODE_LIST} VALUES ('l', 'c', 'd', 'g', 's', 'v')")
        schema.recreate(con, schema.CODE_LIST)
        assert con.execute(f"SELECT count(*) FROM {schema.CODE_LIST}").fetchone() == (0,)
        with pytest.raises(ValueError, match="view"):
            schema.recreate(con, schema.RELEASE_REGISTER_PUBLIC)


def test_every_declared_table_is_in_a_zone_and_says_what_it_holds() -> None:
    assert schema.TABLES
    for name, table in schema.TABLES.items():
        zone, _, rest = name.partition(".")
        assert zone in ZONES and re.fullmatch(r"[a-z][a-z0-9_]*", rest), name
        assert table.name == name and name in table.ddl
        assert table.doc and "\n" not in table.doc, name
        assert table.is_view or table.ddl.startswith(f"CREATE TABLE IF NOT EXISTS {name} ("), name
        for needed in table.needs:
            assert list(schema.TABLES).index(needed) < list(schema.TABLES).index(name), (name, needed)
    constants = {v for k, v in vars(schema).items() if k.isupper() and isinstance(v, str) and "." in v}
    assert constants == set(schema.TABLES)


def _sources() -> list[Path]:
    return sorted(p for d in ("safehaven", "assets", "resources") for p in (ROOT / d).rglob("*.py"))


def test_only_the_schema_module_declares_a_tables_columns() -> None:
    """No ``CREATE TABLE IF NOT EXISTS``, and no ``CREATE TABLE <name> (<columns>)``, outside the
    schema module, except for a name built from data in a module its docstring lists."""
    made_elsewhere = SCHEMA_MODULE.read_text()
    found, stray = 0, []
    for path in _sources():
        if path == SCHEMA_MODULE:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for match in _CREATE.finditer(path.read_text()):
            if match["temp"]:
                continue  # a connection's work table
            if not (match["ine"] or match["next"] == "("):
                continue  # CREATE [OR REPLACE] TABLE ... AS: a copy, shaped by its SELECT
            found += 1
            where = f"{path.relative_to(ROOT)}: {match[0]}"
            data = _FROM_DATA.match(match["name"])
            if not data or data["zone"] not in ZONES or f"``{module}" not in made_elsewhere:
                stray.append(where)
    assert found, "the scan found no CREATE TABLE at all: the pattern is broken"
    assert not stray, "declare these tables in safehaven/core/schema.py:\n" + "\n".join(stray)


def test_the_scan_catches_a_fixed_table_declared_elsewhere() -> None:
    for text in (
        'f"CREATE TABLE IF NOT EXISTS {EVENTS} (event_id BIGINT)"',
        '"CREATE TABLE governance.extra (a INT)"',
        'f"CREATE OR REPLACE TABLE {RATES} (a INT)"',
        '"CREATE TABLE IF NOT EXISTS governance.x AS SELECT 1"',
    ):
        match = _CREATE.search(text)
        assert match and not match["temp"] and (match["ine"] or match["next"] == "(")
        assert not _FROM_DATA.match(match["name"]), text
    match = _CREATE.search('f"CREATE TABLE IF NOT EXISTS landing.{c}_valid ({cols})"')
    assert match and _FROM_DATA.match(match["name"])
