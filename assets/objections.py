"""Objections stage: the objection register, fed by validated objection drops (CoP 11-14)."""


import dagster as dg

from assets import keys
from resources.haven import SafeHavenResource
from safehaven.contracts import ContractRegistry
from safehaven.objections import EVENTS, current_sql, register_objections
from safehaven.pseudonymise import install_key


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    contract = registry.objections()

    @dg.asset(
        key=keys.OBJECTION_REGISTER,
        deps=[keys.validated(contract.collection)],
        group_name="objections",
        pool=keys.STORE_POOL,
        description="Append-only register of objections (type 1 and national data opt-out), "
        "keyed by haven pseudonym; the current state is derived from it.",
        kinds={"duckdb"},
    )
    def objection_register(haven: SafeHavenResource) -> dg.MaterializeResult:
        with haven.connect() as con:
            install_key(con, "haven", haven.keyring().get_or_create("haven").material)
            added = register_objections(con, contract)
            total = con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0]
            in_force = dict(con.execute(
                f"SELECT objection_type, count(*) FILTER (WHERE in_force) FROM ({current_sql()}) GROUP BY 1"
            ).fetchall())
        return dg.MaterializeResult(
            metadata={
                "rows_in": added,
                "rows_out": int(total),
                "type1_in_force": int(in_force.get("type1", 0)),
                "national_opt_out_in_force": int(in_force.get("national_opt_out", 0)),
            }
        )

    return [objection_register]
