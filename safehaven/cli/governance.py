"""``safehaven`` commands for governance: agreements, subject access, registers.

Roles are enforced by keys (CoP 27b; Caldicott 4; ``docs/rules.md`` "Users"): the governance
lead's commands (``agreements approve|adopt|suspend``, ``subject-access``, identifiable releases)
need the identity vault's private key ``keys/vault.key``, sealed under the key custodian's
passphrase (``safehaven.core.keys``);
the pipeline holds the store and haven keys; analysts hold no key and read only ``published/``.
Every command that acts on data or approvals appends to the audit trail; none prints an
identifier value.
"""

from __future__ import annotations

import json
import sys
from datetime import date, timedelta
from typing import TYPE_CHECKING

import click

from safehaven.cli.common import contracts_from_env, haven_from_env, registry_from_env
from safehaven.cli.common import ensure_home as _home
from safehaven.cli.common import fail as _fail
from safehaven.core.days import haven_today
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing
from safehaven.core.legal_basis import BASES_IN_ORDER

if TYPE_CHECKING:
    import duckdb

    from safehaven.intake.contracts import ContractRegistry


def require_governance_key(home: Home, what: str) -> KeyRing:
    """The key custodian's sealed vault key must open on this host (roles by key separation).

    Returns the custodian's key ring (it holds the opened key for the rest of the command).
    """
    from safehaven.cli.common import custodian_keyring
    from safehaven.core.keys import VAULT, KeyRingError

    keyring = custodian_keyring(home)
    if not keyring.exists(VAULT):
        _fail(
            f"{what} is for the governance lead: it needs the identity vault's private key "
            f"({keyring.path(VAULT)}), which is not on this host",
        )
    try:
        keyring.get_private(VAULT)
    except KeyRingError as exc:
        _fail(str(exc))
    return keyring


def _create_agreement_salt(con: object, keyring: KeyRing, agreement_id: str) -> None:
    """An approved agreement's pseudonym salt is created now, once (``safehaven.core.pins``)."""
    from safehaven.core import pins
    from safehaven.core.keys import KeyRingError

    try:
        pins.agreement_salt(con, keyring, agreement_id)  # type: ignore[arg-type]
    except KeyRingError as exc:
        _fail(f"approved, but its pseudonym key is refused: {exc}")


def _audit(home: Home, **entry: object) -> int:
    from safehaven.core import audit
    from safehaven.core.store import Store

    with Store(home).connect() as con:
        return audit.append(con, home=home, **entry)  # type: ignore[arg-type]


def _parse_day(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


# --- agreements -------------------------------------------------------------------------


@click.group()
def agreements() -> None:
    """Data-sharing agreements (data_contracts/agreements/*.yaml; CoP 41-43)."""


@agreements.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_agreements(as_json: bool) -> None:
    """Every agreement: status in the haven today, whether in force, level, basis, recipient, dates, problems."""
    from safehaven.core.store import Store
    from safehaven.share import approvals
    from safehaven.share.agreements import agreement_path, problems, scan_agreements

    home = _home()
    registry = registry_from_env()
    found, errors = scan_agreements(registry.root)
    rows = []
    with Store(home).connect() as con:
        standing = {aid: approvals.standing(con, a, agreement_path(aid, registry.root)) for aid, a in found.items()}
        status = {aid: approvals.status_label(con, a, agreement_path(aid, registry.root)) for aid, a in found.items()}
    for aid, a in found.items():
        ok, why = standing[aid].in_force()  # the store's decision, never the file's block
        rows.append(
            {
                "id": aid,
                "status": status[aid],
                "in_force": ok,
                "identifiability": a.identifiability,
                "legal_basis": a.basis,
                "recipient": a.recipient.name,
                "start": a.start_date.isoformat(),
                "end": a.end_date.isoformat(),
                "problems": len(problems(a, registry)),
                "why": why,
            }
        )
    for aid, err in errors.items():
        rows.append({"id": aid, "status": "unreadable", "in_force": False, "problems": 1, "why": err})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'agreement':<26} {'status':<44} {'in force':<8} {'level':<14} {'basis':<15} {'ends':<10} problems")
    for r in rows:
        click.echo(
            f"{r['id']:<26} {r['status']:<44} {'yes' if r['in_force'] else 'no':<8} "
            f"{r.get('identifiability', '-'):<14} {r.get('legal_basis', '-'):<15} {r.get('end', '-'):<10} "
            f"{r['problems']}"
        )


