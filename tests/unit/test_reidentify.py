"""Re-identification only through the CLI, only under an agreement permitting identifiable data."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from safehaven.cli.main import main
from safehaven.context import Haven
from safehaven.core import audit, registers
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing, agreement_key
from safehaven.core.store import Store
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from safehaven.protect.objections import objectors_sql
from safehaven.protect.optouts import MEMBERS
from safehaven.protect.optouts import ensure_tables as ensure_optout_tables
from safehaven.protect.pseudonymise import install_key, pseudonym, release_pseudonym
from safehaven.share.reidentify import ReidentificationRefused, reidentify
from tests.conftest import copy_haven, custodian_ring
from tests.governance_helpers import adopt


def _agreement(root: Path, agreement_id: str, basis: str, level: str = "identifiable", status: str = "approved"):
    data = yaml.safe_load((CONTRACTS_DIR / "agreements" / "cohort-consent-study.yaml").read_text())
    data.update(
        id=agreement_id,
        identifiability=level,
        start_date=haven_today() - timedelta(days=30),
        end_date=haven_today() + timedelta(days=300),
    )
    data["legal_basis"] = {"basis": basis, "reference": "test reference 1"}
    data["approval"] = {"status": status, "approver": "Caldicott Guardian (test)", "date": haven_today()}
    if level != "identifiable":
        data["fields"] = [f for f in data["fields"] if f["field"] != "nhs_number"]
    (root / "agreements" / f"{agreement_id}.yaml").write_text(yaml.safe_dump(data))


@pytest.fixture
def contracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "contracts"
    shutil.copytree(CONTRACTS_DIR, root)
    _agreement(root, "reid-consent", "consent")
    _agreement(root, "reid-s251", "section_251")
    _agreement(root, "reid-pseudo", "section_251", level="pseudonymised")
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    return root


@pytest.fixture
def released(home: Home, contracts: Path, populated_haven: Path) -> dict[str, object]:
    """A haven where ten hospital patients, some objecting, were released to each agreement."""
    copy_haven(populated_haven, home)  # as populated(home) leaves it
    keyring = KeyRing(home.keys)
    with Store(home).connect() as con:
        ensure_optout_tables(con)
        install_key(con, "haven", keyring.get("haven"))
        objectors = {r[0] for r in con.execute(objectors_sql()).fetchall()}
        people = [
            r[0]
            for r in con.execute(
                "SELECT DISTINCT nhs_number FROM landing.hospital_episodes_valid ORDER BY 1"
            ).fetchall()
        ]
        key = keyring.get("haven").material
        chosen = [n for n in people if pseudonym(key, n) in objectors][:2]
        chosen += [n for n in people if pseudonym(key, n) not in objectors][:8]
        adopt(con, ContractRegistry(contracts), "reid-consent", "reid-s251", "reid-pseudo")
        for a in ("reid-consent", "reid-s251", "reid-pseudo"):
            con.executemany(
                f"INSERT INTO {MEMBERS} VALUES ('r1', ?, ?, now())", [[a, pseudonym(key, n)] for n in chosen]
            )
        _delivered(con, home, "r1")
    return {"nhs": chosen, "objecting": chosen[:2], "pid": {n: pseudonym(key, n) for n in chosen}}


def _delivered(con, home: Home, release_id: str) -> None:
    """The audit entry of a release's delivery, as ``safehaven.share.review.deliver`` writes it (the
    members above stand for what that delivery registered)."""
    from safehaven.share import review

    audit.append(con, actor="custodian", role="review", action=review.RELEASE_ACTION, object=f"release:{release_id}",
                 home=home, detail={"release_id": release_id})  # fmt: skip
    registers.ensure_tables(con)  # and its register row, as delivery registers it
    con.execute(
        f"INSERT INTO {registers.RELEASE_REGISTER} (release_id, agreement_id, agreement_version, agreement_sha256, "
        "recipient, recipient_public_body, purposes, legal_basis, collections, identifiability, agreement_start, "
        "agreement_end, released_at, opt_outs_applied, opt_outs_reason, files, records_released, "
        "records_withheld_objections, objector_records_included, people_suppressed_k_anonymity, manifest_sha256) "
        "VALUES (?, 'reid-consent', '1', 'x', 'A university', true, 'research', 'consent', 'hospital_episodes', "
        "'identifiable', DATE '2024-01-01', DATE '2099-01-01', now(), false, 'consent', 1, 10, 0, 0, 0, 'x')",
        [release_id],
    )


def _lead(home: Home, contracts: Path) -> Haven:
    """The key custodian's context, under the test's contracts root."""
    return Haven.open(home, contracts=ContractRegistry(contracts), keyring=custodian_ring(home), actor="lead")


def _ps(home: Home, agreement_id: str, pid: str) -> str:
    return release_pseudonym(agreement_key(KeyRing(home.keys), agreement_id), pid)


def test_consented_agreement_re_identifies_its_own_released_people(home: Home, released, contracts: Path) -> None:
    asked = {_ps(home, "reid-consent", released["pid"][n]): n for n in released["nhs"]}
    stranger = _ps(home, "reid-s251", released["pid"][released["nhs"][3]])  # another recipient's pseudonym
    result = reidentify(
        _lead(home, contracts),
        "reid-consent",
        [*asked, stranger, "not-a-pseudonym"],
    )
    assert {p: v["nhs_number"] for p, v in result.identified.items()} == {p: [n] for p, n in asked.items()}
    assert result.fields == ["nhs_number"], "only the identifiers the agreement releases"
    assert result.not_released == 1 and result.malformed == 1
    assert result.withheld_objection == 0, "consent: the opt-out does not apply"
    with Store(home).connect() as con:
        entries = audit.entries_for(con, agreement="reid-consent")
        people = [e for e in entries if e.object in set(released["pid"].values())]
        summary = [e for e in entries if e.object == "agreement:reid-consent"][-1]
    assert len(people) == len(asked) and summary.legal_basis == "consent"
    assert all(n not in str(e.detail_value) for e in entries for n in released["nhs"])


def test_the_opt_out_withholds_objectors_under_section_251(home: Home, released, contracts: Path) -> None:
    asked = [_ps(home, "reid-s251", released["pid"][n]) for n in released["nhs"]]
    result = reidentify(_lead(home, contracts), "reid-s251", asked)
    assert result.withheld_objection == len(released["objecting"]) == 2
    got = {v["nhs_number"][0] for v in result.identified.values()}
    assert got == set(released["nhs"]) - set(released["objecting"])


@pytest.mark.parametrize("agreement_id", ["reid-pseudo", "no-such-agreement"])
def test_refused_without_a_basis_for_identifiable_data_audited_and_registered(
    home: Home, released, contracts: Path, agreement_id: str
) -> None:
    with pytest.raises(ReidentificationRefused):
        reidentify(
            _lead(home, contracts),
            agreement_id,
            [_ps(home, "reid-consent", released["pid"][released["nhs"][5]])],
        )
    with Store(home).connect() as con:
        refused = [e for e in audit.entries_for(con, agreement=agreement_id) if e.outcome == "refused"]
        breaches = [b for b in registers.breaches(con) if b["kind"] == "no_legal_basis"]
    assert refused and breaches


def test_a_files_approval_block_alone_permits_no_re_identification(home: Home, released, contracts: Path) -> None:
    _agreement(contracts, "reid-unadopted", "consent")  # its file says approved; no decision in the haven
    with pytest.raises(ReidentificationRefused, match="has not been approved in this haven") as refused:
        reidentify(
            _lead(home, contracts),
            "reid-unadopted",
            ["0" * 64],
        )
    assert "safehaven agreements approve reid-unadopted" in str(refused.value)


def test_cli_reidentify_prints_csv_and_refuses_otherwise(home: Home, released, tmp_path: Path) -> None:
    n = released["nhs"][4]
    p = _ps(home, "reid-consent", released["pid"][n])
    runner = CliRunner()
    ok = runner.invoke(main, ["reidentify", "--agreement", "reid-consent", "--pseudonym", p])
    assert ok.exit_code == 0, ok.output
    assert f"{p},{n}" in ok.output
    listing = tmp_path / "asked.csv"
    listing.write_text(f"pseudonym\n{p}\n")
    out = tmp_path / "out.csv"
    ok2 = runner.invoke(
        main, ["reidentify", "--agreement", "reid-consent", "--file", str(listing), "--output", str(out)]
    )
    assert ok2.exit_code == 0 and f"{p},{n}" in out.read_text()
    assert oct(out.stat().st_mode & 0o777) == oct(0o600)
    refused = runner.invoke(main, ["reidentify", "--agreement", "reid-pseudo", "--pseudonym", p])
    assert refused.exit_code != 0 and "refused" in refused.output and n not in refused.output


def test_reidentification_is_refused_while_the_objection_feed_is_blocked(home: Home, released, contracts: Path) -> None:
    """Re-identification under a basis the opt-out applies to honours objections, so it needs the
    feed complete: an objections file quarantined whole (Excel's ``sep=`` line) may hold an
    objection the register lacks, and nobody is re-identified until a person resolves it (fail
    closed; the refusal is audited)."""
    from safehaven.intake.ingest import ingest_collection

    target = released["nhs"][2]
    folder = home.incoming_for("objections")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "optouts.csv").write_text(
        "sep=,\r\nnhs_number,objection_type,recorded_date,withdrawn_date,source_practice\r\n"
        f"{target},national_opt_out,2024-03-01,,\r\n"
    )
    with Store(home).connect() as con:
        ingest_collection(con, ContractRegistry(contracts).objections(), folder, home.quarantine_for("objections"))
    with pytest.raises(ReidentificationRefused, match="objections cannot be honoured now"):
        reidentify(_lead(home, contracts), "reid-s251", [_ps(home, "reid-s251", released["pid"][target])])
    with Store(home).connect(read_only=True) as con:
        refused = [e for e in audit.entries_for(con, object_like="%reid-s251%") if e.outcome == "refused"]
    assert refused


def test_an_agreement_with_problems_permits_no_re_identification(home: Home, released, contracts: Path) -> None:
    """Releases and linkage refuse an agreement with problems (here a consent basis naming no
    reference), whatever its decision says; so does re-identification (it revealed identifiers under
    it: found by review)."""
    from safehaven.share import approvals
    from safehaven.share.agreements import problems
    from tests.governance_helpers import record_unchecked_decision

    _agreement(contracts, "reid-noref", "consent")
    path = contracts / "agreements" / "reid-noref.yaml"
    data = yaml.safe_load(path.read_text())
    data["legal_basis"] = {"basis": "consent", "reference": None}
    path.write_text(yaml.safe_dump(data))
    registry = ContractRegistry(contracts)
    with Store(home).connect() as con:
        record_unchecked_decision(con, registry, "reid-noref")  # decided before the problem was checked
        con.executemany(
            f"INSERT INTO {MEMBERS} VALUES ('r1', 'reid-noref', ?, now())", [[p] for p in released["pid"].values()]
        )
        assert any("names no reference" in p for p in problems(approvals.effective(
            approvals.load_standing(con, "reid-noref", contracts)), registry))  # fmt: skip
    asked = [_ps(home, "reid-noref", released["pid"][n]) for n in released["nhs"][2:4]]
    with pytest.raises(ReidentificationRefused, match="cannot be acted on: .*names no reference"):
        reidentify(_lead(home, contracts), "reid-noref", asked)


def test_a_membership_row_added_in_the_store_permits_no_re_identification(
    home: Home, released, contracts: Path
) -> None:
    """``governance.release_members`` says who was sent what; a row added there with the store key,
    for a release the audit trail records no delivery of, let the custodian resolve people never
    released (found by review): refused until the store is restored."""
    with Store(home).connect() as con:
        con.executemany(
            f"INSERT INTO {MEMBERS} VALUES ('r9', 'reid-consent', ?, now())", [[p] for p in released["pid"].values()]
        )
    asked = [_ps(home, "reid-consent", released["pid"][n]) for n in released["nhs"][2:4]]
    with pytest.raises(
        ReidentificationRefused, match="r9: its members are in the store but the audit trail records no"
    ):
        reidentify(_lead(home, contracts), "reid-consent", asked)
