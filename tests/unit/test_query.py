"""``safehaven query``: one read-only SELECT over published.duckdb, and nothing else.

Rules under test: ``safehaven.publish.query`` module docstring (``docs/rules.md`` "Users"; ``docs/design.md`` "Zones").
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import duckdb
import pytest
from click.testing import CliRunner

from safehaven.cli.main import main
from safehaven.publish.query import QueryRefused, format_result, run_query


def _manifest(path: Path) -> None:
    """``release.json`` beside ``path``, naming it with its SHA-256, as a publication writes it."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    (path.parent / "release.json").write_text(json.dumps({"release_id": "r1", "files": {"published.duckdb": sha}}))


@pytest.fixture
def published(tmp_path: Path) -> Path:
    """A published.duckdb with one table and its release's manifest, and a secret file beside it
    that must stay unreadable."""
    (tmp_path / "secret.csv").write_text("nhs_number\n9434765919\n")
    other = tmp_path / "store.duckdb"
    c = duckdb.connect(str(other))
    c.execute("CREATE TABLE vault AS SELECT '9434765919' AS nhs_number")
    c.close()
    path = tmp_path / "published.duckdb"
    c = duckdb.connect(str(path))
    c.execute(
        "CREATE TABLE hospital_admissions AS SELECT * FROM (VALUES "
        "(DATE '2026-01-01', 'RX1', 10, false), (DATE '2026-01-01', 'RY2', NULL, true), "
        "(DATE '2026-02-01', 'RX1', 25, false)) t(month, provider_code, people, suppressed)"
    )
    c.close()
    _manifest(path)
    return path


def test_a_select_runs_and_prints_a_table(published: Path) -> None:
    result = run_query(
        published, "SELECT provider_code, sum(people) AS people FROM hospital_admissions GROUP BY ALL ORDER BY 1"
    )
    assert result.columns == ["provider_code", "people"]
    assert result.rows == [("RX1", 35), ("RY2", None)]
    text = format_result(result)
    assert text.splitlines()[0].split() == ["provider_code", "people"]
    assert "(2 rows)" in text
    assert format_result(result, "csv") == "provider_code,people\nRX1,35\nRY2,\n"
    assert json.loads(format_result(result, "json")) == [
        {"provider_code": "RX1", "people": 35},
        {"provider_code": "RY2", "people": None},
    ], "--format json is one JSON document"
    lines = format_result(result, "jsonl").splitlines()
    assert [json.loads(line) for line in lines][0] == {"provider_code": "RX1", "people": 35}


@pytest.mark.parametrize(
    "sql",
    [
        "FROM hospital_admissions",
        "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
        "SHOW TABLES",
        "DESCRIBE hospital_admissions",
        "SELECT 1;",
    ],
)
def test_query_forms_are_allowed(published: Path, sql: str) -> None:
    assert run_query(published, sql).columns


@pytest.mark.parametrize(
    ("sql", "why"),
    [
        ("SELECT 1; SELECT 2", "exactly one statement"),
        ("SELECT 1; DROP TABLE hospital_admissions", "exactly one statement"),
        ("DELETE FROM hospital_admissions", "not DELETE"),
        ("INSERT INTO hospital_admissions VALUES (NULL, NULL, NULL, NULL)", "not INSERT"),
        ("CREATE TABLE t AS SELECT 1", "not CREATE"),
        ("ATTACH 'store.duckdb' AS s", "not ATTACH"),
        ("COPY hospital_admissions TO 'out.csv'", "not COPY"),
        ("SET enable_external_access = true", "not SET"),
        ("PRAGMA threads = 1", "not SET"),
        ("CALL pragma_version()", "not CALL"),
        ("EXPLAIN SELECT 1", "not EXPLAIN"),
        ("INSTALL httpfs", "not"),
        ("SELEC 1", "does not parse"),
    ],
)
def test_anything_but_one_query_is_refused_before_it_runs(published: Path, sql: str, why: str) -> None:
    with pytest.raises(QueryRefused, match=why):
        run_query(published, sql)
    assert run_query(published, "SELECT count(*) FROM hospital_admissions").rows == [(3,)]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('{dir}/secret.csv')",
        "SELECT * FROM '{dir}/secret.csv'",
        "SELECT * FROM read_text('{dir}/secret.csv')",
        "SELECT * FROM read_blob('/etc/hostname')",
        "SELECT * FROM glob('{dir}/*')",
        "SELECT * FROM read_parquet('{dir}/x.parquet')",
        "SELECT * FROM query('ATTACH ''{dir}/store.duckdb'' AS s')",
    ],
)
def test_a_query_cannot_read_other_files_or_the_store(published: Path, sql: str) -> None:
    with pytest.raises(QueryRefused) as refused:
        run_query(published, sql.format(dir=published.parent))
    assert "9434765919" not in str(refused.value)


