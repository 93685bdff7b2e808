"""Counting stage: each output's true counts, per reporting month, kept inside the store.

Thin: the unit of work is ``safehaven.publish.aggregate.count`` (linkage authorised first, then
the stale months and the months asked for counted: ``safehaven.publish.counting``). The asset is
partitioned by reporting month (``assets.partitions``): a run for a month counts it again; a
run without a partition counts every month whose inputs changed. Either way each month counted
is recorded as a materialisation of its partition, with the number of cells counted and never
a count (true counts do not leave the store: the protected table is ``published/<output>``).
"""

import warnings

import dagster as dg

from assets import keys, partitions
from assets.guards import held_fails
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish import counting
from safehaven.publish.aggregate import count
from safehaven.publish.outputs import Output, load_outputs


def counts_asset(output: Output) -> dg.AssetsDefinition:
    """The month-partitioned counting asset of one declared output."""
    linked = f" Linked under agreement {output.linkage.agreement}." if output.linkage else ""

    with warnings.catch_warnings():  # BackfillPolicy is beta in Dagster 1.13: its warning would reach the terminal
        warnings.simplefilter("ignore", dg.BetaWarning)
        return _counts_asset(output, linked)


def _counts_asset(output: Output, linked: str) -> dg.AssetsDefinition:
    @dg.asset(
        key=keys.counts(output.name),
        deps=[keys.haven(c) for c in output.collections],
        group_name="aggregate",
        pool=keys.STORE_POOL,
        partitions_def=partitions.REPORTING_MONTHS,
        backfill_policy=dg.BackfillPolicy.single_run(),
        description=f"True counts of {output.name} per reporting month, before disclosure control; kept in the "
        "store, never published." + linked,
        kinds={"duckdb"},
    )
    def _counts(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        asked = partitions.months_of(context)
        with haven.connect() as con, held_fails():
            report, outside = count(con, output, haven.registry(), asked)
            rows = con.execute(f"SELECT count(*) FROM {counting.counts_table(output)}").fetchone()[0]
        if report.broken:
            context.log.warning(
                f"{output.name}: the kept counts of {len(report.broken)} month(s) were changed in the store since "
                "they were counted; counted again from the haven and recorded in the audit trail (counts.seal_broken)"
            )
        partitions.add_months(context.instance, report.counted + report.current)
        if outside:  # after the months in the period were counted and kept: say which were not, and fail
            raise dg.Failure(
                f"{output.name}: {', '.join(m.isoformat() for m in outside)} not in its reporting period "
                f"({_period(report)}); not counted: leave this output out of that backfill"
            )
        for month in sorted(set(report.counted) - set(asked or [])):  # the run's own partitions are recorded by Dagster
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=context.asset_key,
                    partition=partitions.month_key(month),
                    metadata={"cells_counted": report.cells_by_month.get(month, 0)},
                )
            )
        return dg.MaterializeResult(
            metadata={
                "months_counted": len(report.counted),
                "months_current": len(report.current),
                "cells_counted_in_run": report.cells,
                "rows_in": report.records,
                "rows_out": report.cells,
                "dagster/row_count": int(rows),
            }
        )

    return _counts


def _period(report: counting.CountReport) -> str:
    months = sorted(report.counted + report.current)
    return f"{months[0].isoformat()} to {months[-1].isoformat()}" if months else "empty"


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [counts_asset(o) for o in load_outputs(registry).values()]
