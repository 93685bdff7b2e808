"""The output-SQL gate: one read-only SELECT over the output's haven tables, refused otherwise.

Rules under test: ``safehaven.publish.sql_gate`` module docstring (CoP 22, 28-29, 34b, 42b;
Caldicott principle 3). A declaration whose SQL does anything else, or counts its people
measure as anything but distinct haven pseudonyms, is refused when it loads, naming the file and
the problem; the SQL that runs does so in a transaction that cannot write, and a failure names the
output and DuckDB's error class, never a value.
"""

from __future__ import annotations

import traceback
from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from assets.counts import counts_asset
from resources.haven import SafeHavenResource
from safehaven.core import audit
from safehaven.core.store import Store, table_exists
from safehaven.intake.contracts import ContractRegistry, contracts_dir
from safehaven.publish.outputs import Output, OutputError, build_output, load_output, load_outputs, outputs_dir
from safehaven.publish.sql_gate import (
    PEOPLE_COUNT,
    OutputSqlFailed,
    OutputSqlRefused,
    check_output_sql,
    read_only_transaction,
)
from tests.conftest import leaked_nhs_numbers

SHIPPED = "gp_activity"
GOOD_SQL = """SELECT m.month, e.practice_code, coalesce(d.grp, 'Unknown') AS diagnosis_group,
       age_band(e.birth_week, m.month) AS age_band, sex_category(g.grp) AS sex, count(DISTINCT e.pid) AS people
FROM haven.gp_events e
JOIN reporting_months m ON m.month = date_trunc('month', e.event_date)
LEFT JOIN codes('snomed_gp_diagnoses') d ON d.code = e.diagnosis_code
LEFT JOIN codes('person_gender') g ON g.code = e.sex
GROUP BY ALL"""


def declaration_with(tmp_path: Path, sql: str) -> Path:
    """A copy of a shipped declaration, in its own file, with ``sql`` as its SQL."""
    spec = yaml.safe_load((outputs_dir(contracts_dir()) / f"{SHIPPED}.yaml").read_text())
    spec["sql"] = sql
    path = tmp_path / f"{SHIPPED}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def refusal(tmp_path: Path, sql: str) -> str:
    """The one-line message with which loading the declaration is refused."""
    with pytest.raises(OutputError) as caught:
        load_output(declaration_with(tmp_path, sql))
    message = str(caught.value)
    assert "\n" not in message, "a refusal is one line"
    assert f"{SHIPPED}.yaml" in message, "the refusal names the file"
    return message


TODAY = date(2026, 3, 15)  # reporting period: January and February 2026
EPISODE_COLUMNS = (
    "pid VARCHAR, provider_code VARCHAR, admission_date DATE, discharge_date DATE, primary_diagnosis VARCHAR"
)
ADMISSIONS_SQL = """SELECT m.month, h.provider_code, count(DISTINCT h.pid) AS people
FROM haven.hospital_episodes h
JOIN counting_months m ON m.month = date_trunc('month', h.admission_date)
GROUP BY ALL"""
#: A domain that converts every provider code to a number (fails on a code that is not one).
CAST_DOMAIN = "SELECT DISTINCT CAST(CAST(provider_code AS INTEGER) AS VARCHAR) FROM haven.hospital_episodes"


def seed_episodes(con: duckdb.DuckDBPyConnection) -> None:
    """40 people admitted at RX1 in January and again in February (pids ``md5('0')`` ...)."""
    for day in ("2026-01-05", "2026-02-05"):
        con.execute(
            "INSERT INTO haven.hospital_episodes SELECT md5(i::VARCHAR), 'RX1', CAST(? AS DATE), CAST(? AS DATE) + 3, "
            "'A01' FROM range(40) t(i)",
            [day, day],
        )


