"""A release whose inputs are unchanged is not built again (``safehaven.share.release_inputs``).

Issue 22: a night's cost should be set by what changed. The rule as tests: the same inputs give
``unchanged`` without building anything, and the same answer a full build gives; a new
objection, a changed haven table or a new day builds again; the guards before the build still
refuse while the objection feed is blocked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import duckdb
import pytest

from safehaven.context import Haven as Context
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import objections
from safehaven.share import release_inputs, releases, review
from safehaven.share.releases import PREPARED, UNCHANGED, ReleaseRefused, prepare
from tests.governance_helpers import (
    NHS,
    adopt,
    agreement_data,
    copy_small_haven,
    install_haven_key,
    small_haven_template,
    write_agreement,
)


@dataclass
class Haven:
    home: Home
    con: duckdb.DuckDBPyConnection
    registry: ContractRegistry
    keyring: KeyRing
    pids: dict[str, str]

    def prepare(self, today: date | None = None):
        """A preparation on ``today``, by default the haven's day when it runs (read then, not when the
        module was imported: a module run across midnight would prepare on yesterday's date)."""
        context = Context.open(self.home, contracts=self.registry, keyring=self.keyring, today=today)
        return prepare(self.con, "test-linked", haven=context)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The small haven every test starts from, built once for the module (``haven`` copies it),
    and its NHS number -> pid."""
    root = tmp_path_factory.mktemp("small_haven")
    return root, small_haven_template(root)


@pytest.fixture
def haven(home: Home, tmp_path: Path, template: tuple[Path, dict[str, str]]) -> Iterator[Haven]:
    root, pids = template
    registry = copy_small_haven(root, home, tmp_path)
    keyring = KeyRing(home.keys)
    with Store(home).connect() as con:
        install_haven_key(con, keyring)
        pids = dict(pids)
        write_agreement(registry.root, agreement_data())
        adopt(con, registry, "test-linked")
        yield Haven(home, con, registry, keyring, pids)


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The agreements whose release files were built (``_stage`` is where the files are written)."""
    built: list[str] = []
    real = releases._stage

    def counting(con, a, *args, **kwargs):  # type: ignore[no-untyped-def]
        built.append(a.id)
        return real(con, a, *args, **kwargs)

    monkeypatch.setattr(releases, "_stage", counting)
    return built


def test_the_same_inputs_are_unchanged_without_building_anything(haven: Haven, builds: list[str]) -> None:
    first = haven.prepare()
    assert first.status == PREPARED and builds == ["test-linked"]
    again = haven.prepare()
    assert (again.status, again.release_id) == (UNCHANGED, first.release_id)
    assert builds == ["test-linked"], "nothing was built the second time"
    assert [r.release_id for r in review.requests(haven.con)] == [first.release_id]


def test_skipping_gives_the_answer_a_full_build_gives(
    haven: Haven, builds: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = haven.prepare()
    skipped = haven.prepare()
    monkeypatch.setattr(release_inputs, "known_unchanged", lambda *a: None)  # build in full
    full = haven.prepare()
    assert len(builds) == 2
    assert (skipped.status, skipped.release_id, skipped.reason) == (full.status, full.release_id, full.reason)
    assert full.release_id == first.release_id


def test_a_new_objection_builds_again_and_is_honoured(haven: Haven, builds: list[str]) -> None:
    first = haven.prepare()
    person = haven.pids[NHS[0]]
    haven.con.execute(
        f"INSERT INTO {objections.EVENTS} (event_id, pid, objection_type, recorded_date, withdrawn_date, "
        "_batch, _row, registered_at) VALUES (99, ?, 'national_opt_out', ?, NULL, 'b-objections', 2, now())",
        [person, haven_today() - timedelta(days=1)],
    )
    second = haven.prepare()
    assert len(builds) == 2, "the new objection is an input: the release was built again"
    assert second.status == PREPARED and second.release_id != first.release_id
    assert second.records_withheld > first.records_withheld


def test_a_changed_haven_table_or_a_new_day_builds_again(haven: Haven, builds: list[str]) -> None:
    today = haven_today()
    haven.prepare(today)
    haven.prepare(today + timedelta(days=1))
    assert len(builds) == 2, "a new day: objections and opt-outs apply as of it"
    haven.con.execute("DELETE FROM haven.social_care WHERE sex = '2'")
    changed = haven.prepare(today + timedelta(days=1))
    assert len(builds) == 3 and changed.status == PREPARED


def test_the_objection_feed_guard_still_refuses_before_any_skip(haven: Haven, builds: list[str]) -> None:
    haven.prepare()
    haven.con.execute(
        "INSERT INTO governance.objection_feed_faults (sha256, file_name, level, detected_at) "
        "VALUES ('f' || repeat('0', 63), 'objections-bad.csv', 'batch', now())"
    )
    with pytest.raises(ReleaseRefused, match="objection"):
        haven.prepare()


def test_a_changed_contract_builds_again(haven: Haven, builds: list[str]) -> None:
    """The contracts say which fields identify (quasi-identifiers: k-anonymity and the release's
    shape follow from them): a release prepared under one version of a collection's contract is
    built again under another, never taken as unchanged from its inputs (found by review: a run
    that read contracts relabelling a quasi-identifier as content had that release kept as
    unchanged under the real contracts)."""
    assert haven.prepare().status == PREPARED
    path = haven.registry.root / "collections" / "social_care.yaml"
    path.write_text(path.read_text().replace("version: 1.0.0", "version: 1.1.0", 1))
    haven.registry = ContractRegistry(haven.registry.root)
    haven.prepare()
    assert len(builds) == 2, "the changed contract is an input: the release was built again"
