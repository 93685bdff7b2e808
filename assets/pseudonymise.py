"""Pseudonymise stage: validated rows enter the haven under keyed pseudonyms, minus type 1
objectors' GP records (safehaven.protect.haven); their direct identifiers go to the encrypted
identity vault, which the pipeline can write but not read (safehaven.protect.vault)."""

import dagster as dg

from assets import keys
from assets.guards import held_fails
from resources.haven import SafeHavenResource
from safehaven.core.pins import vault_public
from safehaven.intake.contracts import Contract, ContractRegistry
from safehaven.intake.validation import ensure_tables_validated, refuse_held
from safehaven.protect.haven import build_haven, haven_key
from safehaven.protect.pseudonymise import install_key
from safehaven.protect.vault import IDENTITY, vault_collection


def refuse_while_held(con, contract: Contract, registry: ContractRegistry) -> None:
    """Refuse the step while the collection's intake is not done with a drop it received
    (``safehaven.intake.validation.refuse_held``: landed but not validated, or refused with none
    passed since): its downstream stages are skipped in this run, and in every run until that is
    put right. Objections are guarded by the objection feed instead (``safehaven.protect.feed``:
    such a drop is a feed fault). A collection that never sent a drop (its intake never ran) gets
    its intake tables, empty, as intake would have made them."""
    ensure_tables_validated(con, contract)
    with held_fails():
        refuse_held(
            con,
            registry,
            [contract.collection],
            f"{contract.collection}'s haven and vault steps, and every stage after them,",
        )


def haven_asset(contract: Contract, registry: ContractRegistry) -> dg.AssetsDefinition:
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
        with haven.connect() as con:
            refuse_while_held(con, contract, registry)
            keyring = haven.keyring()
            key = haven_key(con, keyring)  # checked against the whole trail since the entry that set it
            # the vault public key only if a late type 1 purge must encrypt a kept value again
            report = build_haven(
                con, contract, key, registry.contracts.values(), lambda: vault_public(con, keyring), haven.home_dir()
            )
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
                "type1_records_purged": report.type1_purged,
                "type1_vault_entries_removed": report.type1_vault_removed,
                "batches": report.batches,
                "rows_in_haven_total": int(total),
                "dagster/row_count": int(total),
                "pseudonym_key_id": report.key_id,
            }
        )

    return _haven


def vault_asset(contract: Contract, registry: ContractRegistry) -> dg.AssetsDefinition:
    deps = [keys.validated(contract.collection)]
    if contract.kind == "content":
        deps.append(keys.OBJECTION_REGISTER)

    @dg.asset(
        key=keys.vault(contract.collection),
        deps=deps,
        group_name="pseudonymise",
        pool=keys.STORE_POOL,
        description=f"Direct identifiers of {contract.collection} (NHS number, full date of birth, full "
        "postcode) in the identity vault: AES-256-GCM bound to pid and field, data keys wrapped to the "
        "vault's public key.",
        kinds={"duckdb"},
    )
    def _vault(haven: SafeHavenResource) -> dg.MaterializeResult:
        keyring = haven.keyring()
        with haven.connect() as con:
            refuse_while_held(con, contract, registry)
            public = vault_public(con, keyring)  # pinned; refused while a vault rotation is pending
            install_key(con, "haven", haven_key(con, keyring))
            report = vault_collection(con, contract, registry.contracts.values(), public)
            total = con.execute(f"SELECT count(*) FROM {IDENTITY}").fetchone()[0]
        return dg.MaterializeResult(
            metadata={
                "rows_in": report.candidates,
                "batches": report.batches,
                "rows_out": report.entries,
                "vault_entries_total": int(total),
                "dagster/row_count": int(total),
                "type1_rows_not_vaulted": report.type1_rows_skipped,
                "fields": dg.MetadataValue.json(report.fields),
                "vault_key_id": report.vault_key_id,
            }
        )

    return _vault


def build(registry: ContractRegistry) -> list[dg.AssetsDefinition]:
    havens = [haven_asset(c, registry) for c in registry.content()]
    return havens + [vault_asset(c, registry) for c in registry.contracts.values()]
