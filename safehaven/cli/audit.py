"""``safehaven audit``: verify the trail, show it, re-anchor it, and record a breach decision.

Rule (CoP 12 and 23d; Government response to the Caldicott review, recommendation 1): the
audit trail shows every access and cannot be quietly altered. When it fails verification the
haven fails closed: every command that audits refuses before it acts (``precheck``, run by
the ``safehaven`` group), with one line naming the first bad entry, until the governance lead
records the breach and the decision to resume (``safehaven audit resolve``), which is itself
audited as the first entry of a new segment of the chain.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import click

from safehaven.cli.common import REFUSED
from safehaven.cli.common import ensure_home as _home
from safehaven.cli.common import fail as _fail

if TYPE_CHECKING:
    import duckdb

    from safehaven.core.audit import VerifyResult
    from safehaven.core.home import Home

#: the object a release request's audit entries name (``safehaven.share.review``)
REQUEST_OBJECT = "release-request:"
WITHHELD = "withheld while the request awaits review"


#: Commands that act on data or approvals and so append to the audit trail: refused up front
#: while the trail does not verify (the append itself would refuse too, but after the work).
AUDITED_COMMANDS = frozenset(
    {
        ("run",),
        ("agreements", "approve"),
        ("agreements", "adopt"),
        ("agreements", "suspend"),
        ("agreements", "release"),
        ("subject-access",),
        ("keys", "rotate"),
        ("keys", "init-vault"),
        ("keys", "seal-vault"),
        ("reidentify",),
        ("objections", "notify"),
        ("objections", "record"),
        ("dispose",),
        ("objections", "resolve"),
        ("objections", "refreshed"),
        ("objections", "seal"),
        ("objections", "accept-batch"),
        ("objections", "apply-held"),
        ("review", "approve"),
        ("review", "return"),
        ("review", "reject"),
        ("review", "withdraw"),
        ("review", "release"),
        ("review", "resolve-shredding"),
        ("release",),
    }
)
BREACH_KIND = "integrity_failure"
EXIT_REFUSED = REFUSED


def precheck(words: Sequence[str]) -> None:
    """Refuse an audited command while the audit trail does not verify against its anchor.

    Raises ``AuditTrailBroken``. A store that is absent or cannot be opened is left to the
    command itself, which reports its own problem.
    """
    from safehaven.cli.common import home_from_env
    from safehaven.core import audit
    from safehaven.core.store import Store, StoreError

    names = [w for w in words if not w.startswith("-")][:2]
    if tuple(names[:1]) not in AUDITED_COMMANDS and tuple(names) not in AUDITED_COMMANDS:
        return
    home = home_from_env()
    if not home.store_file.exists():
        return
    try:
        with Store(home).connect(read_only=True) as con:
            audit.check(con, home)
            if names[:1] == ["run"]:
                _precheck_run(con, home)
    except StoreError:
        return


def _precheck_run(con: duckdb.DuckDBPyConnection, home: Home) -> None:
    """Before ``safehaven run`` launches anything: the whole trail verified (its anchor history
    included), as the run's first step would, and the key files checked against their epochs, as
    every step's connection would (``core.pins.verify``). Found there, a fault reached the operator
    as a Dagster failure and a traceback with an empty summary (found by review); here it is one
    line, and no run is launched."""
    from safehaven.core import audit, pins
    from safehaven.core.keys import KeyRing, KeyRingError

    result = audit.verify(con, home)
    if not result.ok:
        raise audit.AuditTrailBroken(result)
    try:
        pins.verify(con, KeyRing(home.keys), writable=False)
    except KeyRingError as exc:
        _fail(f"refused: {exc}")


def _record(result: VerifyResult) -> str:
    """Record a failed verification in the breach register, once per distinct failure."""
    from safehaven.core import audit
    from safehaven.core import registers as reg
    from safehaven.core.store import Store

    home = _home()
    what = audit.failure(result)
    with Store(home).connect() as con:
        for b in reversed(reg.breaches(con)):
            if b["kind"] == BREACH_KIND and b["what"] == what:
                return f"already recorded as breach {b['breach_id']}"
        breach = reg.record_breach(
            con,
            kind=BREACH_KIND,
            severity=2,
            what=what,
            remedial_action="investigate who changed the audit trail, report to the SIRO and the board, then "
            "record the decision to resume: safehaven audit resolve --decision '...'",
            detail={"first_bad_seq": result.first_bad_seq},
        )
        reg.export(con, home)
    return f"recorded as breach {breach} (severity 2)"


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit trail (CoP 12, 23d)."""


