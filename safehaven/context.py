"""The one context of a unit of work: which haven, whose keys, which contracts, who, and when.

A ``Haven`` carries the haven's ``Home``, the ``KeyRing`` to use (the pipeline's, or a key
custodian's), the ``ContractRegistry`` (the deployment's contracts root, not necessarily the
packaged ``data_contracts/``), the ``actor`` recorded in the audit trail and registers, and
``today``. It is built once at an edge and passed explicitly into the domain calls:

* the Dagster resource builds it from its own configuration
  (``resources.haven.SafeHavenResource.context``);
* the CLI builds it from its environment readers (``safehaven.cli.common.haven_from_env``);
* tests and tools call ``Haven.open``.

``Haven.open`` is the one place where the defaults are chosen: the key ring of the home's
``keys/`` (no custodian) when none is given, the OS user as the actor, the haven's day as today: the
UK calendar day, whatever the host's zone (``safehaven.core.days.haven_today``; CoP 11-14: the
objection dates are UK dates, and an objection applies from its recorded date).
The contracts are never defaulted: the caller names them, so a deployment's own contracts root
(``$SAFEHAVEN_CONTRACTS``, the resource's ``contracts``) cannot be bypassed by a function that
finds the packaged ones on its own. No domain function builds a ``ContractRegistry`` when it is
not given one, nor a ``KeyRing`` but ``Store(home)`` and the audit trail, for the store and audit
keys, which are never sealed (``tests/unit/test_context.py`` scans for it).

The module sits at the top of the package because it joins ``safehaven.core`` (home, keys,
store, actor) and ``safehaven.intake`` (contracts); it imports no Dagster and reads no
environment variable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import date

from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.registers import current_actor
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry


@dataclass(frozen=True)
class Haven:
    """One haven as a unit of work sees it: home, key ring, contracts, actor and today (module docstring)."""

    home: Home
    keyring: KeyRing
    contracts: ContractRegistry
    actor: str
    today: date
    #: a run of the pipeline (the Dagster resource's context), not a person at a terminal: a
    #: request it prepares names the service account, not a person, as its preparer's login
    #: (``safehaven.share.review``, "reviewers at their own logins")
    scheduled: bool = False

    @classmethod
    def open(
        cls,
        home: Home,
        *,
        contracts: ContractRegistry,
        keyring: KeyRing | None = None,
        actor: str | None = None,
        today: date | None = None,
    ) -> Haven:
        """The usual context, and the one place defaults are chosen: ``keyring`` the home's key ring
        without a custodian, ``actor`` the OS user (``current_actor``), ``today`` the haven's (UK) day
        (``haven_today``, module docstring).
        ``contracts`` has no default (module docstring)."""
        return cls(
            home=home,
            keyring=keyring if keyring is not None else KeyRing(home.keys),
            contracts=contracts,
            actor=actor if actor is not None else current_actor(),
            today=today if today is not None else haven_today(),
        )

    def store(self) -> Store:
        """The encrypted store of ``home``, opened with this context's key ring."""
        return Store(self.home, self.keyring)

    def with_keyring(self, keyring: KeyRing) -> Haven:
        """The same context with another key ring (e.g. the key custodian's)."""
        return replace(self, keyring=keyring)

    def as_scheduled(self) -> Haven:
        """The same context as a run of the pipeline (``scheduled``)."""
        return replace(self, scheduled=True)

    def on(self, today: date) -> Haven:
        """The same context on another day (e.g. a test's fixed date)."""
        return replace(self, today=today)
