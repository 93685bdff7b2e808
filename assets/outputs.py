"""Aggregate stage: each declared output counted in the store, protected by statistical
disclosure control and checked before it enters the published zone (CoP 34b, 35; ISB 1523).

Thin: the unit of work is ``safehaven.publish.aggregate`` (an output is rebuilt only when an
input changed: ``safehaven.publish.reuse``), built from the month counts of ``counts/<output>_counts``
(``assets.counts``; a stale month is counted first); the rules live in ``safehaven.publish.outputs``
(counting, grid, protection), ``safehaven.publish.publication`` (the publication guard),
``safehaven.publish.quality`` (the statement) and ``safehaven.share.linkage``
(the agreement a linked output needs). Two blocking checks per output stop the publication
step of the same run when the protected table breaks a disclosure invariant or the guard.
"""

import dagster as dg

from assets import keys
from assets.guards import held_fails
from resources.haven import SafeHavenResource
from safehaven.intake.contracts import ContractRegistry
from safehaven.publish.aggregate import aggregate
from safehaven.publish.outputs import Output, load_outputs
from safehaven.publish.quality import render_markdown


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
        # its counts (a month still stale is counted here from the haven), and related outputs first:
        # this one's suppression is chosen knowing them (disclosure.joint)
        deps=[keys.counts(output.name), *(keys.haven(c) for c in output.collections)]
        + [keys.published(r.of) for r in output.relations if r.of],
        group_name="aggregate",
        pool=keys.STORE_POOL,
        check_specs=specs,
        description=output.title + linked,
        kinds={"duckdb"},
    )
    def _output(haven: SafeHavenResource) -> dg.MaterializeResult:
        with haven.connect() as con, held_fails():
            result = aggregate(con, output, haven.registry(), haven.home_dir())
        md = render_markdown(result.statement) if result.statement else None
        statement = {"quality_statement": dg.MetadataValue.md(md)} if md else {}
        return dg.MaterializeResult(
            metadata={
                **result.metadata,
                "dagster/row_count": int(result.metadata.get("grid_cells", 0)),
                **statement,
            },
            check_results=[
                dg.AssetCheckResult(
                    check_name=sdc_check_name(output),
                    passed=not result.violations,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={
                        "violations": len(result.violations),
                        "first_violations": "; ".join(result.violations[:5]) or "none",
                    },
                ),
                dg.AssetCheckResult(
                    check_name=guard_check_name(output),
                    passed=not result.guard,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={"findings": len(result.guard), "first_findings": "; ".join(result.guard[:5]) or "none"},
                ),
            ],
        )

    return _output


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    return [output_asset(o) for o in load_outputs(registry).values()]