def test_the_configuration_is_locked(published: Path) -> None:
    result = run_query(
        published,
        "SELECT name, value FROM duckdb_settings() WHERE name IN "
        "('enable_external_access', 'lock_configuration') ORDER BY 1",
    )
    assert result.rows == [("enable_external_access", "false"), ("lock_configuration", "true")]


def test_the_file_is_opened_read_only(published: Path) -> None:
    result = run_query(published, "SELECT readonly FROM duckdb_databases() WHERE database_name = 'published'")
    assert result.rows == [(True,)]


def test_rows_are_capped_and_long_queries_stopped(published: Path) -> None:
    result = run_query(published, "SELECT * FROM range(50)", max_rows=10)
    assert len(result.rows) == 10 and result.truncated
    assert "truncated" in format_result(result)
    with pytest.raises(QueryRefused, match="longer than"):
        run_query(published, "SELECT count(*) FROM range(100000) a, range(100000) b, range(1000) c", timeout=0.3)


def test_missing_database_is_a_clear_refusal(tmp_path: Path) -> None:
    with pytest.raises(QueryRefused, match="run the pipeline"):
        run_query(tmp_path / "published.duckdb", "SELECT 1")


def test_cli_prints_a_table_and_refuses_with_exit_code_1(published: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(
        main, ["query", "--db", str(published), "SELECT provider_code FROM hospital_admissions ORDER BY 1 LIMIT 1"]
    )
    assert ok.exit_code == 0, ok.output
    assert "provider_code" in ok.output and "RX1" in ok.output
    refused = runner.invoke(main, ["query", "--db", str(published), "DROP TABLE hospital_admissions"])
    assert refused.exit_code == 1
    assert "query refused" in refused.output and "Traceback" not in refused.output
    store = runner.invoke(
        main, ["query", "--db", str(published), f"SELECT * FROM read_csv('{published.parent / 'secret.csv'}')"]
    )
    assert store.exit_code == 1 and "9434765919" not in store.output


# --- only the release's own file (fail closed) ----------------------------------------------------


def test_a_database_altered_after_its_release_is_refused_before_it_is_opened(published: Path) -> None:
    """A suppressed cell rewritten as a small count (an insider with write access to published/,
    no key): the file is no longer the one release.json records, so nothing is served from it."""
    c = duckdb.connect(str(published))
    c.execute("UPDATE hospital_admissions SET people = 3, suppressed = false WHERE suppressed")
    c.close()
    with pytest.raises(QueryRefused) as refused:
        run_query(published, "SELECT people FROM hospital_admissions WHERE provider_code = 'RY2'")
    assert "differs from the release it belongs to" in str(refused.value)
    assert "do not use it" in str(refused.value) and "governance lead is told at the next run" in str(refused.value)
    cli = CliRunner().invoke(main, ["query", "--db", str(published), "SELECT 1"])
    assert cli.exit_code == 1 and "differs from the release it belongs to" in cli.output


def test_a_database_without_its_manifest_or_not_listed_in_it_is_refused(published: Path) -> None:
    manifest = published.parent / "release.json"
    manifest.write_text(json.dumps({"release_id": "r1", "files": {}}))
    with pytest.raises(QueryRefused, match="does not list published.duckdb"):
        run_query(published, "SELECT 1")
    manifest.write_text("{not json")
    with pytest.raises(QueryRefused, match="cannot be checked against the release"):
        run_query(published, "SELECT 1")
    manifest.unlink()
    with pytest.raises(QueryRefused, match="release.json beside it is missing"):
        run_query(published, "SELECT 1")


def test_a_write_ahead_log_planted_beside_the_database_is_refused(published: Path, tmp_path: Path) -> None:
    """DuckDB replays a ``.wal`` beside a database even read-only: the bytes checked against the
    manifest would not be what is served, so a log beside it refuses the query."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(published, work / "published.duckdb")
    c = duckdb.connect(str(work / "published.duckdb"))
    c.execute("SET checkpoint_threshold = '1GB'")
    c.execute("PRAGMA disable_checkpoint_on_shutdown")
    c.execute("UPDATE hospital_admissions SET people = 3, suppressed = false WHERE suppressed")
    shutil.copyfile(work / "published.duckdb.wal", tmp_path / "published.duckdb.wal")
    c.close()
    assert hashlib.sha256(published.read_bytes()).hexdigest() in (published.parent / "release.json").read_text()
    with pytest.raises(QueryRefused, match="write-ahead log"):
        run_query(published, "SELECT people FROM hospital_admissions WHERE provider_code = 'RY2'")