def haven_with_episodes() -> duckdb.DuckDBPyConnection:
    """A bare connection with the zones ``build_output`` uses and seeded ``haven.hospital_episodes``."""
    con = duckdb.connect()
    for zone in ("haven", "published", "governance"):
        con.execute(f"CREATE SCHEMA {zone}")
    con.execute(f"CREATE TABLE haven.hospital_episodes ({EPISODE_COLUMNS})")
    seed_episodes(con)
    return con


def admissions_output(sql: str, provider_domain: object = "observed") -> Output:
    """People admitted by month and provider, counted by ``sql``."""
    return Output.model_validate(
        {
            "name": "adm",
            "version": "1.0.0",
            "title": "People admitted",
            "description": "Distinct people admitted in the month.",
            "purpose": "test",
            "users": ["test"],
            "collections": ["hospital_episodes"],
            "dimensions": [
                {"name": "month", "description": "month", "domain": "reporting_months"},
                {"name": "provider_code", "description": "provider", "domain": provider_domain},
            ],
            "measures": [{"name": "people", "description": "Distinct people admitted"}],
            "zeros": {"publish": True, "structural": []},
            "sql": sql,
        }
    )


def test_a_second_statement_is_refused_when_the_declaration_loads(tmp_path: Path) -> None:
    message = refusal(tmp_path, GOOD_SQL + ";\nDROP TABLE haven.gp_events")
    assert "2 statements" in message


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("DROP TABLE haven.gp_events", "DROP"),
        ("INSERT INTO haven.gp_events SELECT * FROM haven.gp_events", "INSERT"),
        ("UPDATE haven.gp_events SET sex = '1'", "UPDATE"),
        ("DELETE FROM haven.gp_events", "DELETE"),
        ("CREATE TABLE haven.copy AS SELECT * FROM haven.gp_events", "CREATE"),
        ("COPY haven.gp_events TO 'out.csv'", "COPY"),
        ("PRAGMA database_list", "PRAGMA"),
        ("SET threads = 1", "SET"),
        ("INSTALL httpfs", "INSTALL"),
        ("LOAD httpfs", "LOAD"),
        ("CALL pragma_version()", "CALL"),
        ("DETACH store", "DETACH"),
    ],
)
def test_a_write_ddl_or_command_is_refused(tmp_path: Path, sql: str, kind: str) -> None:
    message = refusal(tmp_path, sql)
    assert f"runs {kind}, not a SELECT" in message


def test_an_attach_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, "ATTACH '/tmp/other.duckdb' AS other")
    assert "runs ATTACH, not a SELECT" in message


def test_an_export_is_refused(tmp_path: Path) -> None:
    assert "cannot be parsed as one DuckDB SELECT" in refusal(tmp_path, "EXPORT DATABASE '/tmp/out'")


@pytest.mark.parametrize(
    ("sql", "function"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
        ("SELECT * FROM read_csv_auto('x.csv')", "read_csv_auto"),
        ("SELECT * FROM read_parquet('x.parquet')", "read_parquet"),
        ("SELECT * FROM read_json_auto('x.json')", "read_json_auto"),
        ("SELECT * FROM read_text('/etc/passwd')", "read_text"),
        ("SELECT * FROM read_blob('x')", "read_blob"),
        ("SELECT * FROM glob('/*')", "glob"),
        ("SELECT * FROM parquet_scan('x.parquet')", "parquet_scan"),
        ("SELECT * FROM sniff_csv('x.csv')", "sniff_csv"),
        ("SELECT * FROM query('SELECT * FROM landing.gp_events')", "query"),
        ("SELECT getenv('HOME') AS home FROM haven.gp_events", "getenv"),
        ("SELECT e.pid FROM haven.gp_events e WHERE e.pid IN (SELECT content FROM read_text('x'))", "read_text"),
    ],
)
def test_a_function_that_reads_files_is_refused(tmp_path: Path, sql: str, function: str) -> None:
    message = refusal(tmp_path, sql)
    assert f"calls {function}()" in message


