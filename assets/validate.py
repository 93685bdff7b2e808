"""Validate stage: each new batch against its contract (CoP 7-9, 45-46; see safehaven.intake.validation).

The validation half of a collection's intake step (``assets.intake``): the validated asset has
one blocking asset check made by ``contract_check``, decided by the Great Expectations suite
compiled from the contract. A batch over the contract's tolerance is refused: its rows never
enter ``landing.<c>_valid``, which is all the stages after intake read, and the check fails.
Metadata and logs carry counts, rule ids and versions, never a value.
"""

import dagster as dg

from assets import keys, partitions
from assets.ingest import record_drops
from safehaven.core.home import Home
from safehaven.intake import batch_seal
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.ingest import BATCHES
from safehaven.intake.validation import (
    BatchOutcome,
    ValidationReport,
    refusal_outstanding,
    stored_verdicts,
    validate_collection,
)


def check_name(contract: Contract) -> str:
    return f"{contract.collection}_meets_contract"


def contract_check(contract: Contract) -> dg.AssetCheckSpec:
    """The blocking check of one contract (the factory: one per contract, on its validated asset)."""
    return dg.AssetCheckSpec(
        check_name(contract),
        asset=keys.validated(contract.collection),
        blocking=True,
        description=f"Each new batch of {contract.collection} passes the Great Expectations suite compiled "
        f"from contract v{contract.version}: at most {contract.tolerance:.1%} of its rows, and of the values "
        "each rule checks, break the contract, and GX and the single SQL pass agree on every rule; otherwise "
        "the batch is refused. The check also fails while the collection's latest drop is a refused one (the "
        "stages after intake hold it until a later drop passes), whatever the run checked.",
    )


def check_metadata(contract: Contract, report: ValidationReport) -> dict[str, object]:
    """What the check reports: versions, counts per rule (the pass and GX side by side), pass rate."""
    failed = sorted({r.rule_id for b in report.batches for r in b.rules if not r.gx_success})
    return {
        "contract_version": contract.version,
        "rows_checked": report.rows_checked,
        "rows_invalid": report.rows_invalid,
        "pass_rate": round(report.pass_rate, 6),
        "tolerance": contract.tolerance,
        "batches_checked": len(report.batches),
        "batches_refused": len(report.batches_refused),
        "failures_per_rule": dg.MetadataValue.json(report.failures_by_rule),
        "rules": dg.MetadataValue.json(report.rules_table()),
        "gx_version": report.gx_version or "not run (no new batch)",
        "gx_success": report.gx_success,
        "gx_expectations_failed": dg.MetadataValue.json(failed),
        "rules_gx_and_sql_disagree_on": dg.MetadataValue.json(report.rules_disagreeing),
    }


def contract_check_result(
    contract: Contract, report: ValidationReport, refused_latest: str | None = None
) -> dg.AssetCheckResult:
    """The check's verdict: passed when every new batch's GX suite succeeded and agreed with the
    single pass, and the collection's latest drop (``refused_latest``,
    ``safehaven.intake.validation.refusal_outstanding``) is not a refused one: a run with nothing
    new to check never shows a held collection's check as passed."""
    return dg.AssetCheckResult(
        check_name=check_name(contract),
        passed=report.gx_success and refused_latest is None,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={**check_metadata(contract, report), "latest_drop_refused": refused_latest or "no"},
    )


def verdict(outcome: BatchOutcome) -> str:
    """A checked batch's verdict in a word or two: ``accepted``, or ``refused (<rule>)``."""
    return "accepted" if outcome.accepted else f"refused ({outcome.refusal_rule})"