@agreements.command("validate")
@click.argument("ids", nargs=-1)
@click.option("--today", help="Judge dates as of this day (YYYY-MM-DD).")
def validate_agreements(ids: tuple[str, ...], today: str | None) -> None:
    """Check agreements against CoP 43 and the contracts; name what is missing or contradictory.

    Exits 1 when a named agreement, an approved or suspended one, or any file fails. Drafts are
    reported but do not fail a check of the whole directory.
    """
    from safehaven.share.agreements import problems, scan_agreements

    registry = registry_from_env()
    found, errors = scan_agreements(registry.root)
    day = _parse_day(today)
    wanted = list(ids) or sorted({*found, *errors})
    failed = False
    for aid in wanted:
        if aid in errors:
            click.echo(f"UNREADABLE {aid}: {errors[aid]}")
            failed = True
            continue
        if aid not in found:
            click.echo(f"MISSING    {aid}: no data_contracts/agreements/{aid}.yaml")
            failed = True
            continue
        a = found[aid]
        issues = problems(a, registry, today=day)
        if not issues:
            click.echo(f"ok         {aid} ({a.status_on(day)}, {a.identifiability}, {a.basis})")
            continue
        draft = a.approval.status == "draft"
        click.echo(f"{'INCOMPLETE' if draft else 'REFUSED':<10} {aid} ({a.approval.status}): {len(issues)} problem(s)")
        for issue in issues:
            click.echo(f"  - {issue}")
        failed = failed or not draft or bool(ids)
    if failed:
        sys.exit(1)


@agreements.command("approve")
@click.argument("agreement_id")
@click.option("--approver", required=True, help='Who approves, with their role: "Name, Caldicott Guardian".')
def approve_agreement(agreement_id: str, approver: str) -> None:
    """Approve an agreement: a decision in the store, pinned to the file's SHA-256, audited.

    The YAML is not rewritten (it holds the terms); any later change to the file needs a new
    approval before anything flows under it (safehaven.share.approvals).
    """
    from safehaven.core.store import Store
    from safehaven.share import approvals
    from safehaven.share.agreements import AgreementError, agreement_path, load_agreement_file

    home = _home()
    keyring = require_governance_key(home, "approving an agreement")
    registry = registry_from_env()
    with Store(home, keyring).connect() as con:
        try:
            d = approvals.approve(con, agreement_id, approver, registry=registry, actor=_actor())
        except AgreementError as exc:
            _fail(str(exc))
        approvals.export(con, home)
        if load_agreement_file(agreement_path(agreement_id, registry.root)).identifiability != "anonymised":
            _create_agreement_salt(con, keyring, agreement_id)
    click.echo(
        f"approved {agreement_id} (file SHA-256 {d.agreement_sha256[:12]}...) by {d.decided_by} on {d.decided_on}; "
        "releases are prepared for review at the next run"
    )


@agreements.command("adopt")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every agreement file under data_contracts/agreements/.")
@click.option("--by", "by", required=True, help='Who adopts the files\' approvals, with their role: "Name, role".')
@click.option("--reason", required=True, help="Why the files' approvals are adopted (recorded and audited).")
def adopt_agreements(ids: tuple[str, ...], all_: bool, by: str, reason: str) -> None:
    """Adopt agreement files' approval blocks as decisions by a named person (audited).

    Each file whose ``approval:`` block says approved or suspended gets a decision with source
    ``file``, pinned to its SHA-256; others are reported, not adopted; an agreement that already
    has a decision is left as it is (safehaven.share.approvals). A file's block alone approves
    nothing.
    """
    from safehaven.core.store import Store

    if bool(ids) == all_:
        _fail("name the agreements to adopt, or give --all (not both)")
    home = _home()
    keyring = require_governance_key(home, "adopting an agreement's approval")
    with Store(home, keyring).connect() as con:
        done = adopt_in_store(con, home, list(ids) if ids else None, by, reason, actor=_actor())
        for aid in done:
            _create_agreement_salt(con, keyring, aid)


def adopt_in_store(
    con: duckdb.DuckDBPyConnection, home: Home, ids: list[str] | None, by: str, reason: str, *, actor: str
) -> list[str]:
    """Adopt, export the decisions, print one line per agreement (also the demo set-up's adoption).

    Returns the ids adopted whose releases carry pseudonyms (their salt is created by the caller).
    """
    from safehaven.share import approvals
    from safehaven.share.agreements import AgreementError

    registry = registry_from_env()
    try:
        found = approvals.adopt(con, ids, by, reason, registry=registry, actor=actor)
    except AgreementError as exc:
        _fail(str(exc))
    approvals.export(con, home)
    for a in found:
        click.echo(a.message)
    adopted = [a for a in found if a.outcome == approvals.ADOPTED]
    return [a.agreement_id for a in adopted if _level(registry, a.agreement_id) != "anonymised"]


