"""Tests for ``safehaven.share.linkage``: approved-only linkage (CoP 22, 42b, 43i)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import duckdb
import pytest

from safehaven.core import audit
from safehaven.core import registers as reg
from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry, contracts_dir
from safehaven.share.agreements import load_agreements
from safehaven.share.linkage import LinkageRefused, authorise_linkage, find_authority
from tests.governance_helpers import agreement_data, contracts_root, write_agreement


@pytest.fixture
def con(home: Home) -> Iterator[duckdb.DuckDBPyConnection]:
    with Store(home).connect() as connection:
        yield connection


@pytest.fixture
def registry(tmp_path: Path) -> ContractRegistry:
    root = contracts_root(tmp_path)
    write_agreement(root, agreement_data())
    write_agreement(
        root,
        agreement_data(
            id="suspended-one",
            approval={"status": "suspended", "approver": "Dr X, CG", "date": "2025-01-01", "reason": "under review"},
        ),
    )
    write_agreement(
        root,
        agreement_data(
            id="ended-one",
            start_date="2020-01-01",
            end_date="2021-01-01",
            approval={"status": "approved", "approver": "Dr X, CG", "date": "2019-12-01"},
        ),
    )
    return ContractRegistry(root)


def test_named_linkage_is_authorised_in_either_order_and_audited(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    agreements = load_agreements(registry.root)
    for left, right in (("hospital_episodes", "social_care"), ("social_care", "hospital_episodes")):
        got = authorise_linkage(con, agreements, left, right, "linked study", registry=registry)
        assert got.id == "test-linked"
    entries = audit.entries_for(con)
    assert [(e.action, e.outcome, e.agreement, e.legal_basis) for e in entries] == [
        ("link", "ok", "test-linked", "section_251")
    ] * 2
    assert reg.breaches(con) == []


def test_unlisted_linkage_is_refused_and_registered(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> None:
    agreements = load_agreements(registry.root)
    with pytest.raises(LinkageRefused, match="no agreement names a linkage of gp_events and social_care") as caught:
        authorise_linkage(con, agreements, "gp_events", "social_care", "curiosity", registry=registry)
    breaches = reg.breaches(con)
    assert len(breaches) == 1 and caught.value.breach_id == breaches[0]["breach_id"]
    assert breaches[0]["kind"] == "refused_linkage" and breaches[0]["severity"] == 0
    assert "gp_events and social_care" in breaches[0]["what"] and "curiosity" in breaches[0]["what"]
    entry = audit.entries_for(con)[-1]
    assert (entry.action, entry.outcome, entry.purpose) == ("link", "refused", "curiosity")
    assert entry.detail_value["breach_id"] == breaches[0]["breach_id"]
    assert audit.verify(con).ok


@pytest.mark.parametrize(
    ("agreement_id", "words"),
    [("suspended-one", "is suspended: under review"), ("ended-one", "expired on 2021-01-01")],
)
def test_linkage_under_a_suspended_or_expired_agreement_is_refused(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry, agreement_id: str, words: str
) -> None:
    agreements = load_agreements(registry.root)
    with pytest.raises(LinkageRefused, match=words):
        authorise_linkage(con, agreements[agreement_id], "hospital_episodes", "social_care", "study", registry=registry)
    assert [b["kind"] for b in reg.breaches(con)] == ["refused_linkage"]


def test_linkage_under_an_agreement_that_does_not_validate_is_refused(
    con: duckdb.DuckDBPyConnection, registry: ContractRegistry
) -> None:
    write_agreement(registry.root, agreement_data(id="no-basis", legal_basis={"basis": "anonymised"}))
    agreements = load_agreements(registry.root)
    with pytest.raises(LinkageRefused, match="does not validate"):
        authorise_linkage(con, agreements["no-basis"], "hospital_episodes", "social_care", "x", registry=registry)


def test_find_authority_has_no_side_effects(registry: ContractRegistry) -> None:
    agreements = load_agreements(registry.root)
    found, why = find_authority(agreements, "hospital_episodes", "hospital_episodes", registry=registry)
    assert found is None and "itself" in why
    found, _ = find_authority(agreements, "hospital_episodes", "social_care", today=date(2020, 6, 1), registry=registry)
    assert found is not None and found.id == "ended-one"


def test_the_anonymised_publication_agreement_permits_the_linked_statistic(
    con: duckdb.DuckDBPyConnection,
) -> None:
    """The outputs stage links hospital episodes to social care under anon-linked-stats."""
    agreements = load_agreements(contracts_dir())
    got = authorise_linkage(
        con,
        {"anon-linked-stats": agreements["anon-linked-stats"]},
        "hospital_episodes",
        "social_care",
        "published linked statistic",
        registry=ContractRegistry(),  # the project's contracts, whose agreements these are
    )
    assert got.id == "anon-linked-stats" and got.identifiability == "anonymised"
    assert json.loads(audit.entries_for(con)[-1].detail or "{}")["agreement_version"] == got.version


def test_linkage_can_be_restricted_to_one_level(con: duckdb.DuckDBPyConnection, registry: ContractRegistry) -> None:
    """A pseudonymised agreement naming the linkage cannot authorise a published (anonymised) statistic."""
    agreements = load_agreements(registry.root)
    with pytest.raises(LinkageRefused, match="no agreement at the anonymised level names a linkage"):
        authorise_linkage(
            con,
            agreements,
            "hospital_episodes",
            "social_care",
            "published statistic",
            registry=registry,
            identifiability="anonymised",
        )
    got = authorise_linkage(
        con,
        load_agreements(contracts_dir()),
        "hospital_episodes",
        "social_care",
        "published statistic",
        registry=ContractRegistry(),  # the project's contracts, whose agreements these are
        identifiability="anonymised",
    )
    assert got.id == "anon-linked-stats"


def test_a_published_linked_output_is_never_authorised_by_a_record_level_agreement(
    con: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    """The restriction above is what a published statistic asks for: with only the pseudonymised
    research agreement naming the linkage approved, the published output's linkage is refused
    (it was authorised by that agreement: found by review)."""
    import shutil

    from safehaven.intake.contracts import CONTRACTS_DIR
    from safehaven.publish.aggregate import _authorised_agreement
    from safehaven.publish.outputs import load_output
    from safehaven.share import approvals

    root = contracts_root(tmp_path)
    shutil.copy(CONTRACTS_DIR / "agreements" / "research-hes-asc-linked.yaml", root / "agreements")
    registry = ContractRegistry(root)
    output = load_output(CONTRACTS_DIR / "outputs" / "discharge_to_social_care.yaml")
    approvals.approve(con, "research-hes-asc-linked", "Dr Test, Caldicott Guardian", registry=registry, actor="ig")
    with pytest.raises(LinkageRefused, match="at the anonymised level"):
        _authorised_agreement(con, output, registry)