def verdicts_table(
    report: ValidationReport, names: dict[str, str], earlier: dict[str, str] | None = None
) -> dg.MetadataValue:
    """Which drop (file) each checked batch came from and its verdict, so the UI says which drop failed.

    ``names`` are the batch register's drop keys, else file names, both shown names
    (``safehaven.core.audit.shown_name``: escaped, NHS-number-like runs withheld); rows and rule
    ids only, never a value.
    """
    rows = ["| drop | batch | rows | invalid | verdict |", "|---|---|---|---|---|"]
    for b in report.batches:
        name = partitions.md_cell(names.get(b.batch_id, "?"))
        rows.append(f"| {name} | {b.batch_id[:12]} | {b.rows:,} | {b.invalid_rows:,} | {verdict(b)} |")
    for drop, status in sorted((earlier or {}).items()):  # asked for, judged by an earlier run
        rows.append(f"| {partitions.md_cell(drop)} | - | - | - | {status} (an earlier run; it stands) |")
    return dg.MetadataValue.md("\n".join(rows) if len(rows) > 2 else "no new drop")


def _batch_drops(con, report: ValidationReport) -> dict[str, tuple[str, str | None]]:
    """Each checked batch's (file name, drop key) from the batch register (shown names)."""
    rows = con.execute(
        f"SELECT batch_id, file_name, drop_key FROM {BATCHES} WHERE list_contains(?::VARCHAR[], batch_id)",
        [[b.batch_id for b in report.batches]],
    ).fetchall()
    return {batch: (name, drop) for batch, name, drop in rows}


def validate(context: dg.AssetExecutionContext, con, contract: Contract, home: Home, registry: ContractRegistry):
    """Validate the run's drops of one collection (every batch waiting when the run has no
    partition): the validated asset's materialisation with its blocking check's result."""
    asked = partitions.drops_of(context)
    c = contract.collection
    sealer = batch_seal.sealer_for(con, contract, home)
    report = validate_collection(con, contract, registry, home.quarantine_for(c), drops=asked, sealer=sealer)
    valid_total = con.execute(f'SELECT count(*) FROM landing."{c}_valid"').fetchone()[0]
    found = _batch_drops(con, report)
    refused_latest = refusal_outstanding(con, c)
    names = {batch: drop or name for batch, (name, drop) in found.items()}
    outcomes = {found[b.batch_id][1]: verdict(b) for b in report.batches if found.get(b.batch_id, ("", None))[1]}
    record_drops(context, c, keys.validated(c), outcomes)
    earlier = stored_verdicts(con, c, set(asked or []) - set(outcomes))
    for drop in sorted(set(asked or []) - set(outcomes)):
        judged = earlier.get(drop)
        context.log.info(
            f"{c}: drop {drop} has no batch (never landed, or quarantined: see its landing)"
            if not judged
            else f"{c}: drop {drop} was {judged}: nothing to validate"
            if judged.startswith("sent before")
            else f"{c}: drop {drop} was {judged} by an earlier run (its verdict stands)"
        )
    for refused in (b for b in report.batches if not b.accepted):
        why = (
            f"GX and the single SQL pass disagree on {', '.join(refused.disagreeing)}"
            if refused.disagreeing
            else f"{refused.invalid_rows} of {refused.rows} rows invalid"
        )
        context.log.warning(f"{c}: a batch was refused ({why}); see quarantine/{c}/ for its reason file")
    for batch, why in report.batches_unsound.items():
        context.log.warning(
            f"{c}: batch {batch[:12]} was not validated: {why} (rows added, changed or removed outside the haven); "
            "record-level releases stay refused until a person decides (safehaven objections faults)"
        )
    result = contract_check_result(contract, report, refused_latest)
    return dg.MaterializeResult(
        asset_key=keys.validated(c),
        metadata={
            "rows_in": report.rows_checked,
            "rows_out": report.rows_valid,
            "dagster/row_count": int(valid_total),
            **result.metadata,
            "seconds": dg.MetadataValue.json(report.seconds),
            "drops": verdicts_table(report, names, earlier),
            "batches_left_unsound": len(report.batches_unsound),
        },
        check_results=[result],
    )