def _level(registry: ContractRegistry, agreement_id: str) -> str:
    from safehaven.share.agreements import agreement_path, load_agreement_file

    return load_agreement_file(agreement_path(agreement_id, registry.root)).identifiability


@agreements.command("suspend")
@click.argument("agreement_id")
@click.option("--reason", required=True, help="Why the agreement is suspended (recorded in the store and the audit).")
@click.option("--by", "by", required=True, help='Who suspends it, with their role: "Name, Caldicott Guardian".')
def suspend_agreement(agreement_id: str, reason: str, by: str) -> None:
    """Suspend an approved agreement: nothing is released under it until it is re-approved."""
    from safehaven.core.store import Store
    from safehaven.share import approvals
    from safehaven.share.agreements import AgreementError

    home = _home()
    require_governance_key(home, "suspending an agreement")
    with Store(home).connect() as con:
        try:
            approvals.suspend(con, agreement_id, reason, by, registry=registry_from_env(), actor=_actor())
        except AgreementError as exc:
            _fail(str(exc))
        approvals.export(con, home)
    click.echo(
        f"suspended {agreement_id}: {reason}. Nothing is released under it until it is re-approved "
        f"(safehaven agreements approve {agreement_id} --approver ...)"
    )


@agreements.command("draft")
@click.argument("agreement_id")
@click.option("--title", required=True)
@click.option("--recipient", required=True, help="The receiving organisation.")
@click.option(
    "--public-body/--not-public-body",
    default=False,
    show_default=True,
    help="A recipient that is not a public body needs a contract (CoP 41).",
)
@click.option(
    "--basis",
    type=click.Choice(BASES_IN_ORDER),
    required=True,
)
@click.option("--level", type=click.Choice(["identifiable", "pseudonymised", "anonymised"]), required=True)
@click.option("--field", "fields", multiple=True, required=True, help="collection.field released (repeat).")
@click.option("--link", "links", multiple=True, help="left:right collections the agreement may link (repeat).")
@click.option("--start", help="Start date (default today).")
@click.option("--end", help="End date (default one year after the start).")
def draft_agreement(
    agreement_id: str,
    title: str,
    recipient: str,
    public_body: bool,
    basis: str,
    level: str,
    fields: tuple[str, ...],
    links: tuple[str, ...],
    start: str | None,
    end: str | None,
) -> None:
    """Write a draft agreement with TODO markers for everything a person must write."""
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.share.agreements import AgreementError, agreement_path, draft_yaml, parse_agreement

    try:
        path = agreement_path(agreement_id, contracts_from_env())
    except AgreementError as exc:
        _fail(str(exc))
    if path.exists():
        _fail(f"{path} already exists")
    day = _parse_day(start) or haven_today()
    parsed = []
    for item in fields:
        collection, _, name = item.partition(".")
        if not name:
            _fail(f"--field {item!r} must be collection.field")
        parsed.append((collection, name))
    pairs = []
    for item in links:
        left, _, right = item.partition(":")
        if not right:
            _fail(f"--link {item!r} must be left:right")
        pairs.append((left, right))
    text = draft_yaml(
        agreement_id,
        title=title,
        recipient=recipient,
        public_body=public_body,
        basis=basis,
        level=level,
        fields=parsed,
        links=pairs,
        start=day,
        end=_parse_day(end) or day + timedelta(days=365),
    )
    try:  # validated before anything is written: a refused draft leaves no file behind
        agreement = parse_agreement(text, path.name)
    except AgreementError as exc:
        _fail(f"draft refused, nothing written: {exc}")
    unknown = _unknown_fields(agreement, ContractRegistry(path.parent.parent))
    if unknown:
        _fail("draft refused, nothing written: " + "; ".join(unknown))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    click.echo(f"wrote {path}\nreplace every TODO, then: safehaven agreements validate {agreement_id}")


def _unknown_fields(agreement, registry) -> list[str]:
    """Released fields that no content contract declares (a draft must name real fields)."""
    unknown = []
    for f in agreement.fields:
        contract = registry.contracts.get(f.collection)
        if contract is None or contract.kind != "content":
            unknown.append(f"{f.collection} is not a content collection")
        elif f.field not in contract.field_names:
            unknown.append(f"{f.collection}.{f.field} is not in the {f.collection} contract (v{contract.version})")
    return unknown


