"""The safe haven resource: owns the store's DuckDB connections, the key ring and contracts.

One resource, so each asset gets the same home, the same guarded keys and the same
contracts. Connections are opened per unit of work and closed (DuckDB's single writer;
``docs/design.md`` "One writer, short-lived connections"). Configuration carries paths only, never key material.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb

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
        return KeyRing(self.home_dir().keys)

    def registry(self) -> ContractRegistry:
        return ContractRegistry(Path(self.contracts) if self.contracts else None)

    def store(self) -> Store:
        return Store(self.home_dir(), self.keyring(), threads=self.threads or None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Fail closed at run start: verify the whole audit trail once, then record the run.

        ``safehaven.core.audit.begin_run`` raises ``AuditTrailBroken`` (one line: the first bad
        entry and how to clear it) when the trail does not verify, so no asset of the run
        touches data (CoP 23d).
        """
        from safehaven.core import audit
        from safehaven.core.registers import current_actor

        run = context.dagster_run
        job = run.job_name if run is not None else "adhoc"
        with self.connect() as con:
            audit.begin_run(
                con,
                self.home_dir(),
                actor=current_actor(),
                job=job,
                run_id=context.run_id or "",
                keyring=self.keyring(),
            )

    @contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.store().connect(read_only=read_only) as con:
            yield con
