"""Ingest stage: land each collection's new files, or quarantine them whole (see safehaven.intake.ingest)."""

import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.ingest import ingest_collection


def landing_asset(contract: Contract) -> dg.AssetsDefinition:
    """The landing asset of one collection, built from its contract."""

    @dg.asset(
        key=keys.landing(contract.collection),
        group_name="ingest",
        pool=keys.STORE_POOL,
        description=f"{contract.collection} drops landed as received into the encrypted "
        f"landing zone (contract v{contract.version}); bad files quarantined whole.",
        kinds={"duckdb"},
    )
    def _landing(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        home = haven.home_dir()
        with haven.connect() as con:
            report = ingest_collection(
                con,
                contract,
                home.incoming_for(contract.collection),
                home.quarantine_for(contract.collection),
            )
            total = con.execute(f"SELECT count(*) FROM landing.{contract.collection}").fetchone()[0]
        for item in report.quarantined:
            context.log.warning(
                f"{contract.collection}: file quarantined ({item['rule']}); "
                f"see quarantine/{contract.collection}/{item['file']}.reason.json"
            )
        for copy in report.copies:
            context.log.warning(
                f"{contract.collection}: {copy['file']} holds the same records as batch {copy['same_records_as']} "
                "(a re-saved copy: other bytes, same rows); not landed again"
            )
        for name in report.not_overwritten:
            context.log.warning(
                f"{contract.collection}: {name} was landed, but the haven's user could not overwrite the received "
                "file; give it write access to incoming/, and check the file is gone"
            )
        if report.files_arriving:
            context.log.info(
                f"{contract.collection}: {report.files_arriving} file(s) still being written were left "
                "in the folder; a later run reads them once they are complete"
            )
        if report.files_vanished:
            context.log.info(
                f"{contract.collection}: {report.files_vanished} file(s) were renamed or removed by their "
                "sender while the folder was read; whatever is in the folder now is read by the next run"
            )
        return dg.MaterializeResult(
            metadata={
                "files_landed": report.files_landed,
                "files_skipped_already_landed": report.files_skipped,
                "files_quarantined": report.files_quarantined,
                "files_vanished": report.files_vanished,
                "files_not_overwritten": len(report.not_overwritten),
                "files_still_arriving": report.files_arriving,
                "files_not_landed_same_records": len(report.copies),
                "quarantine_rules": ", ".join(sorted({q["rule"] for q in report.quarantined})) or "none",
                "rows_in": report.rows_landed,
                "rows_out": report.rows_landed,
                "rows_in_landing_total": int(total),
                "dagster/row_count": int(total),
                "contract_version": contract.version,
            }
        )

    return _landing


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [landing_asset(c) for c in registry.contracts.values()]