@audit_group.command("verify")
@click.option("--no-record", is_flag=True, help="Do not record a failure in the breach register.")
def audit_verify(no_record: bool) -> None:
    """Verify the chain, its anchors and published heads; exit 1 naming the first bad entry if it fails."""
    from safehaven.core import audit
    from safehaven.core.store import Store, StoreError

    home = _home()
    if not home.store_file.exists():
        click.echo("no store yet: nothing to verify")
        return
    try:
        with Store(home).connect(read_only=True) as con:
            result = audit.verify(con, home)
    except StoreError as exc:
        _fail(str(exc))
    if result.ok:
        click.echo(result.reason)
        return
    click.echo(f"AUDIT TRAIL FAILED VERIFICATION ({audit.where(result)})\n{result.reason}", err=True)
    if not no_record:
        click.echo(_record(result), err=True)
    click.echo(f"nothing is recorded and the pipeline does not run until you {audit.RESOLVE_HINT}", err=True)
    sys.exit(1)


@audit_group.command("log")
@click.option("--agreement", help="Only entries under this agreement.")
@click.option("--limit", type=int, default=50, show_default=True, help="The most recent N entries.")
def audit_log(agreement: str | None, limit: int) -> None:
    """Show the most recent audit entries (no identifier values are ever recorded)."""
    from safehaven.core import audit
    from safehaven.core.store import Store

    home = _home()
    if not home.store_file.exists():
        return
    with Store(home).connect(read_only=True) as con:
        entries = audit.entries_for(con, agreement=agreement)[-limit:]
        awaiting = _awaiting_review(con)
    from safehaven.share.review import DECIDE_ACTION, PREPARE_ACTION

    for e in entries:
        actor, outcome = e.actor, e.outcome
        if e.object.removeprefix(REQUEST_OBJECT) in awaiting and e.action != PREPARE_ACTION:
            actor, outcome = WITHHELD, (WITHHELD if e.action == DECIDE_ACTION else outcome)
        click.echo(
            f"#{e.seq} {e.at.isoformat(timespec='seconds')} {actor} ({e.role}) {e.action} {e.object} "
            f"[{outcome}]" + (f" agreement={e.agreement}" if e.agreement else "")
        )


def _awaiting_review(con: duckdb.DuckDBPyConnection) -> set[str]:
    """The release requests whose reviews are blinded (``safehaven.share.review.blinded``: SATRE
    3.3.05, docs/rules.md "Output checking"): while one awaits a decision, the log shows neither
    who acted on it since its preparation nor how each reviewer decided, as ``safehaven review
    show`` shows only how many reviews are in; both appear once the request is decided."""
    from safehaven.core.store import table_exists
    from safehaven.share import review

    if not table_exists(con, *review.REQUESTS.split(".")):  # read-only: nothing to create
        return set()
    rows = con.execute(
        f"SELECT release_id FROM {review.REQUESTS} WHERE list_contains(?::VARCHAR[], state)",
        [list(review.AWAITING_REVIEW)],
    ).fetchall()
    return {str(r[0]) for r in rows}


@audit_group.command("anchor")
@click.confirmation_option(prompt="Re-anchor the audit head at the last entry? Review unanchored entries first.")
def audit_anchor() -> None:
    """Re-anchor the head after a person has reviewed entries written after the last anchor."""
    from safehaven.core import audit
    from safehaven.core.keys import KeyRingError
    from safehaven.core.registers import current_actor
    from safehaven.core.store import Store

    home = _home()
    with Store(home).connect() as con:
        try:
            seq = audit.anchor(con, home)
        except (ValueError, KeyRingError) as exc:
            _fail(str(exc))
        audit.append(con, actor=current_actor(), role="governance", action="anchor", object="audit:head", home=home)
    click.echo(f"anchored the audit head at entry {seq}")


@audit_group.command("resolve")
@click.option("--decision", required=True, help="What was found, who was told, and why work may resume.")
def audit_resolve(decision: str) -> None:
    """Record a breach of the audit trail and the decision to resume (governance lead only).

    The breach goes in the breach register; the decision is audited as the first entry of a new
    segment linked to the last entry still stored. The trail then verifies and shows the break.
    """
    from safehaven.cli.governance import require_governance_key as _require_governance_key
    from safehaven.core import audit
    from safehaven.core.keys import KeyRingError
    from safehaven.core.registers import current_actor, export
    from safehaven.core.store import Store

    home = _home()
    _require_governance_key(home, "recording a breach decision")
    with Store(home).connect() as con:
        try:
            done = audit.resolve(con, home, actor=current_actor(), decision=decision)
        except (ValueError, KeyRingError) as exc:
            _fail(str(exc))
        export(con, home)
    lost = f"entries {done.lost_from}-{done.lost_to} written off; " if done.lost_from <= done.lost_to else ""
    lost += f"{audit.UNKNOWN_LOSS}; " if done.loss_unknown else ""
    click.echo(
        f"recorded breach {done.breach_id} and the decision at entry {done.seq}: {lost}a new segment starts there"
    )


def register(main: click.Group) -> None:
    """Add the audit commands to the CLI."""
    main.add_command(audit_group)
