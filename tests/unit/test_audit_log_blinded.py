"""Blinded review holds in the audit log too (SATRE 3.3.05; docs/rules.md "Output checking").

While a release request awaits a decision, its checkers see how many reviews are in, never who
reviewed nor how (``safehaven review show``). ``safehaven audit log`` needs no more than ``review
show`` does, so it withholds the reviewer and the outcome of each ``review.decide`` entry of a
request still awaiting review, and shows both once the request is decided.
"""

from __future__ import annotations

from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from tests.governance_helpers import (
    REVIEWERS,
    adopt,
    agreement_data,
    logged_in_as,
    login_of,
    small_haven,
    write_agreement,
)
from tests.unit.test_governance import governance_key, root, run  # noqa: F401  (fixtures)

R1, R2 = REVIEWERS[0], REVIEWERS[1]
DECIDED = "review.decide release-request:test-linked-r0001"


def test_the_audit_log_withholds_who_reviewed_a_request_until_it_is_decided(home, root, governance_key) -> None:  # noqa: F811
    write_agreement(root, agreement_data())
    with Store(home).connect() as con:
        small_haven(con, KeyRing(home.keys), ContractRegistry(root))
        adopt(con, ContractRegistry(root), "test-linked")
    assert run("agreements", "release", "test-linked").exit_code == 0
    with logged_in_as(login_of(R1)):  # each output checker at their own login
        assert run("review", "approve", "test-linked-r0001", "--by", R1).exit_code == 0

    blinded = run("audit", "log", "--limit", "5").output
    (line,) = [row for row in blinded.splitlines() if DECIDED in row]
    assert R1 not in blinded and "approve" not in line.split(DECIDED)[1]
    assert "withheld while the request awaits review" in line

    with logged_in_as(login_of(R2)):
        assert run("review", "approve", "test-linked-r0001", "--by", R2).exit_code == 0
    decided = [row for row in run("audit", "log", "--limit", "10").output.splitlines() if DECIDED in row]
    assert len(decided) == 2 and R1 in decided[0] and R2 in decided[1]
    assert not any("withheld" in row for row in decided)
