"""A release whose inputs are unchanged is not built again (issue 22).

``safehaven.share.releases`` already refuses to offer the same content twice: a preparation
whose files equal the agreement's latest request opens nothing (``unchanged``). Building the
files to find that out re-reads the whole history of the agreement's collections every night.
Here the same answer is reached from the inputs instead, before anything is built:

* the inputs of a preparation are the code of the ``safehaven`` package, the agreement file's
  hash as approved, the day (objections and opt-outs are applied as of a date), the agreement's
  pseudonym key id, the contract of every collection the agreement reads (what each field is and
  which fields identify: the release's shape and k-anonymity follow from them, so a contract that
  now names a quasi-identifier builds the release again; found by review), the row hash of every
  haven table the agreement reads, and the tables the objection and opt-out rules read (objection
  events, practice registrations, release members, notices, decisions);
* when a preparation ends ``unchanged`` or opens a request, its inputs' digest is kept with that
  request's id; the next preparation with the same digest, while that request is still the
  agreement's latest comparable one, is ``unchanged`` at once.

Every guard before the build still runs each time (the agreement's standing and terms, the
linkage, the objection feed, the key pins): only the rebuild of identical content is saved.
Identifiable releases (a custodian's command, rare) are always built.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

import duckdb

from safehaven.core import schema
from safehaven.core.digests import code_sha, sha_of, table_sha
from safehaven.core.registers import RELEASE_MEMBERS
from safehaven.core.sql import q
from safehaven.intake.contracts import Contract
from safehaven.protect.objections import EVENTS, REGISTRATIONS
from safehaven.protect.optouts import DECISIONS, NOTICES
from safehaven.share import review
from safehaven.share.agreements import Agreement

INPUTS = schema.RELEASE_INPUTS
#: The tables the objection and opt-out rules read when a release is prepared.
OBJECTION_TABLES = (EVENTS, REGISTRATIONS, RELEASE_MEMBERS, NOTICES, DECISIONS)


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    schema.ensure(con, INPUTS)


def inputs_sha(
    con: duckdb.DuckDBPyConnection,
    agreement: Agreement,
    agreement_sha: str,
    today: date,
    key_id: str,
    contracts: Mapping[str, Contract],
) -> str:
    """SHA-256 over every input of a preparation under ``agreement`` (the module docstring lists them)."""
    return sha_of(
        {
            "code": code_sha(),
            "agreement": agreement_sha,
            "today": today.isoformat(),
            "key": key_id,
            "contracts": {c: contracts[c].model_dump(mode="json") for c in agreement.collections},
            "haven": {c: table_sha(con, f"haven.{q(c)}") for c in agreement.collections},
            "objections": {t: table_sha(con, t) for t in OBJECTION_TABLES},
        }
    )


def known_unchanged(con: duckdb.DuckDBPyConnection, agreement_id: str, sha: str) -> review.Request | None:
    """The agreement's latest comparable request, if a preparation with inputs ``sha`` matched it."""
    ensure_tables(con)
    last = review.latest_comparable(con, agreement_id)
    if last is None:
        return None
    row = con.execute(
        f"SELECT 1 FROM {INPUTS} WHERE agreement_id = ? AND inputs_sha = ? AND release_id = ?",
        [agreement_id, sha, last.release_id],
    ).fetchone()
    return last if row else None


def remember(con: duckdb.DuckDBPyConnection, agreement_id: str, sha: str, release_id: str) -> None:
    """Inputs ``sha`` gave the content of request ``release_id`` (opened, or matched unchanged)."""
    ensure_tables(con)
    con.execute(f"INSERT INTO {INPUTS} VALUES (?, ?, ?, now())", [agreement_id, sha, release_id])
