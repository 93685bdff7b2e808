"""Publication: protected tables leave the store as open files for analysts and the public.

Rules (CoP 35-36, 45; BRIEF "Publication"):

* Only tables of the ``published`` zone are exported, and only after disclosure control.
* Open formats: CSV and Parquet per output, plus ``published.duckdb``: a separate,
  unencrypted database holding only the published tables. Analysts get that file and never
  the store key: access control by key separation, not by a flag (DESIGN.md "Zones").
* Published under the Open Government Licence v3.0, with a data dictionary per output.
* No formula-leading cells: text cells starting with ``= + - @``, tab or CR are prefixed
  with a single quote (CSV injection; OWASP).
* Files are written to a temporary name and renamed, so readers never see half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from safehaven.rules import lit, q

OGL = (
    "Open Government Licence v3.0 - "
    "https://www.nationalarchives.gov.uk/doc/open-government-licence/version/3/"
)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise_sql(expr: str) -> str:
    """SQL: text that cannot be read as a spreadsheet formula."""
    return (
        f"CASE WHEN left({expr}, 1) IN ('=', '+', '-', '@', chr(9), chr(13)) "
        f"THEN '''' || {expr} ELSE {expr} END"
    )


def _safe_select(con: duckdb.DuckDBPyConnection, table: str) -> str:
    cols = con.execute(f"DESCRIBE {table}").fetchall()
    parts = [
        f"{neutralise_sql(q(name))} AS {q(name)}" if dtype == "VARCHAR" else q(name)
        for name, dtype, *_ in cols
    ]
    return f"SELECT {', '.join(parts)} FROM {table}"


def export_table(con: duckdb.DuckDBPyConnection, table: str, name: str, out: Path) -> dict[str, str]:
    """Write ``table`` as ``out/<name>.csv`` and ``.parquet`` (neutralised, atomic)."""
    out.mkdir(parents=True, exist_ok=True)
    select = _safe_select(con, table)
    written: dict[str, str] = {}
    for ext, options in (("csv", "FORMAT csv, HEADER true"), ("parquet", "FORMAT parquet")):
        final = out / f"{name}.{ext}"
        tmp = out / f".{name}.{ext}.tmp"
        con.execute(f"COPY ({select}) TO {lit(str(tmp))} ({options})")
        os.replace(tmp, final)
        written[ext] = final.name
    return written


def write_published_db(con: duckdb.DuckDBPyConnection, tables: dict[str, str], path: Path) -> None:
    """Rebuild the analysts' ``published.duckdb`` (unencrypted, published tables only)."""
    tmp = path.with_name(".published.duckdb.tmp")
    tmp.unlink(missing_ok=True)
    con.execute(f"ATTACH {lit(str(tmp))} AS pub")
    try:
        for name, table in tables.items():
            con.execute(f"CREATE TABLE pub.main.{q(name)} AS {_safe_select(con, table)}")
    finally:
        con.execute("DETACH pub")
    os.replace(tmp, path)


def write_dictionary(out: Path, name: str, title: str, description: str,
                     columns: list[tuple[str, str]], extra: dict[str, object]) -> Path:
    """The data dictionary and licence of one output, as JSON beside its files."""
    path = out / f"{name}.dictionary.json"
    doc = {"name": name, "title": title, "description": description, "licence": OGL,
           "columns": [{"name": c, "type": t} for c, t in columns], **extra}
    path.write_text(json.dumps(doc, indent=2, default=str))
    return path