def test_a_table_function_outside_the_allow_list_is_refused() -> None:
    with pytest.raises(OutputSqlRefused, match=r"reads from duckdb_tables\(\)|calls duckdb_tables\(\)"):
        check_output_sql("SELECT * FROM duckdb_tables()", ["gp_events"])
    with pytest.raises(OutputSqlRefused, match=r"reads from my_macro\(\); the table functions allowed are codes"):
        check_output_sql("SELECT * FROM my_macro(1)", ["gp_events"])


@pytest.mark.parametrize(
    ("sql", "table"),
    [
        ("SELECT * FROM landing.gp_events", "landing.gp_events"),
        ("SELECT * FROM vault.identity", "vault.identity"),
        ("SELECT * FROM governance.objection", "governance.objection"),
        ("SELECT * FROM store.haven.gp_events", "store.haven.gp_events"),
        ("SELECT * FROM gp_events", "gp_events"),
        ("SELECT * FROM 'landing.csv'", "landing.csv"),
        ("SELECT e.pid FROM haven.gp_events e JOIN landing.gp_events l ON l.pid = e.pid", "landing.gp_events"),
    ],
)
def test_a_table_outside_the_haven_zone_is_refused(tmp_path: Path, sql: str, table: str) -> None:
    message = refusal(tmp_path, sql)
    assert f"reads {table}, outside the haven zone" in message


def test_a_haven_table_the_output_does_not_declare_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, "SELECT s.pid FROM haven.social_care s")
    assert "reads haven.social_care, which is not one of the output's collections" in message


def test_a_cte_out_of_its_scope_is_a_table_and_refused() -> None:
    sql = "SELECT * FROM (WITH b AS (SELECT 1) SELECT * FROM b) x, b"
    with pytest.raises(OutputSqlRefused, match="reads b, outside the haven zone"):
        check_output_sql(sql, ["gp_events"])


def test_a_domain_sql_is_gated_too(tmp_path: Path) -> None:
    spec = yaml.safe_load((outputs_dir(contracts_dir()) / f"{SHIPPED}.yaml").read_text())
    spec["dimensions"][1]["domain"] = {"sql": "SELECT practice_code FROM landing.gp_events"}
    path = tmp_path / f"{SHIPPED}.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(OutputError, match=r"gp_activity\.yaml: .*domain of dimension practice_code reads landing"):
        load_output(path)


def test_every_shipped_output_passes_the_gate() -> None:
    paths = sorted(outputs_dir(contracts_dir()).glob("*.yaml"))
    assert paths, "the project ships output declarations"
    for path in paths:
        output = load_output(path)  # the gate runs in the model: loading is passing
        check_output_sql(output.sql, output.collections)
    assert set(load_outputs(ContractRegistry())) == {p.stem for p in paths}


def test_the_haven_helpers_stay_usable() -> None:
    check_output_sql(GOOD_SQL, ["gp_events"])
    check_output_sql(
        "WITH d AS (SELECT e.pid, m.month FROM haven.gp_events e JOIN reporting_months m ON TRUE) "
        "SELECT DISTINCT v FROM (SELECT unnest(['a']) UNION ALL SELECT month FROM d) s(v)",
        ["gp_events"],
    )
    check_output_sql("SELECT * FROM generate_series(1, 3) UNION ALL SELECT * FROM range(3)", ["gp_events"])


def test_the_output_sql_runs_in_a_transaction_that_cannot_write_the_store(store: Store) -> None:
    """Defence in depth: SQL that reached the run unchecked still cannot write the encrypted store."""
    with store.connect() as con:
        con.execute("CREATE TABLE haven.gp_events (pid VARCHAR)")
        con.execute("INSERT INTO haven.gp_events VALUES ('p1')")
        with pytest.raises(Exception, match="read-only mode"), read_only_transaction(con):
            con.execute("CREATE TEMP TABLE allowed AS SELECT * FROM haven.gp_events")  # temp: allowed
            con.execute("DROP TABLE haven.gp_events")
        assert table_exists(con, "haven", "gp_events")
        assert con.execute("SELECT count(*) FROM haven.gp_events").fetchone() == (1,)


