"""k-anonymity of record-level releases, beside the other disclosure control.

Rule (Sweeney 2002, "k-anonymity: a model for protecting privacy"; ICO Anonymisation code of
practice; ISB 1523 for the risk of small groups): in a record-level release every person's
*signature* (the set of all released quasi-identifier values on all their records across
every file, since a recipient can join the files by ``person_id``) must be shared by at
least ``k`` people (``policy.K_ANONYMITY``, 5, unless the agreement sets another, never
below ``policy.MIN_K_ANONYMITY``). With ``small_groups: suppress`` people in smaller groups
have their quasi-identifiers set to NULL one column at a time, the column with the most
distinct values first (local suppression), re-checking after each; if the people left with
every quasi-identifier suppressed are still fewer than ``k``, the smallest compliant groups
are suppressed into theirs until it holds ``k``; anyone still in a smaller group is removed.
If more than ``max_suppressed_share`` of the people would be removed, or with
``small_groups: refuse`` if any group is smaller than ``k``, the release is refused, as it is
when a row belongs to no person (a NULL ``pid``: it is in no group, so its group cannot be counted).

Every step depends only on each person's distinct quasi-identifier values, so the tables may
hold one row per distinct (person, quasi-identifiers) with a count of the records it stands for
(``records``): a release over the whole history checks and suppresses in memory set by its
people, not its records (``safehaven.share.releases`` then applies the outcome as it writes).

``safehaven.share.releases.k_anonymise`` applies an agreement's settings through
:func:`k_anonymise` (the name stays importable there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import duckdb

from safehaven.core.sql import lit, q
from safehaven.core.store import memory_limit_bytes
from safehaven.publish.disclosure.policy import K_ANONYMITY

__all__ = ["KAnonymityRefused", "KReport", "k_anonymise"]


class KAnonymityRefused(Exception):
    """k-anonymity cannot be established within the settings: the release must not be made."""


def _count(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> int:
    row = con.execute(sql, params or []).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


@dataclass
class KReport:
    """What the k-anonymity step found and did (counts only)."""

    k: int
    small_groups: str
    quasi_identifiers: dict[str, list[str]]
    people_checked: int = 0
    groups_below_k: int = 0
    people_below_k: int = 0
    suppression_order: list[str] = field(default_factory=list)
    people_generalised: dict[str, int] = field(default_factory=dict)
    people_merged_into_suppressed_group: int = 0
    people_removed: int = 0
    records_removed: int = 0
    smallest_group_after: int | None = None


def _signatures(
    con: duckdb.DuckDBPyConnection,
    tables: dict[str, str],
    qis: dict[str, list[str]],
    k: int,
    changed: str | None = None,
) -> None:
    """(Re)build ``_ksig`` (pid, signature, n) and ``_kviol`` (pid) over all work tables.

    ``changed`` names a temp table (pid) of the only people whose rows changed since ``_ksig`` was
    last built (those a step suppressed, merged or removed): only their signatures are built again,
    everyone else's kept, and every group counted again. The same tables as building them all
    (``tests/unit/test_releases.py``); each step after the first touches only the people below k,
    so a release over the whole history no longer builds every person's signature list once a step
    (building them all took about 0.5 s a step for 900,000 people, measured here; issue 22).
    """
    where = f" WHERE pid IN (SELECT pid FROM {changed})" if changed else ""
    parts = []
    for collection, table in tables.items():
        cols = qis[collection]
        if cols:
            rendered = ", ".join(f"coalesce(CAST({q(c)} AS VARCHAR), '*')" for c in cols)
            sig = f"concat_ws(chr(31), {lit(collection)}, {rendered})"
        else:
            sig = "NULL::VARCHAR"
        parts.append(f"SELECT pid, {sig} AS sig FROM {table}{where}")
    person_signatures(con, " UNION ALL ".join(parts))
    kept = ""
    if changed:
        kept = f"SELECT pid, signature FROM _ksig ANTI JOIN {changed} USING (pid) UNION ALL "
    con.execute(  # replaces _ksig with a query that reads the old one: DuckDB reads it before replacing it
        "CREATE OR REPLACE TEMP TABLE _ksig AS SELECT pid, signature, count(*) OVER (PARTITION BY signature) AS n "
        f"FROM ({kept}SELECT pid, signature FROM _kpeople)"
    )
    con.execute("DROP TABLE _kpeople")
    con.execute(f"CREATE OR REPLACE TEMP TABLE _kviol AS SELECT pid FROM _ksig WHERE n < {int(k)}")


#: bytes of memory allowed for each (person, signature) pair while the lists are built
#: (:func:`person_signatures`): 25M pairs of 2M people failed in two buckets under 1 GiB, about
#: 80 bytes a pair; this leaves room for the rest of the statement
PAIR_BYTES = 256
#: pairs in a bucket however low the memory limit (a bucket is never empty of work)
MIN_BUCKET_PAIRS = 1


def person_signatures(con: duckdb.DuckDBPyConnection, rows_sql: str, bucket_pairs: int | None = None) -> None:
    """Temp table ``_kpeople`` (pid, signature): each person's sorted distinct non-null ``sig`` of
    ``rows_sql`` (pid, sig), NULL when they have none.

    A list being built cannot be spilled by DuckDB, so the lists are built a bucket of people at a
    time (by a hash of the pid) from the distinct (pid, sig) pairs, which can be spilled, each
    bucket holding about ``bucket_pairs`` pairs: by default the connection's memory limit over
    ``PAIR_BYTES`` (found by review: 3M people with two signatures each, and 25M pairs of 2M
    people, failed in one statement under 1 GiB). The pairs are sorted by bucket, so each
    bucket's statement reads only its own row groups. The same signatures as one statement.
    """
    con.execute(f"CREATE OR REPLACE TEMP TABLE _kpairs AS SELECT DISTINCT pid, sig FROM ({rows_sql})")
    pairs = int(con.execute("SELECT count(*) FROM _kpairs").fetchone()[0])  # type: ignore[index]
    limit = memory_limit_bytes(con) or 2**62  # no readable limit: one bucket
    per_bucket = max(MIN_BUCKET_PAIRS, bucket_pairs or limit // PAIR_BYTES)
    buckets = max(1, -(-pairs // per_bucket))
    signature = "list_sort(list(sig) FILTER (WHERE sig IS NOT NULL)) AS signature"
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE _kpeople AS SELECT pid, {signature} FROM _kpairs WHERE false GROUP BY pid"
    )
    if buckets == 1:
        con.execute(f"INSERT INTO _kpeople SELECT pid, {signature} FROM _kpairs GROUP BY pid")
    else:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _kbuckets AS SELECT pid, sig, hash(pid) % {buckets} AS _b "
            "FROM _kpairs ORDER BY _b"
        )
        for bucket in range(buckets):
            con.execute(f"INSERT INTO _kpeople SELECT pid, {signature} FROM _kbuckets WHERE _b = {bucket} GROUP BY pid")
        con.execute("DROP TABLE _kbuckets")
    con.execute("DROP TABLE _kpairs")


def _kviol_count(con: duckdb.DuckDBPyConnection) -> int:
    """How many people are in groups smaller than k (``_kviol``)."""
    return _count(con, "SELECT count(*) FROM _kviol")


def _count_small_groups(con: duckdb.DuckDBPyConnection, report: KReport, refused: type[Exception]) -> None:
    """Record the people and groups below k; with ``small_groups: refuse`` any of them refuses."""
    k = report.k
    report.people_checked = _count(con, "SELECT count(*) FROM _ksig")
    report.people_below_k = _kviol_count(con)
    report.groups_below_k = _count(con, f"SELECT count(DISTINCT signature) FROM _ksig WHERE n < {k}")
    if report.people_below_k and report.small_groups == "refuse":
        raise refused(
            f"k-anonymity: {report.people_below_k} people in {report.groups_below_k} groups of released "
            f"quasi-identifiers are in groups smaller than k={k}, and small_groups is refuse"
        )


def _suppression_order(con: duckdb.DuckDBPyConnection, tables: dict[str, str], qis: dict[str, list[str]]) -> list[str]:
    """The quasi-identifier columns, the one with the most distinct values first (ties by name)."""
    columns = sorted({c for v in qis.values() for c in v})
    distinct: dict[str, int] = {}
    for col in columns:
        union = " UNION ".join(f"SELECT {q(col)} AS v FROM {t}" for c, t in tables.items() if col in qis[c])
        distinct[col] = _count(con, f"SELECT count(DISTINCT v) FROM ({union})")
    return sorted(columns, key=lambda c: (-distinct[c], c))


def _suppress_column(
    con: duckdb.DuckDBPyConnection, tables: dict[str, str], qis: dict[str, list[str]], col: str
) -> int:
    """Set ``col`` to NULL for the people below k; return how many of them had a value."""
    having = [t for c, t in tables.items() if col in qis[c]]
    touched = " UNION ".join(
        f"SELECT pid FROM {t} WHERE {q(col)} IS NOT NULL AND pid IN (SELECT pid FROM _kviol)" for t in having
    )
    generalised = _count(con, f"SELECT count(DISTINCT pid) FROM ({touched})")
    for t in having:
        con.execute(f"UPDATE {t} SET {q(col)} = NULL WHERE pid IN (SELECT pid FROM _kviol)")
    return generalised


def _suppress_locally(
    con: duckdb.DuckDBPyConnection, tables: dict[str, str], qis: dict[str, list[str]], report: KReport
) -> None:
    """Local suppression: one column at a time in ``report.suppression_order``, re-checking after each."""
    for col in report.suppression_order:
        if not _kviol_count(con):
            break
        report.people_generalised[col] = _suppress_column(con, tables, qis, col)
        _signatures(con, tables, qis, report.k, changed="_kviol")


def _merge_into_suppressed_group(
    con: duckdb.DuckDBPyConnection, tables: dict[str, str], qis: dict[str, list[str]], report: KReport
) -> None:
    """When the fully suppressed group is too small, suppress the smallest compliant groups into it."""
    k = report.k
    remaining = _kviol_count(con)
    if not (0 < remaining < k and report.suppression_order):
        return
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _kborrow AS SELECT pid FROM _ksig WHERE signature IN ("
        "SELECT signature FROM (SELECT signature, sum(n) OVER (ORDER BY n, signature) - n AS before "
        f"FROM (SELECT DISTINCT signature, n FROM _ksig WHERE n >= {k})) WHERE before < {k - remaining})"
    )
    report.people_merged_into_suppressed_group = _count(con, "SELECT count(*) FROM _kborrow")
    for c, t in tables.items():
        if qis[c]:
            nulls = ", ".join(f"{q(col)} = NULL" for col in qis[c])
            con.execute(f"UPDATE {t} SET {nulls} WHERE pid IN (SELECT pid FROM _kborrow)")
    _signatures(con, tables, qis, k, changed="_kborrow")


def _remove_small_groups(
    con: duckdb.DuckDBPyConnection,
    tables: dict[str, str],
    qis: dict[str, list[str]],
    report: KReport,
    max_suppressed_share: float,
    refused: type[Exception],
    records: str | None = None,
) -> None:
    """Remove everyone still below k, unless that exceeds ``max_suppressed_share`` (then refuse)."""
    k = report.k
    report.people_removed = _kviol_count(con)
    if not report.people_removed:
        return
    share = report.people_removed / max(report.people_checked, 1)
    if share > max_suppressed_share:
        raise refused(
            f"k-anonymity: after local suppression {report.people_removed} of {report.people_checked} people "
            f"({share:.1%}) are still in groups smaller than k={k}; removing them would exceed the agreement's "
            f"max_suppressed_share of {max_suppressed_share:.1%}"
        )
    counted = f"sum({q(records)})" if records else "count(*)"
    for t in tables.values():
        report.records_removed += _count(con, f"SELECT {counted} FROM {t} WHERE pid IN (SELECT pid FROM _kviol)")
        con.execute(f"DELETE FROM {t} WHERE pid IN (SELECT pid FROM _kviol)")
    _signatures(con, tables, qis, k, changed="_kviol")


def _smallest_group(con: duckdb.DuckDBPyConnection) -> int | None:
    """The size of the smallest signature group (None when no one is left)."""
    smallest = con.execute("SELECT min(n) FROM _ksig").fetchone()
    return int(smallest[0]) if smallest and smallest[0] is not None else None


def _refuse_rows_without_a_person(
    con: duckdb.DuckDBPyConnection, tables: dict[str, str], refused: type[Exception]
) -> None:
    """Refuse work tables with a row whose ``pid`` is NULL: such a row belongs to no group, so no
    step could tell whether it is in one smaller than k (found by review: it was released)."""
    for collection, table in tables.items():
        orphans = _count(con, f"SELECT count(*) FROM {table} WHERE pid IS NULL")
        if orphans:
            raise refused(
                f"k-anonymity: {orphans} row(s) of {collection} have no person (pid is NULL); every released "
                "row must belong to a person for its group to be counted"
            )


def k_anonymise(
    con: duckdb.DuckDBPyConnection,
    tables: dict[str, str],
    qis: dict[str, list[str]],
    *,
    k: int = K_ANONYMITY,
    small_groups: str = "suppress",
    max_suppressed_share: float = 0.05,
    refused: type[Exception] = KAnonymityRefused,
    records: str | None = None,
) -> KReport:
    """Check and enforce k-anonymity over the work tables (the module docstring); raise ``refused``.

    ``records``: a column of every table holding how many records each row stands for (one row
    per distinct person and quasi-identifiers, module docstring); None: each row is a record.
    """
    _refuse_rows_without_a_person(con, tables, refused)
    report = KReport(k, small_groups, {c: list(v) for c, v in qis.items()})
    _signatures(con, tables, qis, k)
    _count_small_groups(con, report, refused)
    report.suppression_order = _suppression_order(con, tables, qis)
    _suppress_locally(con, tables, qis, report)
    _merge_into_suppressed_group(con, tables, qis, report)
    _remove_small_groups(con, tables, qis, report, max_suppressed_share, refused, records)
    report.smallest_group_after = _smallest_group(con)
    if report.smallest_group_after is not None and report.smallest_group_after < k:  # pragma: no cover
        raise refused("k-anonymity could not be established")  # the steps above make this impossible
    return report
