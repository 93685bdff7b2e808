"""Identifiable releases wait for the key custodian: the nightly run records that one is due.

Rule (CoP 27b, 30-31; NIST SP 800-57 Part 2 roles; ``safehaven.core.keys``): the unattended
pipeline holds no key that opens the identity vault, and it never writes an identifiable
extract. When an identifiable agreement is in force, the nightly run records in
``governance.releases_due`` that a release is due (once per agreement until it is made) and
audits it; the key custodian makes it with ``safehaven release --agreement <id>``, which opens
the sealed vault key and is audited as a re-identification and a release, and clears the row.
"""

from __future__ import annotations

import duckdb

from safehaven.core import audit, schema
from safehaven.core.store import table_exists

DUE = schema.RELEASES_DUE
COMMAND = "safehaven release --agreement {id}"


def ensure_table(con: duckdb.DuckDBPyConnection) -> None:
    schema.ensure(con, DUE)


def record_due(
    con: duckdb.DuckDBPyConnection,
    agreement_id: str,
    version: str,
    sha256: str,
    *,
    actor: str,
    purpose: str,
    basis: str,
) -> str:
    """Record (or refresh) that an identifiable release under ``agreement_id`` is due; returns the reason."""
    ensure_table(con)
    open_rows = con.execute(
        f"SELECT count(*) FROM {DUE} WHERE agreement_id = ? AND released_as IS NULL", [agreement_id]
    ).fetchone()[0]
    if open_rows:
        con.execute(
            f"UPDATE {DUE} SET last_seen_at = now(), agreement_version = ?, agreement_sha256 = ? "
            "WHERE agreement_id = ? AND released_as IS NULL",
            [version, sha256, agreement_id],
        )
    else:
        con.execute(f"INSERT INTO {DUE} VALUES (?, ?, ?, now(), now(), NULL, NULL)", [agreement_id, version, sha256])
    reason = (
        f"an identifiable release under {agreement_id} is due; the key custodian makes it with "
        f"`{COMMAND.format(id=agreement_id)}` (the pipeline never writes identifiable extracts)"
    )
    audit.append(
        con,
        actor=actor,
        role="pipeline",
        action="release",
        object=f"agreement:{agreement_id}",
        purpose=purpose,
        legal_basis=basis,
        agreement=agreement_id,
        outcome="due",
        detail={"reason": reason, "agreement_sha256": sha256},
    )
    return reason


def clear_due(con: duckdb.DuckDBPyConnection, agreement_id: str, release_id: str) -> None:
    """Mark the open due row of ``agreement_id`` as made by ``release_id``."""
    ensure_table(con)
    con.execute(
        f"UPDATE {DUE} SET released_as = ?, released_at = now() WHERE agreement_id = ? AND released_as IS NULL",
        [release_id, agreement_id],
    )


def due(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(agreement id, due since) of every identifiable release waiting for the custodian (read-only safe)."""
    schema, _, table = DUE.partition(".")
    if not table_exists(con, schema, table):
        return []
    rows = con.execute(
        f"SELECT agreement_id, CAST(min(due_since) AS VARCHAR) FROM {DUE} "
        "WHERE released_as IS NULL GROUP BY 1 ORDER BY 1"
    ).fetchall()
    return [(a, d) for a, d in rows]
