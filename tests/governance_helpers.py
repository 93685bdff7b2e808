"""Shared helpers for the agreements, linkage, releases and subject-access tests.

``small_haven`` builds haven tables through the real pseudonymisation SQL
(``safehaven.protect.pseudonymise.haven_select_sql``) from a few known test NHS numbers, so pids are
genuine HMACs and a test can ask about a person by NHS number. The population is shaped so
that k-anonymity has work to do: a large group, a group of ten, and two unique people.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any
from unittest import mock

import duckdb
import yaml

from safehaven.core import audit, registers
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.sql import q
from safehaven.core.store import Store
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.intake.ingest import BATCHES, ensure_tables
from safehaven.protect import objections
from safehaven.protect.pseudonymise import haven_select_sql, install_key, pseudonym
from safehaven.share import approvals
from tests.unit.validation_helpers import nhs_numbers

NHS = nhs_numbers(60)
#: people in the big group, the group of ten, and two unique people (indexes into NHS)
BIG, TEN, UNIQUE = range(0, 40), range(40, 50), (50, 51)
OPTED_OUT, WITHDRAWN, TYPE1 = 3, 5, 7


def contracts_root(tmp_path: Path) -> Path:
    """A copy of the project's collections and code lists with an empty agreements folder."""
    root = tmp_path / "data_contracts"
    for sub in ("collections", "code_lists"):
        shutil.copytree(CONTRACTS_DIR / sub, root / sub)
    (root / "agreements").mkdir()
    return root


BASE: dict[str, Any] = {
    "id": "test-linked",
    "version": "1.0.0",
    "title": "A linked pseudonymised test extract",
    "instrument": "contract",
    "recipient": {"name": "Test University (synthetic)", "public_body": False},
    "purposes": ["Research into the transition from hospital to adult social care."],
    "legal_basis": {"basis": "section_251", "reference": "CAG 00/CAG/0000 (synthetic)"},
    "identifiability": "pseudonymised",
    "collections": ["hospital_episodes", "social_care"],
    "fields": [
        {
            "collection": "hospital_episodes",
            "field": "date_of_birth",
            "justification": "Age at admission is the main confounder of the outcome.",
        },
        {
            "collection": "hospital_episodes",
            "field": "sex",
            "justification": "Outcomes differ by sex and the analysis is stratified by it.",
        },
        {
            "collection": "hospital_episodes",
            "field": "admission_date",
            "justification": "Length of stay is an exposure of the study.",
        },
        {
            "collection": "social_care",
            "field": "service_type",
            "justification": "The kind of care started after discharge is the outcome.",
        },
    ],
    "linkages": [
        {
            "left": "hospital_episodes",
            "right": "social_care",
            "purpose": "Link hospital episodes to the social care that follows.",
        }
    ],
    "coarsening": {"dob": "year", "postcode": "none"},
    "k_anonymity": 5,
    "onward_sharing": {"permitted": False, "terms": "No onward sharing."},
    "publication": {"licence": "CC-BY-4.0", "terms": "Open access papers only."},
    "start_date": "2025-01-01",
    "end_date": "2099-12-31",
    "retention": {
        "days": 365,
        "destruction": "Destroyed at the end, certified.",
        "on_breach": "Destroyed on notice, certified.",
    },
    "audit": "Annual audit by the haven.",
    "penalties": "Termination and a report to the ICO.",
    "approval": {"status": "approved", "approver": "Dr Test, Caldicott Guardian", "date": "2025-01-01"},
}


def agreement_data(**overrides: Any) -> dict[str, Any]:
    """The base agreement with top-level keys replaced."""
    data = copy.deepcopy(BASE)
    data.update(copy.deepcopy(overrides))
    return data


#: who adopts agreements in tests, as the governance lead would (``safehaven agreements adopt``)
GOVERNANCE_LEAD = "Dr Test, Caldicott Guardian"


def adopt(con: duckdb.DuckDBPyConnection, registry: ContractRegistry, *ids: str) -> None:
    """Adopt the agreements' ``approval:`` blocks (all under ``registry.root`` when no id is given)
    as the governance lead would: a file's block alone approves nothing (issue 18)."""
    approvals.adopt(con, list(ids) or None, GOVERNANCE_LEAD, "adopted for the test", registry=registry, actor="ig-lead")


def adopt_project_agreements(home: Home) -> None:
    """Adopt the project's own agreements (``data_contracts/agreements``) in ``home``'s store."""
    with Store(home).connect() as con:
        adopt(con, ContractRegistry())


def record_unchecked_decision(con: duckdb.DuckDBPyConnection, registry: ContractRegistry, *ids: str) -> None:
    """Record the files' ``approval:`` blocks as decisions *without* adoption's problems check,
    as a store holds decisions adopted before ``approvals.adopt`` checked a file (or whose
    contracts changed since): only to prove the release-time refusals that still guard them."""
    for aid in ids:
        s = approvals.load_standing(con, aid, registry.root)
        approvals._record(
            con,
            s.agreement,
            s.sha256,
            decision=s.agreement.approval.status,
            by=GOVERNANCE_LEAD,
            on=haven_today(),
            reason="decided before adoption checked the file",
            source=approvals.SOURCE_FILE,
            actor="ig-lead",
        )


