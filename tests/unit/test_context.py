"""The one context (``safehaven.context.Haven``): built once, with its defaults chosen in one place,
and passed explicitly, so no domain function finds its own key ring or contracts (issue 13)."""

from __future__ import annotations

import dataclasses
import re
import shutil
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from safehaven.context import Haven
from safehaven.core import days
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.registers import current_actor
from safehaven.intake.contracts import ContractRegistry, contracts_dir

PROJECT = Path(__file__).resolve().parents[2]


def _contracts_copy(tmp_path: Path) -> Path:
    root = tmp_path / "contracts"
    shutil.copytree(contracts_dir(), root)
    return root


def test_open_chooses_the_defaults_in_one_place(home: Home) -> None:
    registry = ContractRegistry()
    haven = Haven.open(home, contracts=registry)
    assert haven.home == home and haven.contracts is registry
    assert haven.keyring.directory == home.keys and haven.keyring.custodian is None
    assert haven.actor == current_actor()
    assert haven.today == days.haven_today()
    store = haven.store()
    assert store.home == home and store.keyring is haven.keyring


def test_the_default_today_is_the_uk_day_not_the_hosts(home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 00:30 BST on 2 July (23:30 UTC on 1 July, still 1 July on a host in UTC) the context's
    today is 2 July: the haven's day is the UK day (``safehaven.core.days``; CoP 11-14)."""
    monkeypatch.setattr(days, "clock", lambda: datetime(2099, 7, 1, 23, 30, tzinfo=UTC))
    assert Haven.open(home, contracts=ContractRegistry()).today == date(2099, 7, 2)


def test_open_keeps_what_it_is_given_and_never_defaults_the_contracts(home: Home, tmp_path: Path) -> None:
    ring = KeyRing(home.keys)
    registry = ContractRegistry(_contracts_copy(tmp_path))
    haven = Haven.open(home, contracts=registry, keyring=ring, actor="someone", today=date(2024, 1, 2))
    assert (haven.keyring, haven.contracts, haven.actor, haven.today) == (ring, registry, "someone", date(2024, 1, 2))
    with pytest.raises(TypeError):
        Haven.open(home)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        haven.actor = "another"  # type: ignore[misc]
    other = KeyRing(home.keys)
    assert haven.with_keyring(other).keyring is other and haven.keyring is ring
    assert haven.on(date(2025, 1, 1)).today == date(2025, 1, 1) and haven.today == date(2024, 1, 2)


def test_the_edges_build_the_context_from_their_own_configuration(
    home: Home, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from resources.haven import SafeHavenResource
    from safehaven.cli.common import haven_from_env

    root = _contracts_copy(tmp_path)
    resource = SafeHavenResource(home=str(home.root), contracts=str(root), audit_worm_dir=str(tmp_path / "worm"))
    ctx = resource.context()
    assert ctx.home == Home(home.root.resolve(), audit_worm=tmp_path / "worm")
    assert ctx.contracts.root == root and ctx.keyring.custodian is None and ctx.keyring.directory == ctx.home.keys
    monkeypatch.setenv("SAFEHAVEN_CONTRACTS", str(root))
    cli = haven_from_env()
    assert cli.home.root == home.root.resolve() and cli.contracts.root == root.resolve()
    ring = KeyRing(home.keys)
    assert haven_from_env(home, ring).keyring is ring
    monkeypatch.delenv("SAFEHAVEN_CONTRACTS")
    assert haven_from_env().contracts.root == contracts_dir()


def _without_diagnosis_code(tmp_path: Path) -> ContractRegistry:
    """A copy of the contracts in which ``gp_events`` no longer declares ``diagnosis_code``, and the
    ``statutory-gp-audit`` agreement is gone."""
    root = _contracts_copy(tmp_path)
    path = root / "collections" / "gp_events.yaml"
    text = path.read_text()
    block = re.search(r"  - name: diagnosis_code\n(    .*\n)+", text)
    assert block is not None
    path.write_text(text.replace(block.group(0), ""))
    (root / "agreements" / "statutory-gp-audit.yaml").unlink()
    return ContractRegistry(root)


def test_a_function_given_the_context_uses_its_contracts_not_the_packaged_ones(home: Home, tmp_path: Path) -> None:
    from safehaven.core.store import Store
    from safehaven.share.agreements import load_agreement, problems
    from safehaven.share.releases import SKIPPED, prepare

    agreement = load_agreement("statutory-gp-audit", contracts_dir())  # the packaged file
    haven = Haven.open(home, contracts=_without_diagnosis_code(tmp_path))
    assert "diagnosis_code" not in haven.contracts.contracts["gp_events"].field_names
    version = haven.contracts.contracts["gp_events"].version
    changed = [p for p in problems(agreement, haven.contracts) if "diagnosis_code" in p]
    assert changed == [f"field gp_events.diagnosis_code is not in the gp_events contract (v{version})"]
    assert not [p for p in problems(agreement, ContractRegistry()) if "diagnosis_code" in p]
    with Store(home).connect() as con:
        result = prepare(con, "statutory-gp-audit", haven=haven)
    assert result.status == SKIPPED and str(haven.contracts.root / "agreements") in result.reason


#: where a fallback of the old kind would stand: a function finding its own key ring or contracts
FALLBACKS = re.compile(
    r"registry or ContractRegistry\(\)|keyring or KeyRing\(|KeyRing \| None = None|ContractRegistry \| None = None"
)
#: where such a default is allowed, how many times, and why (every other file has none; a new one
#: here fails too): never a registry, only a key ring
ALLOWED = {
    "safehaven/context.py": (1, "Haven.open: the one place defaults are chosen"),
    "safehaven/cli/common.py": (1, "haven_from_env passes keyring=None on to Haven.open"),
    # the keys these two read (store, audit) are never sealed, and the directory is always the
    # home's keys/: a custodian's ring would read the very same key (their docstrings say so)
    "safehaven/core/store.py": (2, "Store(home): the home's key ring, for the store key"),
    "safehaven/core/audit.py": (9, "audit._keyring: the key ring of the connection's home, for the audit key"),
}


def test_no_function_finds_its_own_key_ring_or_contracts() -> None:
    found: dict[str, int] = {}
    for top in ("safehaven", "assets", "resources"):
        for path in sorted((PROJECT / top).rglob("*.py")):
            hits = FALLBACKS.findall(path.read_text(encoding="utf-8"))
            assert not [h for h in hits if "Registry" in h], path  # contracts are never defaulted
            if hits:
                found[path.relative_to(PROJECT).as_posix()] = len(hits)
    assert found == {rel: n for rel, (n, _why) in ALLOWED.items()}


def test_the_context_module_reads_no_environment_and_imports_no_dagster() -> None:
    text = (PROJECT / "safehaven" / "context.py").read_text(encoding="utf-8")
    assert not re.search(r"os\.environ|getenv|^\s*(import|from) dagster", text, re.M)


def test_the_packaged_contracts_are_named_only_at_the_edges() -> None:
    """No agreement, output or approval lookup falls back to the packaged ``data_contracts``: the
    root is a required argument, and ``contracts_dir()`` is called only where it is defined (the
    ``ContractRegistry()`` of tests and tools) and by the CLI's environment reader."""
    calls = {
        path.relative_to(PROJECT).as_posix()
        for top in ("safehaven", "assets", "resources")
        for path in sorted((PROJECT / top).rglob("*.py"))
        if "contracts_dir()" in path.read_text(encoding="utf-8").replace("def contracts_dir()", "")
    }
    assert calls == {"safehaven/intake/contracts.py", "safehaven/cli/common.py"}
    optional_root = re.compile(r"\broot: Path \| None = None")
    for rel in ("safehaven/share/agreements.py", "safehaven/share/approvals.py", "safehaven/publish/outputs.py"):
        assert not optional_root.search((PROJECT / rel).read_text(encoding="utf-8")), rel
