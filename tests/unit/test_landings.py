"""When a content batch was received, as the audit trail records it (``safehaven.intake.landings``).

Retention counts from this (``safehaven.dispose.planning.received_before``). The batch register's
``landed_at`` is a store column anyone holding the store key can change, so it counts only where
nothing better exists: a collection's batches from before the rule are adopted with it once; a
landing whose entry could not be written when it landed counts from the entry written later.
"""

from __future__ import annotations

from datetime import UTC, datetime

import duckdb
import pytest

from safehaven.core import audit, schema
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake import landings

GP = "gp_events"
OLD, FRESH = "a" * 64, "b" * 64


def _land(con: duckdb.DuckDBPyConnection, batch: str, landed_at: str) -> None:
    """A batch record as a landing commits it (only the columns retention reads)."""
    schema.ensure(con, schema.BATCHES)
    con.execute(
        f"INSERT INTO {schema.BATCHES} (batch_id, collection, landed_at, status) VALUES (?, ?, ?, 'accepted')",
        [batch, GP, landed_at],
    )


@pytest.fixture
def con(home: Home) -> duckdb.DuckDBPyConnection:
    with Store(home).connect() as connection:
        audit.append(connection, actor="test", role="pipeline", action="test.start", object="haven", home=home)
        yield connection


def test_a_fresh_landing_counts_from_the_time_it_landed(con: duckdb.DuckDBPyConnection) -> None:
    _land(con, FRESH, "2026-11-30 09:00:00+00")
    assert landings.record(con, GP, FRESH, datetime(2026, 11, 30, 9, tzinfo=UTC))
    assert landings.received(con, GP) == {FRESH: datetime(2026, 11, 30, 9, tzinfo=UTC)}


def test_batches_from_before_the_rule_are_adopted_once_with_the_registers_times(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """A haven upgraded to the rule: its collection has no landing entry at all, so its batches are
    adopted with the register's times, and retention goes on as it counted before."""
    _land(con, OLD, "2015-04-02 09:00:00+00")
    assert landings.record_unrecorded(con, GP) == [OLD]
    assert landings.received(con, GP) == {OLD: datetime(2015, 4, 2, 9, tzinfo=UTC)}
    assert landings.record_unrecorded(con, GP) == []  # once


def test_a_landing_recorded_late_counts_from_its_entry_never_from_a_register_time_set_back(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """A landing whose entry could not be written (a kill, or a row that stopped the trail verifying
    for one landing) and whose register time was then set back would have the daily sweep destroy
    a fresh drop: recorded late, it counts from the late entry's own time (found by review)."""
    _land(con, OLD, "2015-04-02 09:00:00+00")
    landings.record_unrecorded(con, GP)  # the collection's landings are on record from here on
    _land(con, FRESH, "2000-01-01 00:00:00+00")  # landed, its entry never written, dated back
    before = datetime.now(UTC)
    assert landings.record_unrecorded(con, GP) == [FRESH]
    assert landings.received(con, GP)[FRESH] >= before


def test_a_collections_first_landing_killed_before_its_entry_is_recorded_late_never_adopted(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """The landing step starts the rule for its collection before it lands anything (one entry), so
    a new collection's very first landing, killed between its commit and its entry and then dated
    back in the register, is recorded late and counts from then: adopting it as from before the
    rule let the daily sweep destroy a fresh drop (found by review)."""
    assert landings.record_unrecorded(con, GP) == []  # the step's start, before its first landing
    _land(con, FRESH, "2000-01-01 00:00:00+00")  # landed, killed before its entry, dated back
    before = datetime.now(UTC)
    assert landings.record_unrecorded(con, GP) == [FRESH]
    assert landings.received(con, GP)[FRESH] >= before
    started = [e for e in audit.authentic_entries(con, [landings.STARTED]) if e.object == GP]
    assert [e.fields for e in started] == [{"batches_adopted": 0}]  # once


@pytest.mark.parametrize("odd", ["infinity", "-infinity", "294000-01-01", None])
def test_a_register_time_that_is_not_an_ordinary_time_is_never_read_as_one(
    con: duckdb.DuckDBPyConnection, odd: str | None
) -> None:
    """Infinity, a year past 9999 or no time at all: adopted with the entry's own time, no error."""
    _land(con, OLD, odd)  # type: ignore[arg-type]
    before = datetime.now(UTC)
    assert landings.record_unrecorded(con, GP) == [OLD]
    assert landings.received(con, GP)[OLD] >= before