def test_a_build_with_ungated_sql_cannot_drop_a_table(store: Store) -> None:
    """An output whose SQL escaped the gate (copied without validation) still cannot drop a haven table."""
    registry = ContractRegistry()
    output = load_output(outputs_dir(contracts_dir()) / "social_care_users.yaml")
    smuggled = output.model_copy(update={"sql": output.sql + ";\nDROP TABLE haven.social_care"})
    with store.connect() as con:
        con.execute(
            "CREATE TABLE haven.social_care (pid VARCHAR, local_authority_code VARCHAR, service_type VARCHAR, "
            "start_date DATE, end_date DATE)"
        )
        con.execute("INSERT INTO haven.social_care VALUES ('p1', 'E06000001', 'A', DATE '2026-01-05', NULL)")
        with pytest.raises(Exception, match="read-only mode"):
            build_output(con, smuggled, registry, today=date(2026, 3, 15))
        assert table_exists(con, "haven", "social_care")
        assert con.execute("SELECT count(*) FROM haven.social_care").fetchone() == (1,)


@pytest.mark.parametrize(
    ("sql", "what"),
    [
        (  # the period's end read from the months being counted: a month counted alone would lose cells
            "SELECT m.month, count(DISTINCT h.pid) AS people FROM haven.hospital_episodes h JOIN counting_months m "
            "ON m.month = date_trunc('month', h.discharge_date) "
            "WHERE m.month_end + 14 <= (SELECT max(month_end) FROM counting_months) GROUP BY ALL",
            "sql",
        ),
        (
            "SELECT 1 FROM haven.hospital_episodes h WHERE date_trunc('month', h.discharge_date) IN "
            "(SELECT month FROM counting_months)",
            "sql",
        ),
        ("SELECT month FROM counting_months", "the domain of dimension month"),
    ],
)
def test_counting_months_is_read_only_as_a_joined_table_of_the_count(sql: str, what: str) -> None:
    with pytest.raises(OutputSqlRefused, match="counting_months (as a value|in a domain).*join it for the month"):
        check_output_sql(sql, ["hospital_episodes"], what=what)
    joined = "FROM haven.hospital_episodes h JOIN counting_months m ON m.month = date_trunc('month', h.discharge_date)"
    for allowed in (  # a CTE, a union of two joined sources, a derived table
        f"WITH d AS (SELECT h.pid, m.month {joined} WHERE m.month_end + 14 <= "
        "(SELECT max(month_end) FROM reporting_months)) "
        "SELECT month, count(DISTINCT pid) AS people FROM d GROUP BY ALL",
        f"WITH d AS (SELECT h.pid, m.month {joined} UNION ALL SELECT h.pid, m.month {joined}) "
        "SELECT month, count(DISTINCT pid) AS people FROM d GROUP BY ALL",
        f"SELECT month, count(DISTINCT pid) AS people FROM (SELECT h.pid, m.month {joined}) d GROUP BY ALL",
    ):
        check_output_sql(allowed, ["hospital_episodes"])


# --- the people measure: count(DISTINCT <alias>.pid) of a haven table ---------------------------------

MONTHLY = "FROM haven.gp_events e JOIN counting_months m ON m.month = date_trunc('month', e.event_date)"


