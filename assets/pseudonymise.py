"""Pseudonymise stage: validated rows enter the haven under keyed pseudonyms, minus type 1
objectors' GP records (safehaven.haven)."""


import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.contracts import Contract, ContractRegistry
from safehaven.haven import build_haven


def haven_asset(contract: Contract) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.haven(contract.collection),
        deps=[keys.validated(contract.collection), keys.OBJECTION_REGISTER],
        group_name="pseudonymise",
        pool=keys.STORE_POOL,
        description=f"{contract.collection} in the haven zone: HMAC-SHA256 pseudonyms, no direct "
        "identifiers, date of birth to week, postcode to district.",
        kinds={"duckdb"},
    )
    def _haven(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        key = haven.keyring().get_or_create("haven")
        with haven.connect() as con:
            report = build_haven(con, contract, key)
            total = con.execute(f"SELECT count(*) FROM haven.{contract.collection}").fetchone()[0]
        if report.type1_dropped:
            context.log.warning(
                f"{contract.collection}: {report.type1_dropped} records about type 1 objectors were "
                f"sent by {len(report.type1_by_sender)} practice(s) and dropped; incident recorded"
            )
        return dg.MaterializeResult(
            metadata={
                "rows_in": report.rows_in,
                "rows_out": report.rows_out,
                "type1_records_dropped": report.type1_dropped,
                "type1_dropped_by_sender": dg.MetadataValue.json(report.type1_by_sender),
                "batches": report.batches,
                "rows_in_haven_total": int(total),
                "pseudonym_key_id": report.key_id,
            }
        )

    return _haven


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [haven_asset(c) for c in registry.content()]
