"""Counting by month (``safehaven.publish.counting``): a month counted alone gives the rows it has
when every month is counted at once, stale counts are never read, and SQL that cannot count one
month alone is refused when asked to."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import duckdb
import pytest

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish import counting
from safehaven.publish.outputs import CODES, Output, install_helpers, load_code_lists, load_outputs, reporting_period
from tests.conftest import copy_haven

REGISTRY = ContractRegistry()
OUTPUTS = load_outputs(REGISTRY)


@pytest.fixture
def con(home: Home, populated_haven: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    copy_haven(populated_haven, home)
    with Store(home).connect() as connection:
        load_code_lists(connection, REGISTRY)
        yield connection


def prepared(con: duckdb.DuckDBPyConnection, output: Output) -> tuple[counting.Period, str]:
    """The output's period installed on ``con`` and the fingerprint of its current inputs."""
    period = reporting_period(con, output, REGISTRY)
    install_helpers(con, period)
    return period, counting.counting_fingerprint(con, output, period, "agreement", codes=CODES)


def rows(con: duckdb.DuckDBPyConnection, output: Output) -> list[tuple]:
    return con.execute(f"SELECT * FROM {counting.counts_table(output)} ORDER BY ALL").fetchall()


@pytest.mark.parametrize("name", sorted(OUTPUTS))
def test_each_month_counted_alone_gives_its_rows_of_the_whole_count(con: duckdb.DuckDBPyConnection, name: str) -> None:
    output = OUTPUTS[name]
    period, fingerprint = prepared(con, output)
    months = counting.period_months(period)
    assert len(months) >= 3, "the populated haven spans several months"
    whole = counting.count_months(con, output, period, fingerprint)
    assert whole.counted == months and whole.cells > 0
    everything = rows(con, output)
    for month in months:
        con.execute(f"DELETE FROM {counting.counts_table(output)} WHERE month = ?", [month])
        con.execute(f"DELETE FROM {counting.OUTPUT_COUNTS} WHERE output = ? AND month = ?", [name, month])
        assert counting.stale_months(con, output, period, fingerprint) == [month]
        alone = counting.count_months(con, output, period, fingerprint)
        assert alone.counted == [month], "only the missing month is counted"
        assert rows(con, output) == everything, month
    again = counting.count_months(con, output, period, fingerprint, [months[1]])
    assert again.counted == [months[1]] and rows(con, output) == everything, "a month asked for is counted again"


def test_counts_from_other_inputs_are_stale_and_never_read(con: duckdb.DuckDBPyConnection) -> None:
    output = OUTPUTS["hospital_admissions"]
    period, fingerprint = prepared(con, output)
    counting.count_months(con, output, period, fingerprint)
    counting.read_counts(con, output, period, fingerprint, "cells")
    con.execute("DELETE FROM haven.hospital_episodes WHERE pid IN (SELECT pid FROM haven.hospital_episodes LIMIT 1)")
    period, changed = prepared(con, output)
    assert changed != fingerprint
    assert counting.stale_months(con, output, period, changed) == counting.period_months(period)
    with pytest.raises(counting.CountError, match=r"hospital_admissions: the counts of \d+ month\(s\) .* not from"):
        counting.read_counts(con, output, period, changed, "cells")
    assert counting.count_months(con, output, period, changed).counted == counting.period_months(period)
    assert counting.read_counts(con, output, period, changed, "cells") > 0


def test_sql_that_ignores_counting_months_is_refused_a_month_alone_but_counts_the_whole_period(
    con: duckdb.DuckDBPyConnection,
) -> None:
    declared = OUTPUTS["hospital_admissions"]
    output = declared.model_copy(update={"sql": declared.sql.replace("counting_months", "reporting_months")})
    period, fingerprint = prepared(con, output)
    months = counting.period_months(period)
    assert counting.count_months(con, output, period, fingerprint).counted == months
    con.execute(f"DELETE FROM {counting.OUTPUT_COUNTS} WHERE output = ? AND month = ?", [output.name, months[0]])
    before = rows(con, output)
    with pytest.raises(counting.CountError, match="join counting_months"):
        counting.count_months(con, output, period, fingerprint)
    assert rows(con, output) == before, "nothing kept from a refused count"


def test_a_month_outside_the_period_is_refused_naming_it(con: duckdb.DuckDBPyConnection) -> None:
    output = OUTPUTS["gp_activity"]
    period, fingerprint = prepared(con, output)
    with pytest.raises(counting.CountError, match=r"gp_activity: month\(s\) 1999-01-01 are outside"):
        counting.count_months(con, output, period, fingerprint, [date(1999, 1, 1)])


def test_months_that_leave_the_period_leave_the_counts(con: duckdb.DuckDBPyConnection) -> None:
    output = OUTPUTS["hospital_admissions"]
    period, fingerprint = prepared(con, output)
    counting.count_months(con, output, period, fingerprint)
    first = counting.period_months(period)[0]
    shorter = counting.Period(date(first.year + (first.month == 12), first.month % 12 + 1, 1), period.end)
    install_helpers(con, shorter)
    counting.count_months(con, output, shorter, "other inputs")
    left = con.execute(f"SELECT min(month) FROM {counting.counts_table(output)}").fetchone()[0]
    assert left == shorter.start
    kept = con.execute(f"SELECT min(month) FROM {counting.OUTPUT_COUNTS} WHERE output = ?", [output.name]).fetchone()
    assert kept == (shorter.start,)


