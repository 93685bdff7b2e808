"""The haven's day (``safehaven.core.days``): the UK calendar day (Europe/London), whatever the
host's zone, from one clock a test sets (CoP 11-14: objection dates are UK dates)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import duckdb
import pytest

from safehaven.core import days


def _at(monkeypatch: pytest.MonkeyPatch, moment: datetime) -> None:
    monkeypatch.setattr(days, "clock", lambda: moment)


@pytest.mark.parametrize(
    ("utc", "uk_day"),
    [
        # BST (UTC+1): UK midnight is 23:00 UTC the day before
        (datetime(2099, 7, 1, 22, 30, tzinfo=UTC), date(2099, 7, 1)),  # 23:30 BST on 1 July
        (datetime(2099, 7, 1, 22, 59, 59, tzinfo=UTC), date(2099, 7, 1)),  # 23:59:59 BST
        (datetime(2099, 7, 1, 23, 0, tzinfo=UTC), date(2099, 7, 2)),  # 00:00 BST on 2 July
        (datetime(2099, 7, 1, 23, 30, tzinfo=UTC), date(2099, 7, 2)),  # 00:30 BST: the host's day is still 1 July
        # GMT (UTC+0): UK midnight is UTC midnight
        (datetime(2099, 12, 1, 23, 30, tzinfo=UTC), date(2099, 12, 1)),  # 23:30 GMT on 1 December
        (datetime(2099, 12, 1, 23, 59, 59, tzinfo=UTC), date(2099, 12, 1)),
        (datetime(2099, 12, 2, 0, 0, tzinfo=UTC), date(2099, 12, 2)),  # 00:00 GMT on 2 December
        (datetime(2099, 12, 2, 0, 30, tzinfo=UTC), date(2099, 12, 2)),
    ],
)
def test_the_havens_day_is_the_uk_day_on_both_sides_of_midnight_in_bst_and_in_gmt(
    monkeypatch: pytest.MonkeyPatch, utc: datetime, uk_day: date
) -> None:
    _at(monkeypatch, utc)
    assert days.haven_today() == uk_day
    assert duckdb.sql(f"SELECT {days.haven_today_sql()}").fetchone()[0] == uk_day


def test_the_havens_day_does_not_depend_on_the_zone_the_clock_reads_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same instant read in another zone (a host in New York, UTC-4 in July) is the same UK day."""
    _at(monkeypatch, datetime(2099, 7, 1, 19, 30, tzinfo=timezone(timedelta(hours=-4))))  # 00:30 BST on 2 July
    assert days.haven_today() == date(2099, 7, 2)


def test_a_naive_time_is_refused_not_read_in_the_hosts_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    _at(monkeypatch, datetime(2099, 7, 1, 23, 30))
    with pytest.raises(ValueError, match="aware"):
        days.haven_today()


def test_the_default_clock_is_now() -> None:
    assert days.haven_today() == days.haven_day(datetime.now(UTC))
