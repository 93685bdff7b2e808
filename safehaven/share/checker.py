"""The checker summary: what an output checker needs to judge a file, in counts only.

Rule (SATRE 3.3.04-3.3.05; Five Safes "safe outputs"; the OpenSAFELY Airlock file summary is
the anchor): each file of a release request comes with a summary made *for the reviewer*,
computed by DuckDB from the staged file itself, so it describes exactly the bytes reviewed.
It never holds a value: only counts, column names and types, and identifiability classes.

Per file: rows; people (record level); each column with its type and identifiability class
(``pseudonym`` for ``person_id``, else the contract's class: ``quasi_identifier``,
``direct_identifier``, ``attribute``...); for record-level files, *k per person* on the
quasi-identifiers of the file (each person's set of quasi-identifier values in the file is
their signature; the smallest number of people sharing one, and how many people are in
groups smaller than the agreement's k); for aggregate files, the minimum non-zero count, the
suppressed cells, and whether every count is a multiple of :data:`ROUNDING_BASE` or
suppressed. Per release: the opt-outs withheld, the objector records included, and what the
k-anonymity step suppressed or removed.

What it does not guarantee: the per-file k is computed file by file; the release's own
k-anonymity step works on a person's signature across all files (see
``safehaven.share.releases``), which the release-level part reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from safehaven.core.sql import file_lit, q
from safehaven.publish.disclosure import kanon

#: aggregate counts leave rounded to this base (safehaven.publish.disclosure)
ROUNDING_BASE = 5
PSEUDONYM_CLASS = "pseudonym"
COUNT_CLASS = "count"


def _one(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    row = con.execute(sql).fetchone()
    return row[0] if row else None


def _k_per_person(con: duckdb.DuckDBPyConnection, src: str, person: str, qis: list[str], k: int) -> dict[str, Any]:
    """Smallest group of people sharing a quasi-identifier signature in one file, and people below k.

    Each person's signature is built as k-anonymity builds it (``kanon.person_signatures``, a
    bucket of people at a time: found by review, the one-statement lists here failed under a
    memory limit the release's own check had passed)."""
    if not qis:
        return {"quasi_identifiers": [], "k": k, "smallest_group": None, "people_below_k": 0}
    rendered = ", ".join(f"coalesce(CAST({q(c)} AS VARCHAR), '*')" for c in qis)
    kanon.person_signatures(con, f"SELECT {q(person)} AS pid, concat_ws(chr(31), {rendered}) AS sig FROM {src}")
    groups = "SELECT count(*) AS n FROM _kpeople GROUP BY signature"
    row = con.execute(f"SELECT min(n), coalesce(sum(n) FILTER (WHERE n < {int(k)}), 0) FROM ({groups})").fetchone()
    con.execute("DROP TABLE _kpeople")
    assert row is not None
    return {
        "quasi_identifiers": qis,
        "k": k,
        "smallest_group": None if row[0] is None else int(row[0]),
        "people_below_k": int(row[1]),
    }


def _aggregate_checks(con: duckdb.DuckDBPyConnection, src: str, count_col: str) -> dict[str, Any]:
    c = q(count_col)
    row = con.execute(
        f"SELECT min({c}) FILTER (WHERE {c} > 0), count(*) FILTER (WHERE suppressed IS NOT NULL), "
        f"count(*) FILTER (WHERE suppressed IS NULL AND {c} % {ROUNDING_BASE} <> 0) FROM {src}"
    ).fetchone()
    assert row is not None
    return {
        "min_nonzero_count": None if row[0] is None else int(row[0]),
        "suppressed_cells": int(row[1]),
        f"every_count_multiple_of_{ROUNDING_BASE}_or_suppressed": int(row[2]) == 0,
    }


def file_summary(
    con: duckdb.DuckDBPyConnection,
    path: Path,
    *,
    classes: dict[str, str],
    quasi_identifiers: list[str],
    k: int,
    person: str | None,
    count_col: str | None = None,
) -> dict[str, Any]:
    """The summary of one staged file (counts only; module docstring).

    ``classes`` maps a released column to its identifiability class; ``person`` is the
    pseudonym column of a record-level file (``None`` for an aggregate), ``count_col`` the
    count column of an aggregate.
    """
    src = f"read_parquet({file_lit(path)})"
    described = con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()
    summary: dict[str, Any] = {
        "file": path.name,
        "rows": int(_one(con, f"SELECT count(*) FROM {src}")),
        "columns": [{"name": n, "type": t, "class": classes.get(n, "attribute")} for n, t, *_ in described],
    }
    if person is not None:
        summary["people"] = int(_one(con, f"SELECT count(DISTINCT {q(person)}) FROM {src}"))
        summary["k_per_person"] = _k_per_person(con, src, person, quasi_identifiers, k)
    if count_col is not None:
        summary.update(_aggregate_checks(con, src, count_col))
    return summary


def to_markdown(summary: dict[str, Any]) -> str:
    """The request's summary as Markdown (for ``safehaven review show`` and Dagster metadata)."""
    lines = [
        f"### {summary['release_id']} ({summary['identifiability']}, rule: {summary['rule']})",
        "",
        f"- opt-outs withheld: {summary['records_withheld_objections']}; objector records included: "
        f"{summary['objector_records_included']}",
    ]
    k = summary.get("k_anonymity")
    if k:
        lines.append(
            f"- k-anonymity (k={k['k']}): people below k before {k['people_below_k_before']}, generalised "
            f"{k['people_generalised']}, removed {k['people_removed']}, "
            f"smallest group after {k['smallest_group_after']}"
        )
    for f in summary["files"]:
        people = f", people: {f['people']}" if "people" in f else ""
        lines += ["", f"#### {f['file']}", "", f"- rows: {f['rows']}{people}"]
        kp = f.get("k_per_person")
        if kp:
            lines.append(
                f"- k per person on {', '.join(kp['quasi_identifiers']) or 'no quasi-identifiers'}: smallest group "
                f"{kp['smallest_group']}, people in groups below {kp['k']}: {kp['people_below_k']}"
            )
        if "min_nonzero_count" in f:
            flag = f"every_count_multiple_of_{ROUNDING_BASE}_or_suppressed"
            lines.append(
                f"- min non-zero count {f['min_nonzero_count']}, suppressed cells {f['suppressed_cells']}, "
                f"every count a multiple of {ROUNDING_BASE} or suppressed: {'yes' if f[flag] else 'NO'}"
            )
        lines += ["", "| column | type | class |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['type']} | {c['class']} |" for c in f["columns"]]
    return "\n".join(lines) + "\n"