@pytest.mark.parametrize(
    "sql",
    [
        f"SELECT m.month, count(*) AS people {MONTHLY} GROUP BY ALL",  # records, not people
        f"SELECT m.month, count(e.pid) AS people {MONTHLY} GROUP BY ALL",
        f"SELECT m.month, approx_count_distinct(e.pid) AS people {MONTHLY} GROUP BY ALL",
        f"SELECT m.month, count(DISTINCT e.pid) + 3 AS people {MONTHLY} GROUP BY ALL",
        f"SELECT m.month, count(DISTINCT e.practice_code) AS people {MONTHLY} GROUP BY ALL",
        f"SELECT m.month, count(DISTINCT (e.pid, e.event_date)) AS people {MONTHLY} GROUP BY ALL",
        f"SELECT m.month, count(DISTINCT e.pid) OVER () AS people {MONTHLY}",
        # the count made inside, the outer SELECT passing on a number
        f"SELECT month, people FROM (SELECT m.month, count(*) AS people {MONTHLY} GROUP BY ALL) c",
        f"SELECT * FROM (SELECT m.month, count(DISTINCT e.pid) AS people {MONTHLY} GROUP BY ALL) c",
        # a "pid" that is another column, or not only the haven's
        f"WITH d AS (SELECT e.practice_code AS pid, m.month {MONTHLY}) "
        "SELECT d.month, count(DISTINCT d.pid) AS people FROM d GROUP BY ALL",
        f"WITH d AS (SELECT e.pid, m.month {MONTHLY} UNION ALL SELECT CAST(i AS VARCHAR), DATE '2026-01-01' "
        "FROM range(9) t(i)) SELECT d.month, count(DISTINCT d.pid) AS people FROM d GROUP BY ALL",
        f"SELECT d.month, count(DISTINCT d.pid) AS people FROM (SELECT e.practice_code, e.pid, m.month {MONTHLY}) "
        "d(pid, other, month) GROUP BY ALL",
        "SELECT count(DISTINCT e.pid) AS people FROM haven.gp_events AS e(practice_code, pid)",
        "SELECT count(DISTINCT e.pid) AS people FROM haven.gp_events e UNPIVOT (pid FOR k IN (practice_code))",
        "SELECT count(DISTINCT t.pid) AS people FROM haven.gp_events e, range(9) t(pid)",
        "SELECT count(DISTINCT pid) AS people FROM haven.gp_events e, range(9) t(pid)",  # which pid?
        f"SELECT m.month, count(DISTINCT e.pid) AS people {MONTHLY} GROUP BY ALL "
        f"UNION ALL SELECT m.month, count(*) AS people {MONTHLY} GROUP BY ALL",
    ],
)
def test_a_count_column_that_is_not_distinct_haven_pseudonyms_is_refused_naming_the_file(
    tmp_path: Path, sql: str
) -> None:
    """The threshold is applied to whatever the count column holds: anything but distinct haven
    pseudonyms (records, an approximation, an arithmetic, another column renamed ``pid``) would
    publish a cell of a few people as a larger number, unsuppressed."""
    message = refusal(tmp_path, sql)
    assert "count column people" in message and PEOPLE_COUNT in message


def test_one_person_with_many_episodes_is_refused_as_a_count_of_people_and_suppressed_once_counted_right() -> None:
    """The reviewer's case: ``count(*) AS people`` published one person with 12 episodes as people = 10,
    unsuppressed. The definition is refused when it loads; counted as distinct people, the cell is
    suppressed."""
    con = haven_with_episodes()
    con.execute(  # one person, 12 episodes, at RZZ in January; 30 other people there in February
        "INSERT INTO haven.hospital_episodes SELECT md5('lonely'), 'RZZ', DATE '2026-01-01' + i::INT, "
        "DATE '2026-01-02' + i::INT, 'C50' FROM range(12) t(i)"
    )
    con.execute(
        "INSERT INTO haven.hospital_episodes SELECT md5('f' || i::VARCHAR), 'RZZ', DATE '2026-02-03', "
        "DATE '2026-02-04', 'A01' FROM range(30) t(i)"
    )
    episodes = ADMISSIONS_SQL.replace("count(DISTINCT h.pid)", "count(*)")
    with pytest.raises(ValueError, match=r"defines its count column people as COUNT\(\*\): an output counts people"):
        admissions_output(episodes)
    built = build_output(con, admissions_output(ADMISSIONS_SQL), ContractRegistry(), today=TODAY)
    cell = con.execute(
        f"SELECT people, suppressed FROM {built.table} WHERE provider_code = 'RZZ' AND month = DATE '2026-01-01'"
    ).fetchone()
    assert cell == (None, True)


