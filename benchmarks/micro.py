"""Workers for the side-by-side measurements, each run in its own subprocess by ``benchmarks.run``.

``hmac``: pseudonymising NHS numbers row by row in Python, three ways: ``hmac.new`` per value
over a Python list (the bare loop, no I/O), a ``hashlib`` loop that reuses the keyed inner and
outer states (``.copy()``, the fastest pure-Python form), and the *same job as the SQL*: read
the values from a DuckDB table, ``hmac.new`` per row, write the pseudonyms back as a table
(Arrow both ways, the fastest route in and out of Python). Against them, the same HMAC-SHA256
in DuckDB SQL (the pipeline's ``safehaven.protect.pseudonymise.hmac_sql``) over the same table, once per
row (no de-duplication, so the primitive is compared like for like), and the pipeline's own pseudonymisation
(``safehaven.protect.pseudonymise.pid_join_sql``, imported, not copied: the HMAC once per distinct NHS
number, joined back to every row) writing the same table of pseudonyms as the Python table job
(``pipeline_pseudonymise``; its pseudonyms are checked equal to Python's). The values are the
canonical NHS numbers of ``gp_events``, in file order, capped at ``--rows`` (0: all of them, as
the pipeline sees them; Python's per-row cost does not depend on the count, but the pipeline's
does, through the rows per person).

``gx``: Great Expectations 1.x on a pandas frame of ``gp_events`` (read with every column as
text, as the file arrives), in an ephemeral context, with the contract rules GX can express
with built-in expectations: required NHS number, NHS number shape (the mod-11 check digit and
date ranges need custom expectations, so GX does less than the pipeline here), ODS and
postcode formats, sex and diagnosis code lists, ISO event dates, and event not before birth.
Result format ``BASIC`` with no partial unexpected values (counts, never values). Reading the
CSV into pandas is timed separately from validation. ``--rows`` caps the frame.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from benchmarks.common import peak_rss_bytes, write_json
from safehaven.core.identifiers import canonical_nhs_sql


def nhs_numbers(csv: Path, rows: int | None) -> list[str]:
    import duckdb

    limit = f" LIMIT {int(rows)}" if rows else ""
    return [
        r[0]
        for r in duckdb.sql(
            f"SELECT nhs FROM (SELECT {canonical_nhs_sql('nhs_number')} AS nhs "
            f"FROM read_csv('{csv}', all_varchar = true, header = true)) WHERE nhs IS NOT NULL{limit}"
        ).fetchall()
    ]


def gp_contract() -> Any:
    """The gp_events data contract, whose patient key the pipeline pseudonymises."""
    from safehaven.intake.contracts import ContractRegistry

    return ContractRegistry().contracts["gp_events"]


def bench_hmac(csv: Path, rows: int | None, threads: int | None) -> dict[str, Any]:
    import duckdb

    from safehaven.protect.pseudonymise import hmac_sql, install_key, pid_join_sql

    values = nhs_numbers(csv, rows)
    key = os.urandom(32)
    n = len(values)

    began = time.perf_counter()
    out1 = [hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:32] for v in values]
    t_hmac_new = time.perf_counter() - began

    padded = key.ljust(64, b"\x00")
    inner0 = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
    outer0 = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
    began = time.perf_counter()
    out2 = []
    for v in values:
        inner = inner0.copy()
        inner.update(v.encode())
        outer = outer0.copy()
        outer.update(inner.digest())
        out2.append(outer.hexdigest()[:32])
    t_hashlib = time.perf_counter() - began
    assert out1[:1000] == out2[:1000]

    con = duckdb.connect(config={"threads": threads} if threads else {})
    con.execute("CREATE TABLE v (nhs_number VARCHAR)")
    con.execute("INSERT INTO v SELECT unnest(?)", [values])
    del out2, values
    began = time.perf_counter()
    read = con.execute("SELECT nhs_number FROM v").fetch_arrow_table().column(0).to_pylist()
    pids = pa.table({"pid": [hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:32] for v in read]})
    con.register("_py", pids)
    con.execute("CREATE TABLE py AS SELECT pid FROM _py")
    t_job = time.perf_counter() - began
    con.unregister("_py")
    assert con.execute("SELECT pid FROM py LIMIT 1").fetchone()[0] in set(out1), "table job disagrees with hmac"
    del read, pids
    # the pipeline's key blocks and HMAC SQL (safehaven.protect.pseudonymise), run once per row here
    install_key(con, "haven", key)
    began = time.perf_counter()
    con.execute(f"CREATE TABLE p AS SELECT {hmac_sql('nhs_number', 'haven')} AS pid FROM v")
    t_sql = time.perf_counter() - began
    first = con.execute("SELECT pid FROM p LIMIT 1").fetchone()[0]
    assert first in set(out1), "DuckDB SQL HMAC disagrees with Python hmac"
    # the pipeline's own pseudonymisation (safehaven.protect.pseudonymise), not a copy of its SQL
    began = time.perf_counter()
    con.execute(f"CREATE TABLE pp AS SELECT _ids.pid {pid_join_sql(gp_contract(), 'v')}")
    t_pipeline = time.perf_counter() - began
    people = con.execute("SELECT count(DISTINCT nhs_number) FROM v").fetchone()[0]
    assert con.execute("SELECT count(*) FROM pp").fetchone()[0] == n
    agree = con.execute("SELECT count(*) FROM (SELECT pid FROM pp EXCEPT SELECT pid FROM py)").fetchone()[0]
    assert agree == 0, "the pipeline's pseudonyms disagree with Python hmac"
    con.close()
    return {
        "rows": n,
        "python_hmac_new": {"seconds": t_hmac_new, "rows_per_s": n / t_hmac_new},
        "python_hashlib_copy": {"seconds": t_hashlib, "rows_per_s": n / t_hashlib},
        "python_table_job": {"seconds": t_job, "rows_per_s": n / t_job},
        "duckdb_sql": {"seconds": t_sql, "rows_per_s": n / t_sql, "threads": threads},
        "pipeline_pseudonymise": {"seconds": t_pipeline, "rows_per_s": n / t_pipeline, "people": people},
        "peak_rss_bytes": peak_rss_bytes(),
    }


def gx_suite(codes: dict[str, list[str]]) -> list[Any]:
    import great_expectations as gx

    e = gx.expectations
    return [
        e.ExpectColumnValuesToNotBeNull(column="nhs_number"),
        e.ExpectColumnValuesToMatchRegex(column="nhs_number", regex=r"^[0-9]{3}[ -]?[0-9]{3}[ -]?[0-9]{4}$"),
        e.ExpectColumnValuesToMatchRegex(column="practice_code", regex=r"^[A-Z0-9]{3,6}$"),
        e.ExpectColumnValuesToMatchRegex(column="postcode", regex=r"^[A-Z]{1,2}[0-9][A-Z0-9]? ?[0-9][A-Z]{2}$"),
        e.ExpectColumnValuesToBeInSet(column="sex", value_set=codes["person_gender"]),
        e.ExpectColumnValuesToBeInSet(column="diagnosis_code", value_set=codes["snomed_gp_diagnoses"]),
        e.ExpectColumnValuesToMatchStrftimeFormat(column="event_date", strftime_format="%Y-%m-%d"),
        e.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="event_date", column_B="date_of_birth", or_equal=True, ignore_row_if="either_value_is_missing"
        ),
    ]


def bench_gx(csv: Path, rows: int | None) -> dict[str, Any]:
    os.environ["GX_ANALYTICS_ENABLED"] = "False"
    import logging

    import pandas as pd

    logging.getLogger("great_expectations").setLevel(logging.CRITICAL)
    import great_expectations as gx

    from benchmarks.baseline import load_code_lists

    codes = {name: [c["code"] for c in items] for name, items in load_code_lists().items()}
    began = time.perf_counter()
    frame = pd.read_csv(csv, dtype=str, nrows=rows, engine="pyarrow")
    t_load = time.perf_counter() - began

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = gx.data_context.types.base.ProgressBarsConfig(globally=False)
    batch_definition = (
        context.data_sources.add_pandas("bench")
        .add_dataframe_asset("gp_events")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = context.suites.add(gx.ExpectationSuite(name="gp_events"))
    for expectation in gx_suite(codes):
        suite.add_expectation(expectation)
    began = time.perf_counter()
    batch = batch_definition.get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format={"result_format": "BASIC", "partial_unexpected_count": 0})
    t_validate = time.perf_counter() - began
    outcomes = {}
    for r in result.results:
        columns = ", ".join(str(v) for k, v in r.expectation_config.kwargs.items() if k.startswith("column"))
        outcomes[f"{r.expectation_config.type}({columns})"] = r.result.get("unexpected_count")
    return {
        "rows": len(frame),
        "expectations": len(suite.expectations),
        "seconds_load_pandas": t_load,
        "seconds_validate": t_validate,
        "rows_per_s": len(frame) / t_validate,
        "unexpected_counts": outcomes,
        "success": bool(result.success),
        "versions": {"great_expectations": gx.__version__, "pandas": pd.__version__},
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.micro")
    parser.add_argument("what", choices=("hmac", "gx"))
    parser.add_argument("--csv", type=Path, required=True, help="the gp_events CSV")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=0, help="cap on rows (0: all)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.what == "hmac":
        doc = bench_hmac(args.csv, args.rows or None, args.threads or None)
    else:
        doc = bench_gx(args.csv, args.rows or None)
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
