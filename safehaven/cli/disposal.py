"""``safehaven dispose``: retention and secure disposal (CoP 43d, 43f, 48-50; ``safehaven.dispose.disposal``).

Disposal is irreversible: keys are destroyed and the store is rebuilt. The command therefore
shows the plan and asks for confirmation unless ``--yes`` is given; ``--dry-run`` only shows
the plan. Output is counts, ids, file names and key ids, never a value.
"""

from __future__ import annotations

import json
import sys
from datetime import date
from typing import TYPE_CHECKING

import click

from safehaven.cli.common import custodian_keyring, ensure_home, fail, haven_from_env

if TYPE_CHECKING:
    from safehaven.core.home import Home
    from safehaven.dispose.model import DisposalResult, Plan, Target


def _show(data: dict[str, object], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    width = max((len(k) for k in data), default=0)
    for k, v in data.items():
        text = (
            ", ".join(str(x) for x in v)
            if isinstance(v, list) and all(not isinstance(x, dict) for x in v)
            else json.dumps(v, default=str)
            if isinstance(v, list | dict)
            else v
        )
        click.echo(f"{k.ljust(width)}  {text}")


def _check_modes(
    agreement: str | None,
    releases: tuple[str, ...],
    collection: str | None,
    before: str | None,
    show_due: bool,
    sweep: bool,
    resume: bool,
) -> None:
    """Exit with a usage error unless exactly one mode is given, with the options it takes."""
    modes = sum([bool(agreement), bool(collection), show_due, sweep, resume])
    if modes != 1:
        fail("give exactly one of --agreement, --collection (with --before), --due, --sweep or --resume", 2)
    if releases and not agreement:
        fail("--release needs --agreement", 2)
    if collection and not before:
        fail("--collection needs --before YYYY-MM-DD (records received before that day are disposed of)", 2)
    if before and not collection:
        fail("--before goes with --collection", 2)


def _list_due(home: Home, as_json: bool) -> None:
    """``--due``: list what is due for disposal."""
    from safehaven.dispose import disposal as d

    items = d.due(haven_from_env(home))
    if as_json:
        click.echo(json.dumps([i.as_dict() for i in items], indent=2, default=str))
        return
    if not items:
        click.echo("nothing is due for disposal")
    for item in items:
        what = item.target.describe() if item.target else ""
        click.echo(f"{item.action:8}  {what}\n          {item.reason}")


def _resume(home: Home, as_json: bool) -> None:
    """``--resume``: complete an interrupted disposal, if there is one."""
    from safehaven.dispose import disposal as d

    result = d.resume(haven_from_env(home, custodian_keyring(home)))
    if result is None:
        click.echo("no interrupted disposal")
        return
    _show(result.as_metadata(), as_json)


def _sweep(home: Home, authorised_by: str | None, yes: bool) -> None:
    """``--sweep``: dispose of everything due (after confirmation); exit 1 if any failed."""
    from safehaven.dispose import disposal as d

    if not yes and not click.confirm("dispose of everything due now (irreversible)?"):
        fail("nothing was disposed of", 1)
    report = d.sweep(haven_from_env(home, custodian_keyring(home)), authorised_by=authorised_by)
    out = {
        "disposed": [r.as_metadata() for r in report.results if r.status == "disposed"],
        "for_review": [i.as_dict() for i in report.review],
        "failed": report.failed,
    }
    click.echo(json.dumps(out, indent=2, default=str))
    if report.failed:
        sys.exit(1)


def _target(agreement: str | None, releases: tuple[str, ...], collection: str | None, before: str | None) -> Target:
    """What ``--agreement`` (with ``--release``) or ``--collection`` with ``--before`` names."""
    from safehaven.dispose import disposal as d

    if agreement:
        return d.Target.for_agreement(agreement, releases)
    try:
        day = date.fromisoformat(before or "")
    except ValueError:
        fail(f"--before {before!r} is not a date (YYYY-MM-DD)", 2)
    return d.Target.for_collection(collection or "", day)


def _plan(
    home: Home, target: Target, reason: str | None, authorised_by: str | None, dry_run: bool, yes: bool, as_json: bool
) -> Plan | None:
    """Show the plan for ``target`` and have it confirmed; None when nothing is to be disposed of now.

    With ``--json`` one document is printed: the plan (``--dry-run``) or the result.
    """
    from safehaven.dispose import disposal as d

    plan = d.make_plan(haven_from_env(home), target, reason=reason, authorised_by=authorised_by)
    if plan.empty:
        click.echo(f"nothing is held for {target.describe()}: nothing to dispose of")
        return None
    if dry_run or not as_json:
        _show(plan.summary(), as_json)
    if dry_run:
        return None
    if not yes and not click.confirm("\ndispose of all of this now (irreversible)?"):
        fail("nothing was disposed of", 1)
    return plan


def _dispose_target(
    home: Home, target: Target, reason: str | None, authorised_by: str | None, dry_run: bool, yes: bool, as_json: bool
) -> DisposalResult | None:
    """Dispose of ``target`` (planned and confirmed unless a pending disposal is taken over); None if not done."""
    from safehaven.dispose import disposal as d

    plan = None
    if d.pending(home) is None:
        plan = _plan(home, target, reason, authorised_by, dry_run, yes, as_json)
        if plan is None:
            return None
    elif dry_run:
        fail("an interrupted disposal is pending: run safehaven dispose --resume", 1)
    keyring = custodian_keyring(home)  # asked for the passphrase only if a vault value must be kept
    return d.dispose(haven_from_env(home, keyring), target, reason=reason, authorised_by=authorised_by, plan=plan)


def _show_result(home: Home, result: DisposalResult, as_json: bool) -> None:
    """Print a disposal's result and where its certificate is recorded."""
    from safehaven.dispose import disposal as d

    if result.status != "disposed":
        click.echo(result.reason)
        return
    if not as_json:
        click.echo("")
    _show(result.as_metadata(), as_json)
    if not as_json:
        click.echo(
            f"\ncertificate {result.disposal_id} recorded in {home.registers / f'{d.EXPORT_STEM}.csv'} "
            "and the audit trail"
        )


def register(main: click.Group) -> None:
    """Add this area's commands to the CLI."""

    @main.command("dispose")
    @click.option("--agreement", help="Dispose of an agreement's data: its pseudonym key, release files and tables.")
    @click.option(
        "--release",
        "releases",
        multiple=True,
        help="With --agreement: only these releases (the haven's copy of each extract).",
    )
    @click.option("--collection", help="Dispose of a collection's records received before --before.")
    @click.option("--before", help="With --collection: a day (YYYY-MM-DD); records received before it go.")
    @click.option("--reason", help="Why (recorded in the certificate); default: the retention rule that applies.")
    @click.option("--by", "authorised_by", help='Who authorised it, e.g. "Name, Caldicott Guardian".')
    @click.option("--due", "show_due", is_flag=True, help="List what is due for disposal; change nothing.")
    @click.option("--sweep", is_flag=True, help="Dispose of everything due (what the daily job does).")
    @click.option("--resume", is_flag=True, help="Complete an interrupted disposal.")
    @click.option("--dry-run", is_flag=True, help="Show what would be disposed of; change nothing.")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    def dispose(
        agreement: str | None,
        releases: tuple[str, ...],
        collection: str | None,
        before: str | None,
        reason: str | None,
        authorised_by: str | None,
        show_due: bool,
        sweep: bool,
        resume: bool,
        dry_run: bool,
        yes: bool,
        as_json: bool,
    ) -> None:
        """Dispose of data whose retention or agreement has ended: keys first, then every copy.

        \b
        safehaven dispose --due
        safehaven dispose --agreement flu-surveillance-2024 --by "Name, Caldicott Guardian"
        safehaven dispose --agreement statutory-gp-audit --release statutory-gp-audit-r0001
        safehaven dispose --collection gp_events --before 2019-04-01 --dry-run
        safehaven dispose --resume
        """
        from safehaven.dispose import disposal as d

        home = ensure_home()
        _check_modes(agreement, releases, collection, before, show_due, sweep, resume)
        try:
            if show_due:
                _list_due(home, as_json)
                return
            if resume:
                _resume(home, as_json)
                return
            if sweep:
                _sweep(home, authorised_by, yes)
                return
            target = _target(agreement, releases, collection, before)
            result = _dispose_target(home, target, reason, authorised_by, dry_run, yes, as_json)
        except d.DisposalError as exc:
            fail(str(exc))
        if result is not None:
            _show_result(home, result, as_json)
