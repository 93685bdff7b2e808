"""The safe haven resource: owns the store's DuckDB connections, the key ring and contracts.

One resource, so each asset gets the same home, the same guarded keys and the same
contracts. Connections are opened per unit of work and closed (DuckDB's single writer).
Configuration carries paths and limits only, never key material or a passphrase.

* A busy store is waited for up to ``lock_wait_seconds`` (``safehaven.core.store``, "Waiting,
  not failing"); the wait is logged to the run's event log. Past the wait, a step asks Dagster
  to retry it (``dg.RetryRequested``: ``busy_retries`` more times,
  ``busy_retry_seconds`` apart), since a busy store is transient; only then does the step
  fail, and the next run recovers. Refusals (a broken trail, a key that does not match) are never retried.
* For the length of each run the resource holds the run's lock (``safehaven.core.runs``), so
  a run whose process died can be told from a live one, and key rotation waits for none.
* Key custody (``safehaven.core.keys``, ``safehaven.core.pins``): the pipeline's key ring has no
  custodian, so it cannot open the vault's private key; the store is refused where the
  pipeline could read an unsealed private key, and every write connection checks the audit
  and haven keys against the store's epochs.
* Settings are passed explicitly into the domain calls, never read from the environment
  there: ``audit_worm_dir`` becomes ``Home.audit_worm`` (the write-once audit anchor target,
  ``safehaven.core.anchors``; CoP 12, 23d) and ``objections_max_age_days`` is the haven's
  objection-register window (``safehaven.protect.feed``; CoP 11-14). ``from_environment``
  reads the documented variables once, for the code location (``assets.definitions``). An empty
  ``home`` or ``contracts`` is resolved here, at the edge, from ``$SAFEHAVEN_HOME`` and
  ``$SAFEHAVEN_CONTRACTS`` (the CLI's readers in ``safehaven.cli.common``), and the domain is
  handed the resulting ``Home`` and ``ContractRegistry``.
* ``context`` builds the one context of the domain calls (``safehaven.context.Haven``) from this
  configuration: the home, the pipeline's key ring, the contracts, the OS user, today.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import dagster as dg
import duckdb

from safehaven.context import Haven
from safehaven.core import compaction, pins, runs
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.store import DEFAULT_LOCK_WAIT_SECONDS, Store, StoreBusy
from safehaven.intake.contracts import ContractRegistry
from safehaven.protect import feed
from safehaven.protect.feed import DEFAULT_WINDOW_DAYS

#: Settings of the resource that are the haven's governance, not a run's choice: the contracts (what
#: each field is, which fields identify: k-anonymity and the release shape follow from them) and the
#: objection-register window and its refusal. A run's own configuration (the UI's Launchpad, a
#: schedule's or sensor's request) may name the home and tune the store's waits and memory; a run
#: setting one of these is refused (found by review: a run widened the window past a stale register,
#: cleared its refusal, or relabelled a quasi-identifier as content so that k-anonymity did not apply;
#: and pointed the write-once audit anchor at an ordinary folder, which later runs then had to trust).
#: A run may restate one with the value the code location's environment gives it (``safehaven run``
#: names the write-once target it was given, ``assets.runner.haven_run_config``), never change it.
GOVERNED = ("contracts", "objections_max_age_days", "objections_window_error", "audit_worm_dir")
#: of those, the ones that name a path (compared resolved)
_GOVERNED_PATHS = ("contracts", "audit_worm_dir")
#: run id -> descriptor of its held liveness lock, for the runs of this process
_RUN_LOCKS: dict[str, int] = {}
#: further attempts of a step that found the store busy past its wait, and the pause before each
STORE_BUSY_RETRIES = 2
STORE_BUSY_RETRY_SECONDS = 30


class SafeHavenResource(dg.ConfigurableResource):
    """Paths of the haven; empty means ``$SAFEHAVEN_HOME`` (default ``data/``) and
    ``$SAFEHAVEN_CONTRACTS`` (default the project's ``data_contracts/``)."""

    home: str = ""
    contracts: str = ""
    threads: int = 0
    #: DuckDB's memory limit for the store's connections (``"1.5GB"``); empty: the haven's default
    #: (``safehaven.core.store.default_memory_limit``; the code location's: ``$SAFEHAVEN_MEMORY_LIMIT``)
    memory_limit: str = ""
    #: how long a step waits for a store held by another process before it fails
    lock_wait_seconds: float = DEFAULT_LOCK_WAIT_SECONDS
    #: further attempts of a step that found the store busy past the wait, and the pause before each
    busy_retries: int = STORE_BUSY_RETRIES
    busy_retry_seconds: float = STORE_BUSY_RETRY_SECONDS
    #: the external write-once audit anchor directory (``Home.audit_worm``); None: no such target
    audit_worm_dir: str | None = None
    #: the haven's objection-register window in days, where an agreement sets none
    objections_max_age_days: int = DEFAULT_WINDOW_DAYS
    #: why the environment's window was refused (``from_environment``); while set, the window is
    #: 0, which no step accepts, and the step that needs it refuses with this line (fails closed)
    objections_window_error: str | None = None

    @classmethod
    def from_environment(cls) -> SafeHavenResource:
        """The code location's resource: ``$SAFEHAVEN_AUDIT_WORM``,
        ``$SAFEHAVEN_OBJECTIONS_MAX_AGE_DAYS`` and ``$SAFEHAVEN_MEMORY_LIMIT`` read once here, at the
        Dagster edge, with the CLI's readers (``safehaven.cli.common``).

        An unreadable window does not stop the code location from loading (every other asset,
        the sensor and the schedules stay available); it is kept as ``objections_window_error``
        with a window of 0, and the step that needs the window refuses at run time
        (``objections_window``).
        """
        from safehaven.cli.common import audit_worm_from_env, memory_limit_from_env, objections_window_from_env

        worm = audit_worm_from_env()
        try:
            window, error = objections_window_from_env(), None
        except feed.ObjectionFeedBlocked as exc:
            window, error = 0, str(exc)
        return cls(
            audit_worm_dir=str(worm) if worm else None,
            objections_max_age_days=window,
            objections_window_error=error,
            memory_limit=memory_limit_from_env() or "",
        )

    def objections_window(self) -> int:
        """The haven's objection-register window in days (``safehaven.protect.feed.window_days``).

        Raises ``ObjectionFeedBlocked`` with one line naming the variable, its value and the fix
        when the environment gave an unreadable window: a mistyped window never widens the check.
        """
        if self.objections_window_error:
            raise feed.ObjectionFeedBlocked(self.objections_window_error)
        return feed.window_days(haven_days=self.objections_max_age_days)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """At run start: refuse a run whose own configuration sets a governance setting
        (:func:`refuse_governed_config`), hold the run's liveness lock until it ends
        (``safehaven.core.runs``), then verify the audit trail and record the run (fails closed,
        ``_begin_audited_run``).

        A sensor's evaluation (``assets.automation.incoming_sensor``) is not a run: it only lists
        the files waiting in ``incoming/``, so it holds no lock and opens no store.
        """
        if not context.run_id and context.dagster_run is None:
            return
        refuse_governed_config(context.dagster_run.run_config if context.dagster_run is not None else None)
        if context.run_id and context.run_id not in _RUN_LOCKS:
            _RUN_LOCKS[context.run_id] = runs.hold(self.home_dir().ensure(), context.run_id)
        self._begin_audited_run(context)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        fd = _RUN_LOCKS.pop(context.run_id, None) if context.run_id else None
        if fd is not None:
            runs.release(self.home_dir(), context.run_id, fd)

    def home_dir(self) -> Home:
        """The haven's home (``home``, else ``$SAFEHAVEN_HOME``) with its write-once anchor target."""
        from safehaven.cli.common import home_root_from_env

        root = Path(self.home).resolve() if self.home else home_root_from_env()
        return Home(
            root,
            audit_worm=Path(self.audit_worm_dir) if self.audit_worm_dir else None,
            memory_limit=self.memory_limit or None,
        )

    def keyring(self) -> KeyRing:
        """The pipeline's key ring: never a custodian, so it cannot open the vault's private key."""
        return KeyRing(self.home_dir().keys)

    def registry(self) -> ContractRegistry:
        """The contracts under ``contracts``, else ``$SAFEHAVEN_CONTRACTS`` (default ``data_contracts/``)."""
        from safehaven.cli.common import contracts_from_env

        return ContractRegistry(Path(self.contracts) if self.contracts else contracts_from_env())

    def context(self) -> Haven:
        """The domain calls' context (``safehaven.context.Haven``): this resource's home, the pipeline's
        key ring, its contracts, the OS user and today, built afresh on each call; a run of the
        pipeline (``scheduled``), not a person at a terminal."""
        home = self.home_dir()
        return Haven.open(home, contracts=self.registry(), keyring=KeyRing(home.keys)).as_scheduled()

    def store(self) -> Store:
        """The store; refused where the pipeline could read an unsealed private key (custody)."""
        keyring = self.keyring()
        keyring.check_custody()
        return Store(
            self.home_dir(),
            keyring,
            threads=self.threads or None,
            lock_wait=self.lock_wait_seconds,
            logger=dg.get_dagster_logger("safehaven.store"),
        )

    def _begin_audited_run(self, context: dg.InitResourceContext) -> None:
        """Fail closed at run start: verify the whole audit trail once, then record the run.

        ``safehaven.core.audit.begin_run`` raises ``AuditTrailBroken`` (one line: the first bad
        entry and how to clear it) when the trail does not verify, so no asset of the run
        touches data (CoP 23d).
        """
        from safehaven.core import audit

        run = context.dagster_run
        job = run.job_name if run is not None else "adhoc"
        haven = self.context()
        # at run start a busy store fails the run with StoreBusy's own words: Dagster retries
        # steps, not resources, so asking for a retry here would only hide why
        with self.connect(retry=False) as con:
            audit.begin_run(
                con, haven.home, actor=haven.actor, job=job, run_id=context.run_id or "", keyring=haven.keyring
            )
            if run is None or run.tags.get(COMPACTION_TAG) != COMPACTION_DEFERRED:
                _compact(con, context.log, self.registry())

    @contextmanager
    def connect(self, *, read_only: bool = False, retry: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection whose audit and haven keys were checked against the store's epochs; a
        store still busy after ``lock_wait_seconds`` asks Dagster to retry the step (module
        docstring), or with ``retry=False`` raises ``StoreBusy``."""
        store = self.store()
        with ExitStack() as stack:
            try:
                con = stack.enter_context(store.connect(read_only=read_only))
            except StoreBusy as exc:
                if not retry:
                    raise
                raise dg.RetryRequested(max_retries=self.busy_retries, seconds_to_wait=self.busy_retry_seconds) from exc
            if not read_only:
                pins.verify(con, store.keyring)
            yield con


#: the run tag of a job whose runs leave compaction to the next run without it (``assets.automation``:
#: a collection's intake runs, one per drop, each before the night's run; checking some sixty
#: tables' row groups costs 40-110 ms a run and grows with the store, issue 22)
COMPACTION_TAG = "safehaven/compaction"
COMPACTION_DEFERRED = "deferred"


def _compact(con: duckdb.DuckDBPyConnection, log: dg.DagsterLogManager, registry: ContractRegistry) -> None:
    """Rewrite the tables appends have left in many row groups (``safehaven.core.compaction``: the
    declared ones and those of ``registry``'s collections), once the run's audit trail has verified,
    unless the run's job defers it (:data:`COMPACTION_TAG`); say which, and which DuckDB refused (the
    run goes on: a storage change)."""
    done = compaction.compact(con, [t for c in registry.contracts.values() for t in c.store_tables])
    if done.rewritten:
        log.info(
            f"store: rewrote {len(done.rewritten)} table(s) left in many row groups: {', '.join(done.rewritten)} "
            f"({done.seconds:.1f} s)"
        )
    for table, why in done.refused.items():
        log.warning(f"store: could not rewrite {table}, left in many row groups (reads of it stay slower): {why}")


class GovernedSettingInRunConfig(dg.DagsterInvariantViolationError):
    """A run's configuration set one of the haven's governance settings (:data:`GOVERNED`)."""


def refuse_governed_config(run_config: object) -> None:
    """Refuse a run whose configuration sets a governance setting (:data:`GOVERNED`) of any resource to
    another value than the code location's environment gives it (Caldicott 2 and 4: the minimum,
    under the haven's own rules; CoP 11-14: the objection window is the haven's; CoP 12, 23d: the
    write-once audit target). The code location's settings come from its environment and its
    contracts folder (``SafeHavenResource.from_environment``, ``assets.definitions``); an approved
    agreement may set its own window (``safehaven.protect.feed.window_days``), a run never does."""
    resources = run_config.get("resources") if isinstance(run_config, dict) else None
    for name, entry in (resources or {}).items() if isinstance(resources, dict) else ():
        config = entry.get("config") if isinstance(entry, dict) else None
        given = _changed_governance(config) if isinstance(config, dict) else []
        if given:
            raise GovernedSettingInRunConfig(
                f"the run's configuration sets {', '.join(given)} of resource {name!r}: these are the haven's "
                "governance settings, not a run's (the contracts folder is the code location's, "
                "$SAFEHAVEN_CONTRACTS; the objection window is $SAFEHAVEN_OBJECTIONS_MAX_AGE_DAYS or an "
                "agreement's own; the write-once audit target $SAFEHAVEN_AUDIT_WORM): remove them from the "
                "run's configuration and launch it again; if the run was started by `safehaven run`, the "
                "code location runs with other values of these variables than this shell: restart it with "
                "the same ones"
            )


def _changed_governance(config: dict) -> list[str]:
    """The governance settings ``config`` sets to another value than the environment's (sorted)."""
    from safehaven.cli.common import contracts_from_env

    given = sorted(set(config) & set(GOVERNED))
    if not given:
        return []
    env = SafeHavenResource.from_environment()
    haven = {**{f: getattr(env, f) for f in GOVERNED}, "contracts": str(contracts_from_env())}
    return [f for f in given if _normal(f, config[f]) != _normal(f, haven[f])]


def _normal(field: str, value: object) -> object:
    """A governance setting as compared: a path as written (``Path`` drops a trailing slash), an
    empty path as none. Never resolved: a symbolic link to the environment's folder passes a
    resolved comparison, is kept as the run's text and followed again at each use, so repointed
    after the run started it would read other contracts or anchor elsewhere (found by review)."""
    if field in _GOVERNED_PATHS:
        return str(Path(str(value)).expanduser()) if value else None
    return value
