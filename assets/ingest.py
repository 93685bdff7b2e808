"""Ingest stage: land each collection's new files, or quarantine them whole (see safehaven.intake.ingest).

The landing half of a collection's intake step (``assets.intake``), partitioned by drop
(``assets.partitions``): a run for a drop lands that drop only; a run without a partition lands
every drop waiting and records a materialisation of each drop's partition, saying what became
of it (landed, already landed, a copy, quarantined and why).
"""

import dagster as dg

from assets import keys, partitions
from safehaven.core.home import Home
from safehaven.intake import batch_seal
from safehaven.intake.contracts import Contract
from safehaven.intake.control import CONTROL_SUFFIX
from safehaven.intake.ingest import IngestReport, ingest_collection
from safehaven.intake.validation import stored_verdicts


def record_drops(
    context: dg.AssetExecutionContext, collection: str, asset: dg.AssetKey, outcomes: dict[str, str]
) -> None:
    """Add the drops met to the collection's partitions, and record a materialisation of ``asset``
    for each one the run was not launched for (the run's own partitions Dagster records), with its outcome."""
    partitions.add_drops(context.instance, collection, outcomes)
    asked = set(partitions.drops_of(context) or [])
    for drop, outcome in outcomes.items():
        if drop not in asked:
            context.log_event(dg.AssetMaterialization(asset_key=asset, partition=drop, metadata={"outcome": outcome}))


def landing_outcomes(outcomes: dict[str, str]) -> dg.MetadataValue:
    """Each drop of the run and what became of it (names are shown names: nothing identifiable)."""
    rows = ["| drop | outcome |", "|---|---|"]
    rows += [f"| {partitions.md_cell(drop)} | {outcome} |" for drop, outcome in outcomes.items()]
    return dg.MetadataValue.md("\n".join(rows) if outcomes else "no drop waiting")


def land(context: dg.AssetExecutionContext, con, contract: Contract, home: Home) -> dg.MaterializeResult:
    """Land the run's drops of one collection (every drop waiting when the run has no partition)
    and say what became of each: logs and metadata carry counts, rule ids and shown names only."""
    asked = partitions.drops_of(context)
    c = contract.collection
    sealer = batch_seal.sealer_for(con, contract, home)
    report = ingest_collection(con, contract, home.incoming_for(c), home.quarantine_for(c), drops=asked, sealer=sealer)
    total = con.execute(f"SELECT count(*) FROM landing.{c}").fetchone()[0]
    record_drops(context, c, keys.landing(c), report.drops)
    shown = dict(report.drops)
    missing = sorted(set(asked or []) - set(report.drops))
    earlier = stored_verdicts(con, c, missing)
    for drop in missing:  # asked for, not waiting: say why, in the run's log and its drops table
        shown[drop] = (
            "landed by an earlier run"
            if drop in earlier
            else "not waiting in incoming/ (removed by its sender, or quarantined: see quarantine/)"
        )
        context.log.info(f"{c}: drop {drop}: {shown[drop]}; nothing to land")
    _log_report(context, c, report)
    return dg.MaterializeResult(
        asset_key=keys.landing(c),
        metadata={
            "files_landed": report.files_landed,
            "files_skipped_already_landed": report.files_skipped,
            "files_quarantined": report.files_quarantined,
            "files_vanished": report.files_vanished,
            "files_not_overwritten": len(report.not_overwritten),
            "files_not_moved": len(report.not_moved),
            "files_still_arriving": report.files_arriving,
            "files_awaiting_control_file": len(report.awaiting_control),
            "files_not_landed_same_records": len(report.copies),
            "files_restating_objections": len(report.restated),
            "quarantine_rules": ", ".join(sorted({q["rule"] for q in report.quarantined})) or "none",
            "rows_in": report.rows_landed,
            "rows_out": report.rows_landed,
            "rows_in_landing_total": int(total),
            "dagster/row_count": int(total),
            "contract_version": contract.version,
            "drops": landing_outcomes(shown),
        },
    )


def _log_report(context: dg.AssetExecutionContext, c: str, report: IngestReport) -> None:
    for item in report.quarantined:
        context.log.warning(f"{c}: file quarantined ({item['rule']}); see quarantine/{c}/{item['file']}.reason.json")
    for copy in report.copies:
        context.log.warning(
            f"{c}: {copy['file']} holds the same records as batch {copy['same_records_as']} "
            "(a re-saved copy: other bytes, same rows); not landed again"
        )
    for restated in report.restated:
        context.log.info(
            f"{c}: {restated['file']} was received before (batch {restated['restates']}): not landed again; "
            "the objection register registers its statements again, in the order they arrived"
        )
    for stuck in report.not_moved:
        context.log.warning(
            f"{c}: {stuck['file']} was refused ({stuck['rule']}) but the haven's user could not move it to "
            f"quarantine ({stuck['error']}); it stays in incoming/{c}/ and nothing of it was landed: give the "
            f"haven's user write access to incoming/{c}/ (or remove the file), then run intake again"
        )
    for name in report.not_overwritten:
        context.log.warning(
            f"{c}: {name} was landed, but the haven's user could not overwrite the received "
            "file; give it write access to incoming/, and check the file is gone"
        )
    _log_left_for_later(context, c, report)
    if report.landings_unaudited:
        context.log.warning(
            f"{c}: {report.landings_unaudited} batch(es) landed but the audit trail refused their landing entry "
            "(it does not verify: safehaven audit verify); the next landing step puts them on record once it does"
        )
    if report.landings_audited_late:
        context.log.info(
            f"{c}: {report.landings_audited_late} batch(es) landed by an earlier run without their "
            "audit entry (the run was stopped, or the trail did not verify) are now on record"
        )
    if report.files_vanished:
        context.log.info(
            f"{c}: {report.files_vanished} file(s) were renamed or removed by their "
            "sender while the folder was read; whatever is in the folder now is read by the next run"
        )


def _log_left_for_later(context: dg.AssetExecutionContext, c: str, report: IngestReport) -> None:
    """Name the files left in incoming/ for a later run: still being written, or waiting for their
    control file (``safehaven.intake.control``)."""
    writing = report.files_arriving - len(report.awaiting_control)
    if writing:
        context.log.info(
            f"{c}: {writing} file(s) still being written were left "
            "in the folder; a later run reads them once they are complete"
        )
    for name in report.awaiting_control:
        context.log.info(
            f"{c}: {name} waits for its control file ({name}{CONTROL_SUFFIX}, which the contract asks for and "
            f"its sender writes last); it stays in incoming/{c}/ and a later run lands it once that is there"
        )