@agreements.command("release")
@click.argument("agreement_id")
def release_now(agreement_id: str) -> None:
    """Prepare one release under an agreement now and open its request for review.

    Nothing leaves until two reviewers approve it (safehaven review). Identifiable releases
    are built with the sealed vault key, so they ask for the key custodian's passphrase.
    """
    from safehaven.cli.common import custodian_keyring, objections_window_from_env
    from safehaven.core.store import Store
    from safehaven.protect.feed import ObjectionFeedBlocked
    from safehaven.share.linkage import LinkageRefused
    from safehaven.share.releases import PREPARED, ReleaseRefused, prepare

    home = _home()
    keyring = custodian_keyring(home)  # an identifiable release opens the sealed vault key
    with Store(home, keyring).connect() as con:
        try:
            result = prepare(
                con,
                agreement_id,
                haven=haven_from_env(home, keyring),
                objections_max_age_days=objections_window_from_env(),
            )
        except (ReleaseRefused, LinkageRefused, ObjectionFeedBlocked) as exc:
            _fail(f"refused: {exc}")
    click.echo(result.reason)
    if result.status == PREPARED:
        click.echo(f"review it: safehaven review show {result.release_id}")


# --- subject access and registers -------------------------------------------------------


@click.command("subject-access")
@click.argument("nhs_number", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def subject_access_command(nhs_number: tuple[str, ...], as_json: bool) -> None:
    """What the haven holds about a person and every use of their record (CoP 12; Govt rec. 1).

    Give the NHS number in any formatting, or "-" to read it from standard input (keeps it out
    of the shell history). Governance lead only: needs the identity vault's private key.
    """
    from safehaven.core.store import Store
    from safehaven.share.subject_access import SubjectAccessDenied, subject_access

    home = _home()
    keyring = require_governance_key(home, "subject access")
    number = sys.stdin.readline().strip() if nhs_number == ("-",) else "".join(nhs_number)
    if not home.store_file.exists():
        _fail("no store yet: the haven holds nothing")
    with Store(home, keyring).connect() as con:
        try:
            report = subject_access(con, number, haven=haven_from_env(home, keyring))
        except SubjectAccessDenied as exc:
            _fail(str(exc), 2)
    click.echo(json.dumps(report.as_dict(), indent=2, default=str) if as_json else report.to_text())


@click.command("registers")
@click.option("--show", type=click.Choice(["summary", "releases", "breaches"]), default="summary", show_default=True)
def registers_command(show: str) -> None:
    """Export and show the data release register and the breach register (CoP 32-33; Govt rec. 6)."""
    from safehaven.core import registers as reg
    from safehaven.core.store import Store

    home = _home()
    with Store(home).connect() as con:
        paths = reg.export(con, home)
        releases, breaches = reg.releases(con), reg.breaches(con)
    if show == "releases":
        for r in releases:
            click.echo(
                f"{r['released_at']:%Y-%m-%d %H:%M} {r['release_id']:<34} {r['recipient'][:40]:<40} "
                f"{r['identifiability']:<13} {r['legal_basis']:<12} records={r['records_released']} "
                f"withheld={r['records_withheld_objections']} "
                f"opt-outs={'applied' if r['opt_outs_applied'] else 'not applied'}"
            )
    elif show == "breaches":
        for b in breaches:
            click.echo(
                f"#{b['breach_id']} {b['recorded_at']:%Y-%m-%d %H:%M} severity {b['severity']} {b['kind']}: "
                f"{b['what']}\n    remedial action: {b['remedial_action']}"
            )
    else:
        by_severity: dict[int, int] = {}
        for b in breaches:
            by_severity[b["severity"]] = by_severity.get(b["severity"], 0) + 1
        click.echo(
            f"data release register: {len(releases)} release(s) under "
            f"{len({r['agreement_id'] for r in releases})} agreement(s)"
        )
        click.echo(
            f"breach register: {len(breaches)} entr(ies)"
            + "".join(f", severity {s}: {n}" for s, n in sorted(by_severity.items()))
        )
    click.echo("\n".join(f"  {p}" for p in paths.values()))


def _actor() -> str:
    from safehaven.core.registers import current_actor

    return current_actor()


def register(main: click.Group) -> None:
    """Add this area's commands to the CLI."""
    main.add_command(agreements)
    main.add_command(subject_access_command)
    main.add_command(registers_command)
