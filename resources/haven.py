"""The safe haven resource: owns the store's DuckDB connections, the key ring and contracts.

One resource, so each asset gets the same home, the same guarded keys and the same
contracts. Connections are opened per unit of work and closed (DuckDB's single writer;
the store's one writer). Configuration carries paths only, never key material or a passphrase.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb

from safehaven.core import pins
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import Store
from safehaven.intake.contracts import ContractRegistry


class SafeHavenResource(dg.ConfigurableResource):
    """Paths of the haven; empty means ``$SAFEHAVEN_HOME`` (default ``data/``)."""

    home: str = ""
    contracts: str = ""
    threads: int = 0

    def home_dir(self) -> Home:
        return Home(Path(self.home).resolve()) if self.home else Home.from_env()

    def keyring(self) -> KeyRing:
        """The pipeline's key ring: never a custodian, so it cannot open the vault's private key."""
        return KeyRing(self.home_dir().keys)

    def registry(self) -> ContractRegistry:
        return ContractRegistry(Path(self.contracts) if self.contracts else None)

    def store(self) -> Store:
        """The store; refused where the pipeline could read an unsealed private key (custody)."""
        keyring = self.keyring()
        keyring.check_custody()
        return Store(self.home_dir(), keyring, threads=self.threads or None)

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection whose audit and haven keys were checked against the store's epochs."""
        store = self.store()
        with store.connect(read_only=read_only) as con:
            if not read_only:
                pins.verify(con, store.keyring)
            yield con
