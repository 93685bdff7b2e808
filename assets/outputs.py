"""Aggregate stage: each anonymised output computed in the store and protected by
statistical disclosure control before it enters the published zone (CoP 34b, 35)."""


import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.contracts import ContractRegistry
from safehaven.disclosure import Policy, check_invariants, protect
from safehaven.outputs import OUTPUTS, Output, load_code_lists

POLICY = Policy()


def sdc_check_name(output: Output) -> str:
    return f"{output.name}_disclosure_safe"


def output_asset(output: Output) -> dg.AssetsDefinition:
    spec = dg.AssetCheckSpec(
        sdc_check_name(output),
        asset=keys.published(output.name),
        blocking=True,
        description="No published count of 1-7, every count rounded to 5, no suppressed cell "
        "recoverable from its row, column or total.",
    )

    @dg.asset(
        key=keys.published(output.name),
        deps=[keys.haven(c) for c in output.collections],
        group_name="aggregate",
        pool=keys.STORE_POOL,
        check_specs=[spec],
        description=output.title,
        kinds={"duckdb"},
    )
    def _output(haven: SafeHavenResource) -> dg.MaterializeResult:
        target = f"published.{output.name}"
        with haven.connect() as con:
            load_code_lists(con, haven.registry())
            con.execute(f"CREATE OR REPLACE TEMP TABLE _true_{output.name} AS {output.sql}")
            rows_in = con.execute(f"SELECT coalesce(sum({output.count_col}), 0) FROM _true_{output.name}").fetchone()[0]
            report = protect(con, f"_true_{output.name}", target, list(output.dimensions),
                             count_col=output.count_col, policy=POLICY)
            violations = check_invariants(con, target, list(output.dimensions), output.count_col, POLICY)
            cells = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
        return dg.MaterializeResult(
            metadata={"rows_in": int(rows_in), "rows_out": int(cells), **report.as_metadata()},
            check_results=[
                dg.AssetCheckResult(
                    check_name=sdc_check_name(output),
                    passed=not violations,
                    severity=dg.AssetCheckSeverity.ERROR,
                    metadata={"violations": len(violations),
                              "first_violations": "; ".join(violations[:5]) or "none"},
                )
            ],
        )

    return _output


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    available = set(registry.contracts)
    return [output_asset(o) for o in OUTPUTS if set(o.collections) <= available]
