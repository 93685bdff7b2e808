"""Row-level validation of landed batches against their contract, in one SQL pass.

Rules (CoP 7-9, 45-46):

* Each row of a newly landed batch is checked against every rule of the contract
  (``safehaven.rules``) in a single DuckDB pass. A failing row goes to
  ``landing.<collection>_rejected`` with the identifiers of the rules it broke (its values
  stay in the encrypted landing table; only rule ids and row numbers are reported).
* Valid rows go on, typed and with the canonical NHS number, to ``landing.<collection>_valid``.
* A batch whose share of invalid rows exceeds the contract's tolerance is refused whole:
  none of its rows go on, the batch is marked ``refused`` with a reason file in
  ``quarantine/<collection>/``, and the stage reports it so a blocking check stops
  everything downstream of the collection in the same run.
* Validation is incremental and idempotent: each batch is validated once (status
  ``landed`` -> ``accepted`` | ``refused``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from safehaven.contracts import Contract, ContractRegistry
from safehaven.ingest import BATCHES, ensure_tables
from safehaven.rules import RuleCheck, compile_checks, lit, q, typed_sql


@dataclass
class ValidationReport:
    """Counts per rule and per batch for one collection's newly landed batches."""

    collection: str
    contract_version: str
    rows_checked: int = 0
    rows_valid: int = 0
    rows_invalid: int = 0
    failures_by_rule: dict[str, int] = field(default_factory=dict)
    batches_accepted: list[str] = field(default_factory=list)
    batches_refused: list[dict[str, object]] = field(default_factory=list)
    tolerance: float = 0.0

    @property
    def pass_rate(self) -> float:
        return 1.0 if self.rows_checked == 0 else self.rows_valid / self.rows_checked

    @property
    def blocked(self) -> bool:
        return bool(self.batches_refused)


def failed_rules_sql(checks: list[RuleCheck]) -> str:
    """SQL list of the ids of the rules a row fails (empty list when it passes)."""
    items = ", ".join(f"CASE WHEN NOT ({c.valid_sql}) THEN {lit(c.id)} END" for c in checks)
    return f"list_filter([{items}], x -> x IS NOT NULL)"


def ensure_tables_validated(con: duckdb.DuckDBPyConnection, contract: Contract) -> None:
    ensure_tables(con, contract)
    c = contract.collection
    typed_cols = ", ".join(f"{q(f.name)} {f.type}" for f in contract.fields)
    con.execute(f"CREATE TABLE IF NOT EXISTS landing.{c}_valid ({typed_cols}, _batch VARCHAR, _row BIGINT)")
    con.execute(
        f"CREATE TABLE IF NOT EXISTS landing.{c}_rejected "
        "(_batch VARCHAR, _row BIGINT, failed_rules VARCHAR[])"
    )


def validate_collection(
    con: duckdb.DuckDBPyConnection, contract: Contract, registry: ContractRegistry, quarantine_dir: Path
) -> ValidationReport:
    """Validate every batch of the collection still in status ``landed``."""
    ensure_tables_validated(con, contract)
    c = contract.collection
    report = ValidationReport(c, contract.version, tolerance=contract.tolerance)
    pending = [
        r[0] for r in con.execute(
            f"SELECT batch_id FROM {BATCHES} WHERE collection = ? AND status = 'landed' ORDER BY landed_at",
            [c],
        ).fetchall()
    ]
    if not pending:
        return report
    checks = compile_checks(contract, registry)
    batch_list = ", ".join(lit(b) for b in pending)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _checked AS SELECT *, {failed_rules_sql(checks)} AS failed_rules "
            f"FROM landing.{c} WHERE _batch IN ({batch_list})"
        )
        per_batch = con.execute(
            "SELECT _batch, count(*), count(*) FILTER (WHERE len(failed_rules) > 0) "
            "FROM _checked GROUP BY _batch"
        ).fetchall()
        refused: list[str] = []
        for batch, rows, invalid in per_batch:
            share = invalid / rows if rows else 0.0
            status = "refused" if share > contract.tolerance else "accepted"
            con.execute(
                f"UPDATE {BATCHES} SET status = ?, invalid_rows = ?, validated_at = now() WHERE batch_id = ?",
                [status, invalid, batch],
            )
            report.rows_checked += rows
            if status == "refused":
                refused.append(batch)
                report.rows_invalid += invalid
                report.batches_refused.append(
                    {"batch": batch, "rows": rows, "invalid_rows": invalid, "invalid_share": round(share, 6)}
                )
            else:
                report.batches_accepted.append(batch)
                report.rows_valid += rows - invalid
                report.rows_invalid += invalid
        typed = ", ".join(f"{typed_sql(f)} AS {q(f.name)}" for f in contract.fields)
        not_refused = f" AND _batch NOT IN ({', '.join(lit(b) for b in refused)})" if refused else ""
        con.execute(
            f"INSERT INTO landing.{c}_valid SELECT {typed}, _batch, _row FROM _checked "
            f"WHERE len(failed_rules) = 0{not_refused}"
        )
        con.execute(
            f"INSERT INTO landing.{c}_rejected SELECT _batch, _row, failed_rules FROM _checked "
            "WHERE len(failed_rules) > 0"
        )
        report.failures_by_rule = dict(
            con.execute(
                "SELECT rule, count(*) FROM (SELECT unnest(failed_rules) AS rule FROM _checked) "
                "GROUP BY rule ORDER BY rule"
            ).fetchall()
        )
        con.execute("DROP TABLE _checked")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    for item in report.batches_refused:
        _write_refusal(con, contract, quarantine_dir, item)
    return report


def _write_refusal(con: duckdb.DuckDBPyConnection, contract: Contract, quarantine_dir: Path,
                   item: dict[str, object]) -> None:
    """A reason file for a batch refused over tolerance (its rows stay encrypted in landing)."""
    name = con.execute(f"SELECT file_name FROM {BATCHES} WHERE batch_id = ?", [item["batch"]]).fetchone()[0]
    rules = dict(con.execute(
        f"SELECT rule, count(*) FROM (SELECT unnest(failed_rules) AS rule FROM landing.{contract.collection}_rejected "
        "WHERE _batch = ?) GROUP BY rule ORDER BY 2 DESC", [item["batch"]]).fetchall())
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    reason = {
        "collection": contract.collection,
        "contract_version": contract.version,
        "file": name,
        "sha256": item["batch"],
        "quarantined_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rule": "batch.tolerance",
        "reason": f"{item['invalid_rows']} of {item['rows']} rows ({float(item['invalid_share']):.2%}) break "
        f"the contract; the tolerance is {contract.tolerance:.2%}",
        "failures_by_rule": rules,
        "what_to_do": "ask the sender to correct the rules listed and send the file again; the refused "
        "batch is held encrypted in the landing zone and none of its rows went on",
    }
    (quarantine_dir / f"{name}.reason.json").write_text(json.dumps(reason, indent=2))
