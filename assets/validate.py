"""Validate stage: each new batch against its contract (CoP 7-9, 45-46; see safehaven.intake.validation).

One validated asset per contract, each with one blocking asset check made by
``contract_check``: the Great Expectations suite compiled from the contract decides it, so a
batch over the contract's tolerance stops everything downstream of that collection in the
same run. Metadata and logs carry counts, rule ids and versions, never a value.
"""

import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.ingest import BATCHES
from safehaven.intake.validation import ValidationReport, validate_collection


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
        "the batch is refused and nothing downstream runs.",
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


def contract_check_result(contract: Contract, report: ValidationReport) -> dg.AssetCheckResult:
    """The check's verdict: passed when every new batch's GX suite succeeded and agreed with the single pass."""
    return dg.AssetCheckResult(
        check_name=check_name(contract),
        passed=report.gx_success,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=check_metadata(contract, report),
    )


def drops_table(report: ValidationReport, names: dict[str, str]) -> dg.MetadataValue:
    """Which drop (file) each checked batch came from and its verdict, so the UI says which drop failed.

    ``names`` are the batch register's file names, already shown names (``safehaven.core.audit.shown_name``:
    escaped, NHS-number-like runs withheld); rows and rule ids only, never a value.
    """
    rows = ["| drop | batch | rows | invalid | verdict |", "|---|---|---|---|---|"]
    for b in report.batches:
        name = names.get(b.batch_id, "?").replace("|", "\\|")
        verdict = "accepted" if b.accepted else f"refused ({b.refusal_rule})"
        rows.append(f"| {name} | {b.batch_id[:12]} | {b.rows:,} | {b.invalid_rows:,} | {verdict} |")
    return dg.MetadataValue.md("\n".join(rows) if report.batches else "no new drop")


def validated_asset(contract: Contract) -> dg.AssetsDefinition:
    """The validation asset of one collection, with its blocking contract check."""

    @dg.asset(
        key=keys.validated(contract.collection),
        deps=[keys.landing(contract.collection)],
        group_name="validate",
        pool=keys.STORE_POOL,
        check_specs=[contract_check(contract)],
        description=f"Rows of {contract.collection} that meet contract v{contract.version}; "
        "failing rows held in a rejected table with rule ids; GX results and quality measures kept.",
        kinds={"duckdb"},
    )
    def _validated(context: dg.AssetExecutionContext, haven: SafeHavenResource):
        home = haven.home_dir()
        with haven.connect() as con:
            report = validate_collection(con, contract, haven.registry(), home.quarantine_for(contract.collection))
            valid_total = con.execute(f'SELECT count(*) FROM landing."{contract.collection}_valid"').fetchone()[0]
            names = dict(
                con.execute(
                    f"SELECT batch_id, file_name FROM {BATCHES} WHERE list_contains(?::VARCHAR[], batch_id)",
                    [[b.batch_id for b in report.batches]],
                ).fetchall()
            )
        for refused in (b for b in report.batches if not b.accepted):
            why = (
                f"GX and the single SQL pass disagree on {', '.join(refused.disagreeing)}"
                if refused.disagreeing
                else f"{refused.invalid_rows} of {refused.rows} rows invalid"
            )
            context.log.warning(
                f"{contract.collection}: a batch was refused ({why}); see quarantine/{contract.collection}/ "
                "for its reason file"
            )
        result = contract_check_result(contract, report)
        yield dg.MaterializeResult(
            metadata={
                "rows_in": report.rows_checked,
                "rows_out": report.rows_valid,
                "dagster/row_count": int(valid_total),
                **result.metadata,
                "seconds": dg.MetadataValue.json(report.seconds),
                "drops": drops_table(report, names),
            },
            check_results=[result],
        )

    return _validated


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [validated_asset(c) for c in registry.contracts.values()]
