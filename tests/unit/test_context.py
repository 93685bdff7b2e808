"""The one context (``safehaven.context.Haven``): built once, with its defaults chosen in one place,
and passed explicitly, so no domain function finds its own key ring or contracts (issue 13)."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import date
from pathlib import Path

import pytest

from safehaven.context import Haven
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
    assert haven.today == date.today()
    store = haven.store()
    assert store.home == home and store.keyring is haven.keyring


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
