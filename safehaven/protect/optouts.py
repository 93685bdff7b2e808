"""The national data opt-out applied to what leaves the haven, and the notices to recipients.

This is the API the releases stage calls. Rules and sources:

* **Who is withheld.** A person with a national data opt-out (which replaced the type 2
  objection) in force on the release date: "if you object, this type of information will not
  leave the Health and Social Care Information Centre" (rules-for-sharing page; guide Rule 4B,
  second bullet; CoP 13). Type 1 objections are about data *leaving the GP practice*: GP
  records about type 1 objectors never enter the haven (``safehaven.protect.haven`` drops them on
  arrival), and a release whose relation holds GP-sourced records passes ``gp_sourced=True``
  so that GP records received *before* a type 1 objection was registered do not leave either.
  Type 1 does not reach a patient's hospital or social care records (rules-for-sharing page:
  "information from other places where you receive care ... is collected nationally").
* **When the opt-out applies** (``decide``): to *identifiable* and *pseudonymised* flows
  only. It does not apply to
  - ``anonymised`` outputs: the opt-out covers confidential information only (guide Rule 4C:
    "where an objection to the sharing of confidential information is implemented,
    anonymised information can be shared"), so aggregates include everyone by default; an
    output may still choose to exclude objectors (``by_choice=True``);
  - the legal bases in ``EXEMPT_BASES`` (``safehaven.core.legal_basis``): ``consent`` (the
    patient "has clearly said that we can do it", rules-for-sharing first rule: a specific consent is the later and more
    specific expression of the patient's wishes), ``statutory`` (disclosure required by law
    or a court order: CoP 13 honours objections to uses "only permitted but not required by
    law"; guide Rule 4D "must be overruled") and ``copi_reg3`` (COPI regulation 3,
    communicable disease and public health emergencies: rules-for-sharing "where we have to
    do it by law (for example, in a public health emergency like an epidemic)"; the CoP's
    preamble to 11-14 names preventing the spread of notifiable disease).
  ``section_251`` (COPI regulation 5 / CAG support) and ``public_interest`` *permit* but do
  not *require* disclosure, so the opt-out applies to them (CoP 13). A flow of identifiable or
  pseudonymised data under the ``anonymised`` basis has no legal basis at all and is refused
  (``docs/rules.md`` "No basis, no flow").
* **Every decision is recorded** with its legal basis and reason, and with the number of
  records withheld, or the number of objectors' records included where the objection was
  overruled (NHS Constitution, quoted before CoP 11: patients are "told the reasons including
  the legal basis"; CoP 14b iii: "the number of records which have not been shared").
* **Notices** (CoP 14b): each recipient is told which records released to it earlier are now
  about a person who objects (14b i), which objections about released records were withdrawn
  (14b ii), and how many records were withheld from the latest release (14b iii). Keyed by
  that recipient's own pseudonyms (its agreement's pseudonym domain, never haven pids or NHS
  numbers). "Since" is judged on the register *as it was known* at the previous notice or
  release, so an objection registered late is still notified, once.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field, replace
from datetime import date, datetime
from pathlib import Path
from typing import get_args

import duckdb

from safehaven.core import registers, schema
from safehaven.core.days import haven_today
from safehaven.core.files import replace_whole
from safehaven.core.home import Home
from safehaven.core.keys import check_agreement_id
from safehaven.core.legal_basis import EXEMPT_BASES, LEGAL_BASES, OPT_OUT_EXEMPT
from safehaven.core.registers import RELEASE_MEMBERS, current_actor
from safehaven.core.sql import q
from safehaven.protect.objections import NATIONAL_OPT_OUT, TYPE1, objectors_sql
from safehaven.protect.pseudonymise import hmac_sql
from safehaven.share.agreements import Level

#: Every identifiability level (``safehaven.share.agreements.Level``).
IDENTIFIABILITY: tuple[str, ...] = get_args(Level)

DECISIONS = schema.OPTOUT_DECISIONS
#: Alias of ``safehaven.core.registers.RELEASE_MEMBERS`` (the haven pids of everyone released).
MEMBERS = RELEASE_MEMBERS
NOTICES = schema.OPTOUT_NOTICES


@dataclass(frozen=True)
class OptOutDecision:
    """Whether the opt-out applies to one flow, under which legal basis, and why."""

    applied: bool
    legal_basis: str
    reason: str
    identifiability: str = ""
    #: records of objectors included because the objection does not apply (set by apply_optouts)
    overruled: int = 0


def decide(legal_basis: str, identifiability: str, *, by_choice: bool = False) -> OptOutDecision:
    """Decide whether the national data opt-out applies to a flow (rules in the module docstring).

    ``by_choice``: an anonymised output that chooses to exclude objectors anyway.
    Raises ``ValueError`` for an unknown basis or identifiability, and for identifiable or
    pseudonymised data under the ``anonymised`` basis (no basis, no flow).
    """
    if legal_basis not in LEGAL_BASES:
        raise ValueError(f"unknown legal basis {legal_basis!r}; expected one of {sorted(LEGAL_BASES)}")
    if identifiability not in IDENTIFIABILITY:
        raise ValueError(f"unknown identifiability {identifiability!r}; expected one of {IDENTIFIABILITY}")
    if identifiability == "anonymised":
        if by_choice:
            return OptOutDecision(
                True, legal_basis, "anonymised output excluding objectors by its own choice", identifiability
            )
        return OptOutDecision(
            False,
            legal_basis,
            "anonymised: the opt-out covers confidential information only (guide Rule 4C)",
            identifiability,
        )
    if legal_basis == "anonymised":
        raise ValueError(f"{identifiability} data cannot leave under the 'anonymised' basis: no legal basis, no flow")
    if legal_basis in EXEMPT_BASES:
        return OptOutDecision(False, legal_basis, f"opt-out overruled: {OPT_OUT_EXEMPT[legal_basis]}", identifiability)
    return OptOutDecision(
        True,
        legal_basis,
        f"{identifiability} data under {legal_basis}: permitted, not required, by law, so the national "
        "data opt-out is honoured (CoP 13, 14b)",
        identifiability,
    )


def objector_types(gp_sourced: bool) -> tuple[str, ...]:
    """The objection types that withhold a record: national opt-out, plus type 1 for GP data."""
    return (NATIONAL_OPT_OUT, TYPE1) if gp_sourced else (NATIONAL_OPT_OUT,)


def apply_optouts(
    con: duckdb.DuckDBPyConnection,
    relation_sql: str,
    pid_col: str,
    legal_basis: str,
    identifiability: str,
    as_of: str | date | None = None,
    *,
    gp_sourced: bool = False,
    by_choice: bool = False,
) -> tuple[str, int, OptOutDecision]:
    """Remove objectors from a relation when the opt-out applies.

    Returns ``(sql, withheld, decision)``: the SQL of ``relation_sql`` without the records of
    people objecting on ``as_of`` (unchanged when the decision does not apply), the number of
    records withheld, and the decision (its ``overruled`` counts objectors' records kept when
    it does not apply). ``as_of`` defaults to the haven's (UK) day (``safehaven.core.days``).
    ``pid_col`` is the haven pseudonym column. Everything runs in DuckDB;
    the returned SQL reads the register, so run it on the same connection.
    """
    decision = decide(legal_basis, identifiability, by_choice=by_choice)
    objectors = objectors_sql(as_of, objector_types(gp_sourced))
    col = q(pid_col)
    hit = f"EXISTS (SELECT 1 FROM ({objectors}) o WHERE o.pid = r.{col})"
    affected = con.execute(f"SELECT count(*) FROM ({relation_sql}) r WHERE {hit}").fetchone()[0]
    if not decision.applied:
        return f"SELECT * FROM ({relation_sql}) r", 0, replace(decision, overruled=int(affected))
    return f"SELECT r.* FROM ({relation_sql}) r WHERE NOT {hit}", int(affected), decision


def ensure_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the decision log and the notice log, and the registers' tables they read
    (``release_members``, written by releases; ``safehaven.core.registers.ensure_tables``)."""
    schema.ensure(con, *registers.TABLES, DECISIONS, NOTICES)


