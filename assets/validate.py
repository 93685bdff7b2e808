"""Validate stage: each new batch against its contract; a blocking check per contract
stops everything downstream of a collection whose batch breaks tolerance (CoP 7-9)."""


import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.contracts import Contract, ContractRegistry
from safehaven.validation import validate_collection


def check_name(contract: Contract) -> str:
    return f"{contract.collection}_meets_contract"


def validated_asset(contract: Contract, registry: ContractRegistry) -> dg.AssetsDefinition:
    """The validation asset of one collection, with its blocking contract check."""
    spec = dg.AssetCheckSpec(
        check_name(contract),
        asset=keys.validated(contract.collection),
        blocking=True,
        description=f"Invalid rows in each new batch are within the {contract.collection} "
        f"contract's tolerance ({contract.tolerance:.1%}); otherwise the batch is refused.",
    )

    @dg.asset(
        key=keys.validated(contract.collection),
        deps=[keys.landing(contract.collection)],
        group_name="validate",
        pool=keys.STORE_POOL,
        check_specs=[spec],
        description=f"Rows of {contract.collection} that meet contract v{contract.version}; "
        "failing rows held in a rejected table with rule ids.",
        kinds={"duckdb"},
    )
    def _validated(context: dg.AssetExecutionContext, haven: SafeHavenResource):
        home = haven.home_dir()
        with haven.connect() as con:
            report = validate_collection(
                con, contract, haven.registry(), home.quarantine_for(contract.collection)
            )
        check_meta = {
            "contract_version": contract.version,
            "rows_checked": report.rows_checked,
            "rows_invalid": report.rows_invalid,
            "pass_rate": round(report.pass_rate, 6),
            "tolerance": contract.tolerance,
            "batches_refused": len(report.batches_refused),
            "failures_per_rule": dg.MetadataValue.json(report.failures_by_rule),
        }
        yield dg.MaterializeResult(
            metadata={"rows_in": report.rows_checked, "rows_out": report.rows_valid, **check_meta},
            check_results=[
                dg.AssetCheckResult(
                    check_name=check_name(contract),
                    passed=not report.blocked,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata=check_meta,
                )
            ],
        )

    return _validated


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [validated_asset(c, registry) for c in registry.contracts.values()]
