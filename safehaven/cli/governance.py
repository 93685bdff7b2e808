"""``safehaven`` commands for governance: agreements, the audit trail, subject access, registers.

Roles are enforced by keys (BRIEF; Caldicott 4): the governance lead's commands (``agreements
approve|suspend``, ``subject-access``, identifiable releases) need the identity vault's private
key ``keys/vault.key``, sealed under the key custodian's passphrase (``safehaven.core.keys``);
the pipeline holds the store and haven keys; analysts hold no key and read only ``published/``.
Every command that acts on data or approvals appends to the audit trail; none prints an
identifier value.
"""

from __future__ import annotations

import json
import sys
from datetime import date, timedelta

import click

from safehaven.cli.common import ensure_home as _home
from safehaven.cli.common import fail as _fail
from safehaven.core.home import Home
from safehaven.core.keys import KeyRing


def _require_governance_key(home: Home, what: str) -> KeyRing:
    """The key custodian's sealed vault key must open on this host (roles by key separation)."""
    from safehaven.cli.common import custodian_keyring
    from safehaven.core.keys import VAULT, KeyRingError

    keyring = custodian_keyring(home)
    if not keyring.exists(VAULT):
        _fail(
            f"{what} is for the governance lead: it needs the identity vault's private key "
            f"({keyring.path(VAULT)}), which is not on this host",
            3,
        )
    try:
        keyring.get_private(VAULT)
    except KeyRingError as exc:
        _fail(str(exc), 3)
    return keyring


