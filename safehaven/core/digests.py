"""Digests that tell whether work is needed: of the code, of a table's rows, of a value.

Used where a stage may skip work whose inputs did not change (``safehaven.publish.reuse``,
``safehaven.share.release_inputs``). They detect change; they are not seals against a forger
(the audit trail and the key pins are those).
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import duckdb

from safehaven.core.store import table_exists

#: The package whose code decides every result: a change of any module redoes everything.
PACKAGE = Path(__file__).resolve().parents[1]


@cache
def code_sha() -> str:
    """SHA-256 over the source of every module of the ``safehaven`` package (read once a process)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def table_sha(con: duckdb.DuckDBPyConnection, table: str) -> str:
    """A digest of a table's rows as a multiset: its row count and the sum of a hash of each whole row.

    Order-independent and computed in one DuckDB pass; not a cryptographic commitment (it
    detects change, it is not a seal against a forger: the audit trail is that).
    """
    schema, name = table.split(".", 1)
    if not table_exists(con, schema, name.strip('"')):
        return "absent"
    n, total = con.execute(f"SELECT count(*), coalesce(sum(hash(t)::HUGEINT), 0) FROM {table} AS t").fetchone()
    return f"{n}:{total}"


def sha_of(value: Any) -> str:
    """SHA-256 of a JSON-able value (keys sorted; dates and other values as text)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
