"""Publish stage: protected outputs leave the store as open files (safehaven.publish)."""


import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.contracts import ContractRegistry
from safehaven.outputs import OUTPUTS
from safehaven.publish import OGL, export_table, write_dictionary, write_published_db


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    available = set(registry.contracts)
    outputs = [o for o in OUTPUTS if set(o.collections) <= available]

    @dg.asset(
        key=keys.PUBLISHED_FILES,
        deps=[keys.published(o.name) for o in outputs],
        group_name="publish",
        pool=keys.STORE_POOL,
        description="Anonymised outputs as CSV, Parquet and published.duckdb for analysts, "
        "under the Open Government Licence.",
        kinds={"csv", "parquet"},
    )
    def published_files(context: dg.AssetExecutionContext, haven: SafeHavenResource) -> dg.MaterializeResult:
        home = haven.home_dir()
        tables: dict[str, str] = {}
        rows = 0
        with haven.connect() as con:
            for output in outputs:
                table = f"published.{output.name}"
                export_table(con, table, output.name, home.published)
                columns = [(n, t) for n, t, *_ in con.execute(f"DESCRIBE {table}").fetchall()]
                write_dictionary(home.published, output.name, output.title, output.description,
                                 columns, {"dimensions": list(output.dimensions)})
                rows += con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                tables[output.name] = table
            write_published_db(con, tables, home.published_db)
        context.log.info(f"published {len(tables)} outputs to {home.published}")
        return dg.MaterializeResult(
            metadata={
                "rows_in": rows,
                "rows_out": rows,
                "outputs": len(tables),
                "location": dg.MetadataValue.path(str(home.published)),
                "licence": OGL,
            }
        )

    return [published_files]
