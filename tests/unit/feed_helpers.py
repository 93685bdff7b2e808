"""A small haven whose objections arrive as real files through real ingest, validation and the
register step (``tests.unit.test_feed``, ``tests.unit.test_batch_seal``)."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from safehaven.cli.common import PASSPHRASE_ENV
from safehaven.context import Haven as Context
from safehaven.core import registers as reg
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake import batch_seal, ingest
from safehaven.intake.contracts import ContractRegistry
from safehaven.intake.ingest import ingest_collection
from safehaven.intake.validation import ValidationReport, validate_collection
from safehaven.protect import feed, register_seal
from safehaven.protect.pseudonymise import install_key
from safehaven.protect.register_seal import register_and_seal
from safehaven.share.releases import ReleaseRefused
from tests.conftest import TEST_PASSPHRASE, with_vault_keys
from tests.governance_helpers import (
    BASE,
    NHS,
    adopt,
    agreement_data,
    contracts_root,
    prepare_and_release,
    small_haven,
    write_agreement,
)

COLUMNS = ["nhs_number", "objection_type", "recorded_date", "withdrawn_date", "source_practice"]
#: a recorded date in the future (a month ahead: the same across a run that passes midnight)
FUTURE = (haven_today() + timedelta(days=30)).isoformat()
#: hospital_episodes holds two records per person (small_haven)
EPISODES_EACH = 2


@dataclass
class Haven:
    home: Home
    con: duckdb.DuckDBPyConnection
    registry: ContractRegistry
    keyring: KeyRing
    pids: dict[str, str]
    agreement: str = "test-feed"

    def drop(self, name: str, rows: list[list[str]], *, excel: bool = False) -> None:
        """An objections file; ``excel``: BOM, every field quoted, CRLF (pandas QUOTE_ALL / Excel)."""
        text = io.StringIO()
        writer = csv.writer(text, quoting=csv.QUOTE_ALL if excel else csv.QUOTE_MINIMAL, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        writer.writerows(rows)
        folder = self.home.incoming_for("objections")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(text.getvalue().encode("utf-8-sig" if excel else "utf-8"))

    def land(self, drops: list[str] | None = None) -> ingest.IngestReport:
        """An intake run's landing of the objections files waiting (or of ``drops``) and no more."""
        folder, quarantine = self.home.incoming_for("objections"), self.home.quarantine_for("objections")
        contract = self.registry.objections()
        return ingest_collection(self.con, contract, folder, quarantine, drops=drops, sealer=self.sealer())

    def sealer(self) -> batch_seal.Sealer:
        """The objections sealer an intake step passes to landing and validation."""
        return batch_seal.sealer(self.con, "objections", self.home)

    def age(self, days: int) -> None:
        """As if every batch had landed ``days`` earlier: their landing times moved back and sealed
        again as the haven would have sealed them then (``safehaven.intake.batch_seal``)."""
        self.con.execute("UPDATE governance.batches SET landed_at = landed_at - INTERVAL (?) DAY", [days])
        sealer = self.sealer()
        for stage, batches in sealer.held(self.con).items():
            sealer.seal(self.con, stage, batches)

    def learnt_earlier(self, days: int) -> None:
        """As if the register had learnt all it holds ``days`` earlier (a withdrawal dated since then
        is news, ``safehaven.protect.objections._judge_batch``): every batch's arrival and landing,
        every file sent again's arrival and registration, and every event's registration moved back,
        and sealed again as the haven would have sealed them then."""
        self.con.execute("UPDATE governance.batches SET arrived_at = arrived_at - INTERVAL (?) DAY", [days])
        self.con.execute(
            "UPDATE governance.objection_restatements SET arrived_at = arrived_at - INTERVAL (?) DAY, "
            "noted_at = noted_at - INTERVAL (?) DAY, registered_at = registered_at - INTERVAL (?) DAY",
            [days] * 3,
        )
        sealer = self.sealer()
        for drop in sealer.restatements(self.con):
            sealer.seal_restatement(self.con, drop)
        self.age(days)
        self.con.execute(
            "UPDATE governance.objection_events SET registered_at = registered_at - INTERVAL (?) DAY", [days]
        )
        register_seal.seal(self.con, self.home, actor="test run")

    def validate(self) -> ValidationReport:
        """An intake run's validation of the objections batches landed."""
        quarantine = self.home.quarantine_for("objections")
        return validate_collection(
            self.con, self.registry.objections(), self.registry, quarantine, sealer=self.sealer()
        )

    def run(self) -> bool:
        """Ingest, validate and register objections as the pipeline does; False when validation refused a batch."""
        contract = self.registry.objections()
        self.land()
        report = self.validate()
        waiting = feed.waiting_since(self.home)
        register_and_seal(self.con, contract, "", self.home, actor="test run", waiting_since=waiting)  # the step
        return report.gx_success

    def release(self, today: date | None = None, **kwargs: Any):
        """Adopt the agreement's approval as the governance lead would (once), prepare a release and
        approve it through the two-person review (the whole door)."""
        adopt(self.con, self.registry, self.agreement)
        context = Context.open(self.home, contracts=self.registry, keyring=self.keyring, today=today)
        return prepare_and_release(self.con, self.agreement, haven=context, **kwargs)

    def members(self, release_id: str) -> set[str]:
        rows = self.con.execute(f"SELECT pid FROM {reg.RELEASE_MEMBERS} WHERE release_id = ?", [release_id])
        return {r[0] for r in rows.fetchall()}