def write_agreement(root: Path, data: dict[str, Any]) -> Path:
    path = root / "agreements" / f"{data['id']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def small_haven(con: duckdb.DuckDBPyConnection, keyring: KeyRing, registry: ContractRegistry) -> dict[str, str]:
    """Build ``haven.<collection>`` and the objection register; returns NHS number -> pid.

    On a new haven the run is recorded first (``audit.begin_run``, as the pipeline's resource
    does): an audit trail is never started on a store that already holds data (CoP 23d)."""
    if audit._tail(con).seq == 0:
        audit.begin_run(con, audit.home_of(con), actor="pipeline", job="small_haven", run_id="small_haven")
    key = keyring.get_or_create("haven")
    install_key(con, "haven", key.material)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _people AS SELECT i, nhs, "
        f"CASE WHEN i < {TEN.start} THEN DATE '1950-06-15' WHEN i < {TEN.stop} THEN DATE '1960-03-10' "
        f"WHEN i = {UNIQUE[0]} THEN DATE '1930-01-20' ELSE DATE '1925-05-05' END AS date_of_birth, "
        f"CASE WHEN i < {TEN.start} THEN '1' WHEN i < {TEN.stop} THEN '2' WHEN i = {UNIQUE[0]} THEN '9' "
        "ELSE '1' END AS sex, 'LS1 4AP' AS postcode "
        "FROM (SELECT unnest(range(len(?))) AS i, unnest(?) AS nhs)",
        [NHS[:52], NHS[:52]],
    )
    rows = {
        "hospital_episodes": (
            "SELECT 'RR8' AS provider_code, nhs AS nhs_number, date_of_birth, sex, postcode, "
            "DATE '2025-11-01' + CAST(i + e * 40 AS INTEGER) AS admission_date, "
            "DATE '2025-11-03' + CAST(i + e * 40 AS INTEGER) AS discharge_date, 'S72' AS primary_diagnosis "
            "FROM _people, range(2) t(e)"
        ),
        "social_care": (
            "SELECT 'E09000028' AS local_authority_code, 'short_term_reablement' AS service_type, "
            "DATE '2025-11-10' + CAST(i AS INTEGER) AS start_date, NULL::DATE AS end_date, nhs AS nhs_number, "
            f"date_of_birth, sex, postcode FROM _people WHERE i < 30 OR i BETWEEN 40 AND 44 OR i = {UNIQUE[0]}"
        ),
        "gp_events": (
            "SELECT CASE WHEN i % 2 = 0 THEN 'A81001' ELSE 'A81002' END AS practice_code, nhs AS nhs_number, "
            "date_of_birth, sex, postcode, DATE '2025-12-01' + CAST(e AS INTEGER) AS event_date, "
            "'44054006' AS diagnosis_code FROM _people, range(3) t(e)"
        ),
    }
    for c, sql in rows.items():
        contract = registry.contracts[c]
        ensure_tables(con, contract)  # the batch register (and an empty landing table)
        cols = ", ".join(q(f) for f in contract.field_names)
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _src AS SELECT {cols}, 'b-{c}' AS _batch, "
            f"row_number() OVER () AS _row FROM ({sql})"
        )
        con.execute(f"CREATE OR REPLACE TABLE haven.{c} AS {haven_select_sql(contract, '_src')}")
        con.execute(
            f"INSERT INTO {BATCHES} (batch_id, collection, landed_at, status) "
            f"VALUES ('b-{c}', '{c}', now() - INTERVAL 1 DAY, 'accepted')"
        )
    objections.ensure_tables(con)
    con.execute(  # the objections file the register was refreshed from (safehaven.protect.feed)
        f"INSERT INTO {BATCHES} (batch_id, collection, landed_at, status, validated_at) "
        "VALUES ('b-objections', 'objections', now() - INTERVAL 1 DAY, 'accepted', now() - INTERVAL 1 DAY)"
    )
    pids = {n: pseudonym(key.material, n) for n in NHS}
    events = [
        (1, pids[NHS[OPTED_OUT]], "national_opt_out", date(2024, 1, 1), None),
        (2, pids[NHS[WITHDRAWN]], "national_opt_out", date(2024, 1, 1), date(2024, 6, 1)),
        (3, pids[NHS[TYPE1]], "type1", date(2024, 1, 1), None),
    ]
    con.executemany(
        f"INSERT INTO {objections.EVENTS} (event_id, pid, objection_type, recorded_date, withdrawn_date, "
        "_batch, _row, registered_at) VALUES (?, ?, ?, ?, ?, 'b-objections', 1, now())",
        events,
    )
    return pids