@pytest.mark.parametrize(
    ("sql", "collections"),
    [
        (f"SELECT m.month, count(DISTINCT pid) AS people {MONTHLY} GROUP BY ALL", ["gp_events"]),
        (
            "SELECT m.month, count(DISTINCT haven.gp_events.pid) AS people FROM haven.gp_events JOIN counting_months m "
            "ON m.month = date_trunc('month', event_date) GROUP BY ALL",
            ["gp_events"],
        ),
        (
            f"WITH d AS (SELECT e.pid AS person, m.month {MONTHLY}) "
            "SELECT d.month, count(DISTINCT d.person) AS people FROM d GROUP BY ALL",
            ["gp_events"],
        ),
        (
            f"SELECT d.month, count(DISTINCT d.pid) AS people FROM (SELECT e.pid, m.month {MONTHLY}) d GROUP BY ALL",
            ["gp_events"],
        ),
        (
            "WITH d AS (SELECT h.pid FROM haven.hospital_episodes h UNION ALL SELECT s.pid FROM haven.social_care s) "
            "SELECT count(DISTINCT d.pid) AS people FROM d",
            ["hospital_episodes", "social_care"],
        ),
    ],
)
def test_distinct_haven_pseudonyms_are_a_count_of_people_directly_or_passed_on_unchanged(
    sql: str, collections: list[str]
) -> None:
    check_output_sql(sql, collections, counts=["people"])


#: A denominator that is one person's exact admission date (days since 2000, times 5: rounding keeps it).
DATE_AS_DENOMINATOR = "CAST(max(e.event_date) - DATE '2000-01-01' AS BIGINT) * 5"


@pytest.mark.parametrize(
    "denominator",
    [DATE_AS_DENOMINATOR, "count(*)", "count(DISTINCT e.practice_code)", "count(DISTINCT e.pid) * 5"],
)
def test_a_denominator_that_is_not_distinct_haven_pseudonyms_is_refused_naming_the_file(
    tmp_path: Path, denominator: str
) -> None:
    """Found by review: only the count column was checked, so a denominator ``(max(date) - 2000-01-01)
    in days * 5`` published the exact admission date of a lone person whose count was suppressed. Every
    people measure (the count and each denominator) is ``count(DISTINCT <alias>.pid)`` of a haven table."""
    path = declaration_with(tmp_path, GOOD_SQL.replace(" AS people", f" AS people, {denominator} AS population"))
    spec = yaml.safe_load(path.read_text())
    spec["measures"] += [
        {"name": "population", "kind": "denominator", "description": "people registered"},
        {"name": "rate", "kind": "rate", "denominator": "population", "description": "people per person"},
    ]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(OutputError) as caught:
        load_output(path)
    message = str(caught.value)
    assert f"{SHIPPED}.yaml" in message and "\n" not in message
    assert "count column population" in message and PEOPLE_COUNT in message
    spec["sql"] = GOOD_SQL.replace(" AS people", " AS people, count(DISTINCT e.pid) AS population")
    path.write_text(yaml.safe_dump(spec))
    assert load_output(path).people_measures == ["people", "population"]


def test_every_shipped_output_counts_distinct_haven_pseudonyms() -> None:
    for path in sorted(outputs_dir(contracts_dir()).glob("*.yaml")):
        output = load_output(path)
        check_output_sql(output.sql, output.collections, counts=output.people_measures)


