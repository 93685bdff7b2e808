"""Intake: one step per collection that lands its drops and validates them (``assets.ingest``,
``assets.validate``), two assets partitioned by drop (``assets.partitions``).

Landing and validation are one step (a multi-asset) because a partitioned asset that depends on
another partitioned asset cannot run without a partition in Dagster, and a night's run takes
every drop waiting without naming them; in one step they also share one store connection. The
UI still shows ``landing/<c>_landed`` and ``validated/<c>_valid`` as two assets, each drop a
partition of both. A run for one drop lands and validates that drop only: how one drop is run
again (a run that failed part-way, from the asset's partitions in the UI).
"""

import warnings

import dagster as dg

from assets import keys, partitions
from assets.ingest import land
from assets.validate import contract_check, validate
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import Contract, ContractRegistry


def intake_asset(contract: Contract) -> dg.AssetsDefinition:
    """The intake step of one collection: its landing and validated assets and the contract check."""
    with warnings.catch_warnings():  # BackfillPolicy is beta in Dagster 1.13: its warning would reach the terminal
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _intake_asset(contract)


def _specs(contract: Contract) -> list[dg.AssetSpec]:
    c = contract.collection
    return [
        dg.AssetSpec(
            keys.landing(c),
            group_name="ingest",
            description=f"{c} drops landed as received into the encrypted landing zone (contract "
            f"v{contract.version}); bad files quarantined whole.",
            kinds={"duckdb"},
        ),
        dg.AssetSpec(
            keys.validated(c),
            deps=[keys.landing(c)],
            group_name="validate",
            description=f"Rows of {c} that meet contract v{contract.version}; failing rows held in a rejected "
            "table with rule ids; GX results and quality measures kept.",
            kinds={"duckdb"},
        ),
    ]


def _intake_asset(contract: Contract) -> dg.AssetsDefinition:
    @dg.multi_asset(
        name=f"{contract.collection}_intake",
        specs=_specs(contract),
        check_specs=[contract_check(contract)],
        pool=keys.STORE_POOL,
        partitions_def=partitions.drops(contract.collection),
        backfill_policy=dg.BackfillPolicy.single_run(),
    )
    def _intake(context: dg.AssetExecutionContext, haven: SafeHavenResource):
        home = haven.home_dir()
        with haven.connect() as con:
            landed = land(context, con, contract, home)
            checked = validate(context, con, contract, home, haven.registry())
        yield landed
        yield checked

    return _intake


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [intake_asset(c) for c in registry.contracts.values()]