def record_decision(
    con: duckdb.DuckDBPyConnection, *, release_id: str, agreement_id: str, decision: OptOutDecision, withheld: int
) -> None:
    """Record one release's opt-out decision with its legal basis, reason and counts."""
    ensure_tables(con)
    con.execute(
        f"INSERT INTO {DECISIONS} VALUES (?, ?, ?, ?, ?, ?, ?, ?, now())",
        [
            release_id,
            agreement_id,
            decision.legal_basis,
            decision.identifiability,
            decision.applied,
            decision.reason,
            int(withheld),
            int(decision.overruled),
        ],
    )


@dataclass
class NoticeReport:
    """What one recipient is told (CoP 14b); pseudonyms are in the recipient's own domain."""

    agreement_id: str
    as_of: str
    since: str | None
    release_id: str | None
    objected: list[str] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)
    withheld: int = 0
    opt_out_applied: bool | None = None
    csv_path: Path | None = None
    json_path: Path | None = None

    def summary(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("objected"), d.pop("withdrawn")
        d.update(
            objected=len(self.objected),
            withdrawn=len(self.withdrawn),
            csv_path=str(self.csv_path) if self.csv_path else None,
            json_path=str(self.json_path) if self.json_path else None,
        )
        return d


def _since(con: duckdb.DuckDBPyConnection, agreement_id: str, since_release_id: str | None) -> datetime | None:
    if since_release_id is not None:
        row = con.execute(
            f"SELECT min(released_at) FROM {RELEASE_MEMBERS} WHERE agreement_id = ? AND release_id = ?",
            [agreement_id, since_release_id],
        ).fetchone()
        if row is None or row[0] is None:
            raise ValueError(f"release {since_release_id!r} of agreement {agreement_id!r} has no recorded members")
        return row[0]
    row = con.execute(f"SELECT max(issued_at) FROM {NOTICES} WHERE agreement_id = ?", [agreement_id]).fetchone()
    return row[0] if row else None


def notices(
    con: duckdb.DuckDBPyConnection,
    *,
    agreement_id: str,
    recipient_key_name: str,
    since_release_id: str | None = None,
    home: Home | None = None,
    gp_sourced: bool = False,
    write: bool = True,
) -> NoticeReport:
    """The CoP 14b notice for one recipient, written to ``releases/<agreement>/notices/<date>.csv|json``.

    ``recipient_key_name`` names the agreement's pseudonym key installed on ``con``
    (``safehaven.protect.pseudonymise.release_key_name`` / ``install_agreement_key``). The window
    starts at ``since_release_id``'s release time, else at this agreement's previous notice,
    else at the beginning. A *released record* is any pid in ``governance.release_members``
    for the agreement.

    * objected: released people objecting now who were not objecting at the window start as
      the register then stood;
    * withdrawn: released people objecting at the window start (as the register then stood)
      who no longer object;
    * withheld: the records withheld from the agreement's latest release (its recorded decision).
    """
    ensure_tables(con)
    since = _since(con, agreement_id, since_release_id)
    types = objector_types(gp_sourced)
    today = haven_today()  # the haven's (UK) day, for the objectors now and the notice's date alike
    now_set = objectors_sql(today, types)
    if since is None:
        then_set = "SELECT NULL::VARCHAR AS pid WHERE false"
    else:
        then_set = objectors_sql(since.date(), types, known_at=since)
    pseudo = hmac_sql("m.pid", recipient_key_name)
    rows = con.execute(
        f"""
        WITH m AS (SELECT DISTINCT pid FROM {RELEASE_MEMBERS} WHERE agreement_id = ? AND released_at <= now()),
        nw AS ({now_set}), th AS ({then_set})
        SELECT {pseudo} AS pseudonym,
               CASE WHEN m.pid IN (SELECT pid FROM nw) THEN 'objected' ELSE 'withdrawn' END AS change
        FROM m
        WHERE (m.pid IN (SELECT pid FROM nw)) <> (m.pid IN (SELECT pid FROM th))
        ORDER BY change, pseudonym
        """,
        [agreement_id],
    ).fetchall()
    latest = con.execute(
        f"SELECT release_id, withheld, applied FROM {DECISIONS} WHERE agreement_id = ? "
        "ORDER BY decided_at DESC LIMIT 1",
        [agreement_id],
    ).fetchone()
    report = NoticeReport(
        agreement_id=agreement_id,
        as_of=today.isoformat(),
        since=since.isoformat() if since else None,
        release_id=latest[0] if latest else None,
        objected=[p for p, c in rows if c == "objected"],
        withdrawn=[p for p, c in rows if c == "withdrawn"],
        withheld=int(latest[1]) if latest else 0,
        opt_out_applied=bool(latest[2]) if latest else None,
    )
    if write:
        _write(con, report, home, rows)
    return report


def _write(con: duckdb.DuckDBPyConnection, report: NoticeReport, home: Home | None, rows: list) -> None:
    from safehaven.core import audit

    home = home or audit.home_of(con)
    folder = home.releases / check_agreement_id(report.agreement_id) / "notices"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    stem, n = report.as_of, 1
    while (folder / f"{stem}.csv").exists():
        n += 1
        stem = f"{report.as_of}-{n}"
    report.csv_path, report.json_path = folder / f"{stem}.csv", folder / f"{stem}.json"
    fd = os.open(report.csv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["pseudonym", "change"])
        writer.writerows(rows)
    summary = report.summary()
    summary["rules"] = "CoP 14b: i objected, ii withdrawn, iii records withheld from the latest release"
    replace_whole(report.json_path, json.dumps(summary, indent=2, sort_keys=True))
    con.execute(
        f"INSERT INTO {NOTICES} VALUES (?, now(), ?, ?, ?, ?, ?, ?)",
        [
            report.agreement_id,
            report.since,
            report.release_id,
            len(report.objected),
            len(report.withdrawn),
            report.withheld,
            str(report.csv_path),
        ],
    )
    audit.append(
        con,
        actor=current_actor(),
        role="pipeline",
        action="optout.notice",
        object=f"agreement:{report.agreement_id}",
        agreement=report.agreement_id,
        detail={
            "objected": len(report.objected),
            "withdrawn": len(report.withdrawn),
            "withheld": report.withheld,
            "release_id": report.release_id,
            "file": report.csv_path.name,
        },
        home=home,
    )


__all__ = [
    "DECISIONS",
    "EXEMPT_BASES",
    "LEGAL_BASES",
    "MEMBERS",
    "NoticeReport",
    "OptOutDecision",
    "apply_optouts",
    "decide",
    "notices",
    "record_decision",
]
