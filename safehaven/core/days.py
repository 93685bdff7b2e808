"""The haven's day: the UK calendar day (Europe/London), whatever the host's time zone.

The dates the haven judges by are UK dates: an objection's recorded and withdrawn dates (CoP 11-14)
and an objection applies from its recorded date (NDOP practice). So "today" is always the UK day
of now, never the host's: on a host in UTC, from 00:00 to 01:00 BST (late March to late October)
the host's day is still yesterday, and an objection recorded today would not yet be in force (a
release or a delivery in that hour would let its person through: fail open).

Every "today" of the haven comes from :func:`haven_today`, which reads the one clock
:data:`clock` (a test sets it; it is never the standard library patched). SQL gets the same day as
a DATE literal (:func:`haven_today_sql`), computed here in Python, rather than DuckDB's
``current_date`` (the session's, i.e. the host's, day) or a ``timezone(...)`` expression: one
clock for Python and SQL, so the release's ``today`` and its objection check cannot straddle
midnight. A literal freezes the day into the SQL text, which is right for the haven's SQL: it is
built when it runs and none of it is stored as a view definition (``safehaven.core.schema``'s
one view reads no date).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

from safehaven.core.sql import HAVEN_TIME_ZONE

HAVEN_ZONE = ZoneInfo(HAVEN_TIME_ZONE)


def _now() -> datetime:
    """Now, as an aware time (UTC)."""
    return datetime.now(UTC)


#: the clock the haven's day is read from (:func:`haven_today`); a test sets it to a fixed time
clock: Callable[[], datetime] = _now


def haven_day(moment: datetime) -> date:
    """The haven's (UK) calendar day of an aware time: 23:30 UTC on 1 July is 2 July (00:30 BST),
    23:30 UTC on 1 December is 1 December (GMT). A naive time is refused: its zone would be the
    host's (CoP 11-14: objection dates are UK dates)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"the haven's day needs an aware time, not {moment!r}")
    return moment.astimezone(HAVEN_ZONE).date()


def haven_today() -> date:
    """Today in the haven: the UK calendar day of :data:`clock`'s now, whatever the host's zone
    (module docstring; CoP 11-14; NDOP: an objection applies from its recorded date)."""
    return haven_day(clock())


def haven_today_sql() -> str:
    """SQL DATE literal of :func:`haven_today`: the haven's day for SQL, in place of DuckDB's
    ``current_date`` (the host's day; module docstring says why a literal)."""
    return f"DATE '{haven_today().isoformat()}'"


def haven_now_sql(moment: datetime | None = None) -> str:
    """SQL TIMESTAMPTZ literal of :data:`clock`'s now (or of ``moment``, a reading of it the caller
    also takes its day from): "now" where a rule judges by it (a batch the audit trail has not
    recorded landed now: ``safehaven.protect.objections.never_sent_sql``), from the same clock as
    :func:`haven_today_sql`, so the judgement and its as-of day never straddle midnight, nor a
    test's clock and DuckDB's ``now()``."""
    return f"TIMESTAMPTZ '{(moment or clock()).isoformat()}'"