# --- no value of the haven in a failure's message ----------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        "error(e.pid)",
        "ERROR(e.pid)",
        '"error"(e.pid)',
        "main.error(e.pid)",
        "(e.pid).error()",
        "(SELECT error(string_agg(x.pid, ';')) FROM haven.gp_events x)",
    ],
)
def test_a_function_that_raises_a_message_of_its_own_is_refused(tmp_path: Path, call: str) -> None:
    """``error()`` raises with the caller's text: the haven's rows, in the step failure and the event log."""
    message = refusal(tmp_path, f"SELECT m.month, count(DISTINCT e.pid) AS people {MONTHLY} WHERE {call} IS NULL")
    assert "calls error()" in message


#: A value of the haven that DuckDB quotes when it fails to convert it: a 999-range NHS number as a provider code.
SEEDED = "999 000 0018"
FAILING_CAST = ADMISSIONS_SQL.replace("GROUP BY ALL", "WHERE CAST(h.provider_code AS INTEGER) > 0 GROUP BY ALL")


def withheld(failure: pytest.ExceptionInfo[OutputSqlFailed], output: str, what: str) -> str:
    """The failure's message, checked to name the output, what failed and the error class, and no value."""
    message = str(failure.value)
    shown = "".join(traceback.format_exception(failure.value))  # as a log or Dagster prints it, chain included
    assert message.startswith(f"{output}: {what}") and "failed at run time (ConversionException)" in message
    assert "run the output's SQL by hand on a copy of the store" in message and "\n" not in message
    assert SEEDED not in shown and "9990000018" not in shown and "Could not convert" not in shown
    return message


def test_output_sql_failing_on_a_value_names_the_output_and_the_error_class_never_the_value() -> None:
    """A cast that fails puts the value into DuckDB's message; the haven's error withholds it."""
    con = haven_with_episodes()
    con.execute(f"UPDATE haven.hospital_episodes SET provider_code = '{SEEDED}' WHERE pid = md5('0')")
    with pytest.raises(OutputSqlFailed) as failure:
        build_output(con, admissions_output(FAILING_CAST), ContractRegistry(), today=TODAY)
    withheld(failure, "adm", "its SQL")


def test_a_domain_sql_failing_on_a_value_names_the_output_never_the_value() -> None:
    con = haven_with_episodes()
    con.execute(f"UPDATE haven.hospital_episodes SET provider_code = '{SEEDED}' WHERE pid = md5('0')")
    output = admissions_output(ADMISSIONS_SQL, provider_domain={"sql": CAST_DOMAIN})
    with pytest.raises(OutputSqlFailed) as failure:
        build_output(con, output, ContractRegistry(), today=TODAY)
    withheld(failure, "adm", "its build")


def test_a_counts_step_failing_on_a_value_leaves_it_out_of_the_dagster_event_log(
    store: Store, tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> None:
    """The counts asset runs the output's SQL (``counting._run_sql``): its failure names the output
    and the error class; no event of the run, and no file of the Dagster instance, holds the value."""
    with store.connect() as con:
        audit.begin_run(con, audit.home_of(con), actor="pipeline", job="test", run_id="test")  # a trail, then data
        con.execute(f"CREATE TABLE haven.hospital_episodes ({EPISODE_COLUMNS})")
        seed_episodes(con)
        con.execute(f"UPDATE haven.hospital_episodes SET provider_code = '{SEEDED}' WHERE pid = md5('0')")
    output = admissions_output(FAILING_CAST)
    result = dg.materialize(
        [counts_asset(output)],
        resources={"haven": SafeHavenResource(home=str(store.home.root))},
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not result.success
    logged = "\n".join(repr(entry) for entry in dagster_instance.all_logs(result.run_id))
    assert SEEDED not in logged and "Could not convert" not in logged
    assert leaked_nhs_numbers([tmp_path / "dagster_home"], {"9990000018"}) == {}
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "adm: its SQL failed at run time (ConversionException)" in str(failure.event_specific_data.error)
    assert "OutputSqlFailed" in logged, "the event log holds the failure, in the haven's words"