def test_kept_counts_edited_or_deleted_in_the_store_no_longer_match_their_seal_and_are_counted_again(
    con: duckdb.DuckDBPyConnection,
) -> None:
    output = OUTPUTS["hospital_admissions"]
    period, fingerprint = prepared(con, output)
    months = counting.period_months(period)
    counting.count_months(con, output, period, fingerprint)
    honest = rows(con, output)
    con.execute(f"UPDATE {counting.counts_table(output)} SET people = people + 50 WHERE month = ?", [months[0]])
    con.execute(f"DELETE FROM {counting.counts_table(output)} WHERE month = ?", [months[1]])
    assert counting.stale_months(con, output, period, fingerprint) == months[:2]
    with pytest.raises(counting.CountError, match=r"the counts of 2 month\(s\)"):
        counting.read_counts(con, output, period, fingerprint, "cells")
    report = counting.count_months(con, output, period, fingerprint)
    assert report.counted == months[:2] and report.broken == months[:2]
    assert rows(con, output) == honest
    (entry,) = con.execute(
        "SELECT object, outcome, detail FROM governance.audit_log WHERE action = 'counts.seal_broken'"
    ).fetchall()
    assert entry[0] == counting.counts_table(output) and "changed outside the pipeline" in entry[1]
    assert json.loads(entry[2])["months"] == [m.isoformat() for m in months[:2]], "the audit trail says which months"


def test_sql_whose_months_depend_on_each_other_is_refused_when_a_current_month_is_counted_again(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """The mistake the gate cannot always see: the period's end read from ``counting_months`` (here
    through a CTE). Counted whole it is right; a month counted again alone would lose its cells."""
    declared = OUTPUTS["discharge_to_social_care"]
    wrong = declared.sql.replace(
        "WITH discharges AS (", "WITH last AS (SELECT max(month_end) AS e FROM counting_months), discharges AS ("
    ).replace("(SELECT max(month_end) FROM reporting_months)", "(SELECT e FROM last)")
    assert wrong != declared.sql
    output = declared.model_copy(update={"sql": wrong})
    period, fingerprint = prepared(con, output)
    months = counting.period_months(period)
    counting.count_months(con, output, period, fingerprint)
    before = rows(con, output)
    with pytest.raises(counting.CountError, match="depends on the months counted together"):
        counting.count_months(con, output, period, fingerprint, [months[-3]])
    assert rows(con, output) == before, "nothing kept from the refused count"
    con.execute(f"DELETE FROM {counting.OUTPUT_COUNTS} WHERE month = ?", [months[-3]])  # stale, not asked
    with pytest.raises(counting.CountError, match="depends on the months counted together"):
        counting.count_months(con, output, period, fingerprint)
    assert rows(con, output) == before


def test_columns_renamed_in_the_store_break_the_seal(con: duckdb.DuckDBPyConnection) -> None:
    """A row's hash ignores column names: the seal covers them, so swapped dimensions are counted again."""
    output = OUTPUTS["discharge_to_social_care"]
    period, fingerprint = prepared(con, output)
    counting.count_months(con, output, period, fingerprint)
    honest = rows(con, output)
    table = counting.counts_table(output)
    con.execute(f"ALTER TABLE {table} RENAME provider_code TO swap")
    con.execute(f"ALTER TABLE {table} RENAME local_authority_code TO provider_code")
    con.execute(f"ALTER TABLE {table} RENAME swap TO local_authority_code")
    assert counting.stale_months(con, output, period, fingerprint) == counting.period_months(period)
    counting.count_months(con, output, period, fingerprint)
    assert con.execute(f"SELECT * FROM {table} LIMIT 0").description[1][0] == "provider_code"
    assert rows(con, output) == honest


def test_an_emptied_period_empties_the_counts(con: duckdb.DuckDBPyConnection) -> None:
    output = OUTPUTS["hospital_admissions"]
    period, fingerprint = prepared(con, output)
    counting.count_months(con, output, period, fingerprint)
    empty = counting.Period(None, None)
    install_helpers(con, empty)
    counting.count_months(con, output, empty, "an empty haven")
    assert rows(con, output) == []
    assert con.execute(f"SELECT count(*) FROM {counting.OUTPUT_COUNTS}").fetchone() == (0,)


def test_a_store_counted_before_the_seal_counts_every_month_again(con: duckdb.DuckDBPyConnection) -> None:
    output = OUTPUTS["gp_activity"]
    period, fingerprint = prepared(con, output)
    counting.count_months(con, output, period, fingerprint)
    honest = rows(con, output)
    con.execute(f"ALTER TABLE {counting.OUTPUT_COUNTS} DROP COLUMN seal")  # as the table was first made
    assert counting.stale_months(con, output, period, fingerprint) == counting.period_months(period)
    counting.count_months(con, output, period, fingerprint)
    assert counting.stale_months(con, output, period, fingerprint) == [] and rows(con, output) == honest