def small_haven_template(root: Path) -> dict[str, str]:
    """``small_haven`` built once under ``root`` for a module's tests to copy (``copy_small_haven``):
    ``root/haven`` (a haven home with the vault's keys) and ``root/data_contracts``
    (``contracts_root``: no agreement), closed; never change it. Returns NHS number -> pid."""
    import pytest

    from safehaven.cli.common import PASSPHRASE_ENV
    from tests.conftest import TEST_PASSPHRASE, with_vault_keys

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SAFEHAVEN_HOME", str(root / "haven"))
        mp.setenv(PASSPHRASE_ENV, TEST_PASSPHRASE)
        home = with_vault_keys(Home(root / "haven").ensure())
        with Store(home).connect() as con:
            return small_haven(con, KeyRing(home.keys), ContractRegistry(contracts_root(root)))


def copy_small_haven(template: Path, home: Home, root: Path) -> ContractRegistry:
    """A copy of ``small_haven_template``'s haven in ``home`` (the store travels with its keys) and
    of its contracts under ``root``; returns their registry. A connection to the copy needs
    ``install_haven_key`` as ``small_haven``'s own connection had it."""
    shutil.copytree(template / "haven", home.root, dirs_exist_ok=True)
    return ContractRegistry(shutil.copytree(template / "data_contracts", root / "data_contracts"))


def install_haven_key(con: duckdb.DuckDBPyConnection, keyring: KeyRing) -> None:
    """The haven key on ``con``, as ``small_haven`` installs it on its connection."""
    install_key(con, "haven", keyring.get_or_create("haven").material)


#: two output checkers, neither of them the operator of the run (the OS user), and the custodian
REVIEWERS = ("R. One, Output checker", "R. Two, Output checker")
CUSTODIAN = "V. Keeper, vault custodian"


def login_of(name: str) -> str:
    """The OS login a test's reviewer works at: one per name, never the test process's own (which
    prepares the requests), as each output checker logs in as themselves."""
    return "login-" + re.sub(r"[^a-z0-9]+", "-", name.casefold()).strip("-")


@contextmanager
def logged_in_as(login: str) -> Iterator[None]:
    """Act as the OS account ``login``, then as before: ``registers.os_login`` (the account of the
    process's real uid, never the environment) answers ``login``. A test cannot create accounts,
    so it stands in for the user database; every caller looks it up in its module when it runs."""
    with mock.patch.object(registers, "os_login", return_value=login):
        yield


def approve_as(con: duckdb.DuckDBPyConnection, release_id: str, by: str, *, login: str | None = None,
               **kwargs: Any) -> Any:  # fmt: skip
    """``review.approve`` by ``by`` at their own OS login (``login``, else :func:`login_of`)."""
    from safehaven.share import review

    with logged_in_as(login or login_of(by)):
        return review.approve(con, release_id, by, **kwargs)


def approve_release(
    con: duckdb.DuckDBPyConnection, release_id: str, home: Any, reviewers=REVIEWERS, *, registry: ContractRegistry
) -> Any:
    """Approve a prepared request as each reviewer in turn, each at their own login
    (``safehaven.share.review``); the request is delivered on the last approval its rule needs.
    Returns the request."""
    from safehaven.share import review

    req = review.get(con, release_id)
    for by in reviewers[: req.reviewers_needed]:
        req = approve_as(con, release_id, by, home=home, registry=registry)
    if req.state == review.APPROVED:  # identifiable: the vault custodian delivers it
        req = review.deliver(con, release_id, home=home, registry=registry, by=CUSTODIAN)
    return req


def prepare_and_release(con: duckdb.DuckDBPyConnection, agreement_id: str, *, haven: Any, **kwargs: Any) -> Any:
    """``releases.prepare`` under the context ``haven`` (``safehaven.context.Haven``), then two
    reviewers' approvals: the old one-step release, through review.

    Returns the preparation's result with ``status`` and ``directory`` as delivered (a skipped
    or unchanged result is returned as it is).
    """
    from safehaven.share.releases import PREPARED, RELEASED, prepare

    home = haven.home
    result = prepare(con, agreement_id, haven=haven, **kwargs)
    if result.status == PREPARED:
        approve_release(con, result.release_id, home, registry=haven.contracts)
        result.status, result.directory = RELEASED, home.releases / agreement_id / result.release_id
    return result


def renames_once(rename: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """``os.rename`` that works once (a delivery's move) and then fails, as a killed process renames
    nothing back (its rollback never runs)."""
    calls: list[object] = []

    def first_only(src: Any, dst: Any) -> Any:
        calls.append(src)
        if len(calls) > 1:
            raise OSError("the process was killed")
        return rename(src, dst)

    return first_only


def delivery_stopped(approve: Callable[[], object], killed_in: str = "_register") -> None:
    """Run ``approve`` (the approval that delivers) as a delivery killed after its files moved into
    ``releases/``: in ``review.<killed_in>`` (``_register``: before its register row;
    ``_audit_delivery``: after it), which raises as a kill would, and the rename back never runs
    (:func:`renames_once`)."""
    import pytest

    from safehaven.share import review

    def killed(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt("killed")

    with (
        mock.patch.object(review, killed_in, killed),
        mock.patch.object(review.os, "rename", renames_once(review.os.rename)),
        pytest.raises((KeyboardInterrupt, OSError)),
    ):
        approve()