def _create_agreement_salt(home: Home, keyring: KeyRing, agreement_id: str) -> None:
    """An approved agreement's pseudonym salt is created now, once (``safehaven.core.pins``)."""
    from safehaven.core import pins
    from safehaven.core.keys import KeyRingError
    from safehaven.core.store import Store

    try:
        with Store(home, keyring).connect() as con:
            pins.agreement_salt(con, keyring, agreement_id)
    except KeyRingError as exc:
        _fail(f"approved, but its pseudonym key is refused: {exc}", 3)


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
    """Every agreement: status today, whether in force, level, basis, recipient, dates, problems."""
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.share.agreements import problems, scan_agreements

    registry = ContractRegistry()
    found, errors = scan_agreements(registry.root)
    rows = []
    for aid, a in found.items():
        ok, why = a.in_force()
        rows.append(
            {
                "id": aid,
                "status": a.status_on(),
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
    click.echo(f"{'agreement':<26} {'status':<10} {'in force':<8} {'level':<14} {'basis':<15} {'ends':<10} problems")
    for r in rows:
        click.echo(
            f"{r['id']:<26} {r['status']:<10} {'yes' if r['in_force'] else 'no':<8} "
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
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.share.agreements import problems, scan_agreements

    registry = ContractRegistry()
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
    """Approve an agreement (rewrites its approval block: status, approver, date) and audit it."""
    from safehaven.core.files import sha256_file
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.share.agreements import AgreementError, agreement_path, approve

    home = _home()
    keyring = _require_governance_key(home, "approving an agreement")
    registry = ContractRegistry()
    try:
        a = approve(agreement_id, approver, root=registry.root, registry=registry)
    except AgreementError as exc:
        _fail(str(exc))
    if a.identifiability != "anonymised":
        _create_agreement_salt(home, keyring, a.id)
    sha = sha256_file(agreement_path(agreement_id, registry.root))
    _audit(
        home,
        actor=_actor(),
        role="governance",
        action="approve",
        object=f"agreement:{a.id}",
        purpose=a.purposes[0],
        legal_basis=a.basis,
        agreement=a.id,
        detail={
            "approver": a.approval.approver,
            "date": a.approval.date.isoformat() if a.approval.date else None,
            "version": a.version,
            "sha256": sha,
        },
    )
    click.echo(
        f"approved {a.id} v{a.version} ({a.identifiability}, {a.basis}) by {a.approval.approver} "
        f"on {a.approval.date}; releases start at the next run"
    )


@agreements.command("suspend")
@click.argument("agreement_id")
@click.option("--reason", required=True, help="Why the agreement is suspended (recorded in the file and the audit).")
@click.option("--by", "by", required=True, help='Who suspends it, with their role: "Name, Caldicott Guardian".')
def suspend_agreement(agreement_id: str, reason: str, by: str) -> None:
    """Suspend an approved agreement: nothing is released under it until it is re-approved."""
    from safehaven.core.files import sha256_file
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.share.agreements import AgreementError, agreement_path, suspend

    home = _home()
    _require_governance_key(home, "suspending an agreement")
    registry = ContractRegistry()
    try:
        a = suspend(agreement_id, reason, by, root=registry.root)
    except AgreementError as exc:
        _fail(str(exc))
    sha = sha256_file(agreement_path(agreement_id, registry.root))
    _audit(
        home,
        actor=_actor(),
        role="governance",
        action="suspend",
        object=f"agreement:{a.id}",
        purpose=a.purposes[0],
        legal_basis=a.basis,
        agreement=a.id,
        detail={"by": by, "reason": reason, "version": a.version, "sha256": sha},
    )
    click.echo(
        f"suspended {a.id}: {reason}. Nothing is released under it until it is re-approved "
        f"(safehaven agreements approve {a.id} --approver ...)"
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
    type=click.Choice(["consent", "statutory", "public_interest", "section_251", "copi_reg3", "anonymised"]),
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
    from safehaven.share.agreements import AgreementError, agreement_path, draft_yaml, load_agreement_file

    try:
        path = agreement_path(agreement_id)
    except AgreementError as exc:
        _fail(str(exc))
    if path.exists():
        _fail(f"{path} already exists")
    day = _parse_day(start) or date.today()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    load_agreement_file(path)
    click.echo(f"wrote {path}\nreplace every TODO, then: safehaven agreements validate {agreement_id}")


@agreements.command("release")
@click.argument("agreement_id")
def release_now(agreement_id: str) -> None:
    """Make one release under an agreement now (identifiable releases: governance lead only)."""
    from safehaven.cli.common import custodian_keyring
    from safehaven.core.store import Store
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.share.linkage import LinkageRefused
    from safehaven.share.releases import ReleaseRefused, release

    home = _home()
    keyring = custodian_keyring(home)  # an identifiable release opens the sealed vault key
    with Store(home, keyring).connect() as con:
        try:
            result = release(con, agreement_id, home=home, registry=ContractRegistry(), keyring=keyring)
        except (ReleaseRefused, LinkageRefused) as exc:
            _fail(f"refused: {exc}")
    if result.status != "released":
        click.echo(result.reason)
        return
    click.echo(
        f"{result.release_id}: {result.records_released} records in {len(result.files)} file(s), "
        f"{result.records_withheld} withheld for objections -> {result.directory}"
    )


# --- audit ------------------------------------------------------------------------------


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit trail (CoP 12, 23d)."""


@audit_group.command("verify")
@click.option("--no-record", is_flag=True, help="Do not record a failure in the breach register.")
def audit_verify(no_record: bool) -> None:
    """Verify the hash chain and its anchor; exit 1 naming the first bad entry if it fails."""
    from safehaven.core import audit
    from safehaven.core import registers as reg
    from safehaven.core.store import Store

    home = _home()
    if not home.store_file.exists():
        click.echo("no store yet: nothing to verify")
        return
    with Store(home).connect(read_only=True) as con:
        result = audit.verify(con, home)
    if result.ok:
        click.echo(result.reason)
        return
    where = f"first bad entry: seq {result.first_bad_seq}" if result.first_bad_seq is not None else "the anchor"
    click.echo(f"AUDIT TRAIL FAILED VERIFICATION ({where})\n{result.reason}", err=True)
    if not no_record:
        with Store(home).connect() as con:
            breach = reg.record_breach(
                con,
                kind="integrity_failure",
                severity=2,
                what=f"the audit trail failed verification ({where}): {result.reason}",
                remedial_action="restore the audit log and its anchor from backup, investigate who changed it, "
                "report to the SIRO and the board",
                detail={"first_bad_seq": result.first_bad_seq},
            )
            reg.export(con, home)
        click.echo(f"recorded as breach {breach} (severity 2)", err=True)
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
    for e in entries:
        click.echo(
            f"#{e.seq} {e.at.isoformat(timespec='seconds')} {e.actor} ({e.role}) {e.action} {e.object} "
            f"[{e.outcome}]" + (f" agreement={e.agreement}" if e.agreement else "")
        )


@audit_group.command("anchor")
@click.confirmation_option(prompt="Re-anchor the audit head at the last entry? Review unanchored entries first.")
def audit_anchor() -> None:
    """Re-anchor the head after a person has reviewed entries written after the last anchor."""
    from safehaven.core import audit
    from safehaven.core.store import Store

    home = _home()
    with Store(home).connect() as con:
        try:
            seq = audit.anchor(con, home)
        except ValueError as exc:
            _fail(str(exc))
    click.echo(f"anchored the audit head at entry {seq}")


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
    keyring = _require_governance_key(home, "subject access")
    number = sys.stdin.readline().strip() if nhs_number == ("-",) else "".join(nhs_number)
    if not home.store_file.exists():
        _fail("no store yet: the haven holds nothing", 2)
    with Store(home, keyring).connect() as con:
        try:
            report = subject_access(con, number, home=home, keyring=keyring)
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
    main.add_command(audit_group)
    main.add_command(subject_access_command)
    main.add_command(registers_command)
