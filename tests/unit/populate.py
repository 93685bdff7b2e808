"""A small populated haven built with the core functions only (no Dagster): for unit tests of
objections, pseudonyms, the vault, rotation and re-identification."""

from __future__ import annotations

import csv
from pathlib import Path

from safehaven.core import audit
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.pins import vault_public
from safehaven.core.store import Store
from safehaven.intake import batch_seal
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ingest_collection
from safehaven.intake.validation import validate_collection
from safehaven.protect.haven import build_haven, haven_key
from safehaven.protect.objections import register_objections
from safehaven.protect.pseudonymise import install_key
from safehaven.protect.vault import vault_collection
from safehaven.tools import synthetic


def drop(home: Home, patients: int = 300, seed: int = 7) -> None:
    synthetic.generate(home.incoming, patients=patients, seed=seed, defect_rate=0.0)


def process(home: Home, registry: ContractRegistry | None = None) -> dict[str, object]:
    """Ingest, validate, register objections, build the haven and the vault, in pipeline order.
    On a new haven the run is recorded first (``audit.begin_run``, as the pipeline's resource
    does), so the trail starts before any data lands: it is never started on a store that holds
    data (CoP 23d). Later calls do not verify the trail first (a test may run this over a trail
    a killed step left behind its anchor)."""
    registry = registry or ContractRegistry()
    keyring = KeyRing(home.keys)
    reports: dict[str, object] = {}
    with Store(home).connect() as con:
        if audit._tail(con).seq == 0:
            audit.begin_run(con, home, actor="pipeline", job="populate", run_id="populate")
        for contract in registry.contracts.values():
            c = contract.collection
            sealer = batch_seal.sealer_for(con, contract, home)
            ingest_collection(con, contract, home.incoming_for(c), home.quarantine_for(c), sealer=sealer)
            validate_collection(con, contract, registry, home.quarantine_for(c), sealer=sealer)
        key = haven_key(con, keyring)
        install_key(con, "haven", key)
        objections = registry.objections()
        register_objections(con, objections, key.key_id)
        public = vault_public(con, keyring)  # pinned; refused while a vault rotation is pending
        vault_collection(con, objections, registry.contracts.values(), public)
        for contract in registry.content():
            reports[contract.collection] = build_haven(  # installs the haven key too
                con, contract, key, registry.contracts.values(), lambda: public
            )
            vault_collection(con, contract, registry.contracts.values(), public)
    return reports


def populated(home: Home, patients: int = 300, seed: int = 7) -> dict[str, object]:
    drop(home, patients, seed)
    return process(home)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