@dataclass(frozen=True)
class Template:
    """A small haven built once (``small_haven_template``), copied into a test's home by ``open_haven``."""

    root: Path
    pids: dict[str, str]


def small_haven_template(root: Path) -> Template:
    """The small haven ``open_haven`` builds, built once under ``root`` (``haven/`` with its keys,
    ``data_contracts/`` with the test agreement) and closed; never change it, copy it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root / "haven"))
        mp.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
        with open_haven(with_vault_keys(Home(root / "haven").ensure()), root) as haven:
            return Template(root, dict(haven.pids))


@contextmanager
def open_haven(home: Home, root: Path, template: Template | None = None) -> Iterator[Haven]:
    """A small haven in ``home`` with the test agreement written under ``root``; with ``template``,
    a copy of that haven (its store travels with its keys) instead of one built here."""
    if template is not None:
        shutil.copytree(template.root / "haven", home.root, dirs_exist_ok=True)
        registry = ContractRegistry(shutil.copytree(template.root / "data_contracts", root / "data_contracts"))
        keyring = KeyRing(home.keys)
        with Store(home).connect() as con:
            install_key(con, "haven", keyring.get_or_create("haven").material)  # as small_haven does
            yield Haven(home, con, registry, keyring, dict(template.pids))
        return
    registry = ContractRegistry(contracts_root(root))
    keyring = KeyRing(home.keys)
    write_agreement(
        registry.root,
        agreement_data(
            id="test-feed",
            collections=["hospital_episodes"],
            linkages=[],
            fields=[f for f in BASE["fields"] if f["collection"] == "hospital_episodes"],
            small_groups="suppress",
            max_suppressed_share=1.0,
        ),
    )
    with Store(home).connect() as con:
        pids = small_haven(con, keyring, registry)
        yield Haven(home, con, registry, keyring, pids)


def opt_out(i: int, recorded: str = "2024-03-01") -> list[str]:
    return [NHS[i], "national_opt_out", recorded, "", ""]


def refused(haven: Haven) -> str:
    with pytest.raises(ReleaseRefused) as exc:
        haven.release()
    return str(exc.value)


def misroute(haven: Haven, name: str, data: bytes | str) -> Path:
    """Drop ``data`` as ``name`` in incoming/hospital_episodes/ (a content collection's folder) and
    ingest it there, where it is quarantined; returns that collection's quarantine folder."""
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    contract = haven.registry.contracts["hospital_episodes"]
    quarantine = haven.home.quarantine_for("hospital_episodes")
    assert ingest.ingest_collection(haven.con, contract, folder, quarantine).files_quarantined == 1
    return quarantine
