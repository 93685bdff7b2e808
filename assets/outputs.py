"""Aggregate stage: each declared output counted in the store, protected by statistical
disclosure control and checked before it enters the published zone (CoP 34b, 35; ISB 1523).

Thin: the rules live in ``safehaven.publish.outputs`` (counting, grid, protection), ``safehaven.publish.publication``
(the publication guard), ``safehaven.publish.quality`` (the statement) and ``safehaven.share.linkage``
(the agreement a linked output needs). Two blocking checks per output stop the publication
step of the same run when the protected table breaks a disclosure invariant or the guard.
"""

import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.outputs import Output, build_output, load_code_lists, load_outputs
from safehaven.publish.publication import guard_table
from safehaven.publish.quality import build_statement, render_markdown, store_statement
from safehaven.share import approvals
from safehaven.share.linkage import authorise_linkage


def sdc_check_name(output: Output) -> str:
    return f"{output.name}_disclosure_safe"


def guard_check_name(output: Output) -> str:
    return f"{output.name}_publication_guard"


def output_asset(output: Output) -> dg.AssetsDefinition:
    """The aggregate asset of one declared output, with its two blocking checks."""
    key = keys.published(output.name)
    specs = [
        dg.AssetCheckSpec(
            sdc_check_name(output),
            asset=key,
            blocking=True,
            description=f"No published count of 1-{output.policy.threshold}, every count on the "
            f"{output.policy.rounding} grid, no suppressed cell recoverable from its row or column, "
            "rates and totals from published values only"
            + (
                ", and no suppressed cell narrowed to 0 or 1-7 by the related outputs (LP audit)."
                if output.relations
                else "."
            ),
        ),
        dg.AssetCheckSpec(
            guard_check_name(output),
            asset=key,
            blocking=True,
            description="No pseudonym, direct identifier or fine-grained quasi-identifier by column name or "
            "value, no undeclared column, no formula-leading text.",
        ),
    ]
    linked = f" Linked under agreement {output.linkage.agreement}." if output.linkage else ""

    @dg.asset(
        key=key,
        # related outputs first: this one's suppression is chosen knowing them (disclosure.joint)
        deps=[keys.haven(c) for c in output.collections] + [keys.published(r.of) for r in output.relations if r.of],
        group_name="aggregate",
        pool=keys.STORE_POOL,
        check_specs=specs,
        description=output.title + linked,
        kinds={"duckdb"},
    )
    def _output(haven: SafeHavenResource) -> dg.MaterializeResult:
        registry = haven.registry()
        with haven.connect() as con:
            # The store's code lists, refreshed once for this unit of work (no write when current).
            load_code_lists(con, registry)
            agreement_id = None
            if output.linkage:
                agreement = authorise_linkage(
                    con,
                    approvals.effective_agreements(con, registry.root),  # the store's decisions, not the files
                    output.linkage.left,
                    output.linkage.right,
                    output.linkage.purpose,
                    registry=registry,
                )
                agreement_id = agreement.id
            built = build_output(
                con,
                output,
                registry,
                agreement_id=agreement_id,
                publication=load_outputs(registry),
                previous_folder=haven.home_dir().published,
            )
            guard = guard_table(con, built.table, output, registry)
            statement = build_statement(con, output, registry, haven.home_dir(), built)
            store_statement(con, statement)
        return dg.MaterializeResult(
            metadata={
                "rows_in": built.observed_cells,
                "rows_out": built.grid_cells,
                "dagster/row_count": built.grid_cells,
                **built.as_metadata(),
                "quality_statement": dg.MetadataValue.md(render_markdown(statement)),
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=sdc_check_name(output),
                    passed=not built.violations,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "violations": len(built.violations),
                        "first_violations": "; ".join(built.violations[:5]) or "none",
                    },
                ),
                dg.AssetCheckResult(
                    check_name=guard_check_name(output),
                    passed=not guard,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={"findings": len(guard), "first_findings": "; ".join(guard[:5]) or "none"},
                ),
            ],
        )

    return _output


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [output_asset(o) for o in load_outputs(registry).values()]
