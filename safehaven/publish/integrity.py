"""What sits in ``published/`` is what the store records: an altered or a planted file is an incident.

Rules (CoP 23d, 35; Govt response to the Caldicott review, recs. 5-6; ``docs/rules.md``
"Publication"). Every publication, before anything else touches ``published/``
(``safehaven.publish.publication.publish_release``, after the audit trail is verified):

* **The store's record is the reference**, not ``release.json`` (which anyone with file access
  can edit): the files of the last recorded publication and of any a crash left pending, each
  with its SHA-256 (``safehaven.publish.reuse``), and each output's last recorded Parquet. With
  neither a publication nor a pending one recorded, nothing in ``published/`` is the haven's:
  every entry is judged planted, a ``release.json`` there included (a publication is recorded as
  pending before its first file moves, so a crash never leaves files the store does not know).
  A record whose files the store no longer holds as a mapping (edited in the store) judges
  nothing: the release audit refuses on it, naming the manifest.
* **Altered**: a file the record names whose bytes have none of the SHA-256s recorded for its
  name (the database, a CSV, a Parquet, a dictionary, a quality statement, the methods, the
  licence, the manifest). Analysts may have been served figures the haven never published
  (suppressed cells rewritten as small counts). It is recorded (an audit entry and a breach
  register entry, ``published_altered``, severity 2) and kept as evidence. An altered file of
  the last or a pending publication is copied, and recorded once per name, SHA-256 and release
  while it stays in place (the same bytes found again after a later publication replaced it are
  a new incident). The file itself is left to the publication: the release audit judges the
  manifest and each previous Parquet in place and refuses, naming the file and how to restore
  it, as before (``safehaven.publish.release_audit``); otherwise the new publication replaces
  every altered file with the haven's own. **Publishing goes on** because a fresh, correct
  publication is the safe action for readers: refusing would leave the altered figures in
  front of them until a person acted, while the evidence, the audit entry and the breach
  record are already kept (and ``safehaven query`` refuses an altered ``published.duckdb``
  meanwhile: ``safehaven.publish.query.check_release``). An altered file only an earlier
  publication names (the Parquet of an output later left out) is one no publication would
  replace: it is moved out like a planted one, and recorded each time it is found; should the
  output return, the release audit asks for that release's file back.
* **Planted**: any entry in ``published/`` the record does not name (a file, a folder, a link, a
  hidden name, a ``published.duckdb.wal``), and anything but a plain file where the record names
  a file. No name is a pass: publications stage outside ``published/`` (``staging/publish-*``),
  so a ``.staging-*`` entry there (a file, a link or a folder, whatever an older layout once
  made) is judged as any other. It is moved out of ``published/`` into the evidence folder, never
  left for analysts, and recorded (``published_planted``, severity 2: the haven cannot tell what
  it held, e.g. a list of NHS numbers, nor who read it).
* **Evidence** is kept, never deleted: ``evidence/published-<UTC time>-<random>/files/`` in the
  home (0700), each entry under its own name, with :data:`EVIDENCE_LIST` listing them (shown
  name, kind, SHA-256, release, whether it was moved out or copied, breach id). The governance
  lead decides what becomes of it.
* A planted name may carry an identifier: names are recorded and shown as received files' are
  (``safehaven.core.audit.shown_name``), and composed text is scrubbed (``audit.scrub``).
* Each finding is one line for the run's log (what was found, where the evidence is, the breach
  id, what happens next), returned to the caller: the publish asset logs them, and a refused
  publication carries them in its refusal.
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from safehaven.core import audit, registers
from safehaven.core.files import regular, sha256_plain
from safehaven.core.home import Home
from safehaven.core.store import table_exists
from safehaven.publish import reuse

__all__ = ["ALTERED", "PLANTED", "Finding", "findings", "set_aside"]

#: Breach kinds and audit actions (``safehaven.core.registers.KINDS``).
ALTERED = "published_altered"
PLANTED = "published_planted"
#: An output's Parquet of an earlier publication is the haven's own: the release audit asks for the
#: last one of an output left out of a publication to be put back (``release_audit._last_with``).
RESTORABLE = ".parquet"
#: The list of what an evidence folder holds, beside its ``files/``.
EVIDENCE_LIST = "set_aside.json"
PURPOSE = "integrity of the open publication (CoP 23d, 35)"


@dataclass(frozen=True)
class Finding:
    """One entry of ``published/`` that is not as the store records it (its raw name stays on disk)."""

    name: str
    kind: str  # ALTERED or PLANTED
    sha256: str | None  # None: not a plain file
    release_id: str | None  # the publication the record names it in (None: planted)
    #: moved out of ``published/`` (planted, or altered where no publication will rewrite it)
    moved: bool = True

    @property
    def shown(self) -> str:
        return f"published/{audit.shown_name(self.name)}"


# --- what the store records --------------------------------------------------------------------


#: name -> (the SHA-256s it may have, the release the record names it in, whether the next
#: publication rewrites or removes it: named by the last or a pending publication)
Known = dict[str, tuple[set[str], str, bool]]


def recorded(con: duckdb.DuckDBPyConnection) -> Known | None:
    """The files that may be in ``published/`` (module docstring): the last recorded publication's
    and the pending ones', and each output's last recorded Parquet
    (:data:`RESTORABLE`); None: a record whose files the store no longer holds as a mapping, which
    judges nothing. With neither a publication nor a pending one recorded, nothing is known, so every
    entry is judged planted: a ``release.json`` in ``published/`` is never the record, since anyone
    with file access can write one (a publication is recorded as pending before its first file
    moves: ``reuse.record_pending``)."""
    records = reuse.publications(con)
    if records and not records[0].files:
        return None
    known: Known = {}
    for publication in [*records[:1], *reuse.pending_publications(con)]:
        for name, sha in publication.files.items():
            known.setdefault(name, (set(), publication.release_id, True))[0].add(sha)
    for publication in records[1:]:  # newest first: the last publication of each output
        for name, sha in publication.files.items():
            if name.endswith(RESTORABLE) and name not in known:
                known[name] = ({sha}, publication.release_id, False)
    return known


# --- what is in published/ ---------------------------------------------------------------------


def _plain_sha(path: Path) -> str | None:
    """The SHA-256 of a regular file, opened without following a link (``core.files.open_plain``;
    a hard link is allowed: a backup's hard-linked snapshot of ``published/`` alters nothing), else
    None (a link, folder, pipe or device)."""
    try:
        return sha256_plain(path, regular)
    except OSError:
        return None


def _judge(path: Path, known: Known) -> Finding | None:
    """Whether the entry at ``path`` is as a recorded publication wrote it, or what it is."""
    found = _plain_sha(path)
    accepted, release_id, rewritten = known.get(path.name, (set(), None, False))
    if found is not None and found in accepted:
        return None
    if release_id is not None and found is not None:
        return Finding(path.name, ALTERED, found, release_id, moved=not rewritten)
    return Finding(path.name, PLANTED, found, None)


def findings(con: duckdb.DuckDBPyConnection, folder: Path) -> list[Finding]:
    """Every entry of ``folder`` that is not as the store records it, in name order; a name is no
    pass (a ``.staging-*`` entry is judged as any other: no publication stages in ``published/``)."""
    known = recorded(con)
    if known is None or not folder.is_dir():
        return []
    entries = sorted(folder.iterdir())
    return [f for f in (_judge(p, known) for p in entries) if f is not None]


def _recorded_before(con: duckdb.DuckDBPyConnection, finding: Finding) -> bool:
    """Whether this altered file, left in place, is already on the audit trail with the same SHA-256
    against the same release: it stays in place while the release audit refuses, and is recorded
    once, not on every run. Only since the publication that wrote it: the same bytes found again
    after a later publication replaced the file are a new alteration, and recorded again."""
    if finding.moved or not table_exists(con, *audit.TABLE.split(".")):
        return False
    row = con.execute(
        f"SELECT count(*) FROM {audit.TABLE} WHERE action = ? AND object = ? "
        "AND json_extract_string(detail, '$.sha256') = ? AND json_extract_string(detail, '$.release_id') = ?",
        [ALTERED, finding.shown, finding.sha256, finding.release_id],
    ).fetchone()
    return bool(row and row[0])


# --- evidence and records ----------------------------------------------------------------------


def _evidence_folder(home: Home) -> Path:
    """A new, dated evidence folder in the home (0700), with its ``files/``."""
    home.evidence.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder = home.evidence / f"published-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    (folder / "files").mkdir(mode=0o700, parents=True)
    folder.chmod(0o700)
    return folder


def _keep(source: Path, finding: Finding, evidence: Path) -> None:
    """Keep ``source`` as evidence: a planted entry, or an altered file no publication will rewrite, is
    moved out of ``published/``; any other altered file is copied, and left to the publication
    (module docstring)."""
    target = evidence / "files" / finding.name
    if finding.moved:
        shutil.move(source, target)  # a rename; a copy and removal if published/ is another volume
    else:
        shutil.copy2(source, target, follow_symlinks=False)


def _fate(finding: Finding) -> str:
    """What becomes of an altered file: replaced by the next publication when it rewrites the name,
    else moved out (its output was left out of the last publication: nothing would ever replace it)."""
    if not finding.moved:
        return "a copy is kept as evidence; the next publication replaces the file with the haven's own"
    return (
        "moved out of published/ into the evidence folder (no publication rewrites it: its output was left "
        "out); should the output return, the release audit asks for that release's file to be put back"
    )


def _what(finding: Finding) -> tuple[str, str]:
    """What happened and the remedial action, for the breach register (no value, no raw name)."""
    if finding.kind == ALTERED:
        return (
            f"{finding.shown} of release {finding.release_id} was altered after it was published (its SHA-256 "
            "is not the one the store records): analysts may have been served figures the haven did not publish",
            f"{_fate(finding)}; the governance lead establishes who changed it and tells the analysts who may "
            "have used it",
        )
    return (
        f"{finding.shown}, which no publication the store records names, was found in published/, where "
        "analysts may have read it",
        "moved out of published/ into the evidence folder, nothing deleted; the governance lead assesses what "
        "it held and who may have read it, and withdraws write access to published/ from whoever put it there",
    )


def _record(con: duckdb.DuckDBPyConnection, finding: Finding, evidence: str, actor: str) -> int:
    """The breach register entry and the audit entry of one finding; returns the breach id."""
    what, remedial = _what(finding)
    detail = {"file": finding.shown, "sha256": finding.sha256, "release_id": finding.release_id, "evidence": evidence}
    breach_id = registers.record_breach(
        con, kind=finding.kind, severity=None, what=audit.scrub(what), remedial_action=remedial, detail=detail
    )
    audit.append(
        con,
        actor=actor,
        role="pipeline",
        action=finding.kind,
        object=finding.shown,
        purpose=PURPOSE,
        outcome="set_aside",
        detail={**detail, "breach_id": breach_id},
    )
    return breach_id


def _log_line(finding: Finding, evidence: str, breach_id: int) -> str:
    """One line for the run's log: what was found, where the evidence is, what happens next."""
    if finding.kind == ALTERED:
        return (
            f"{finding.shown} was altered after release {finding.release_id} published it (its SHA-256 is not the "
            f"recorded one): incident recorded (breach {breach_id}), evidence in {evidence}/: {_fate(finding)}"
        )
    return (
        f"{finding.shown} is no file of any publication the store records: moved out of published/ to "
        f"{evidence}/ and an incident recorded (breach {breach_id}); the governance lead assesses what it held"
    )


def set_aside(con: duckdb.DuckDBPyConnection, home: Home, *, actor: str = "safehaven") -> list[str]:
    """Find what in ``published/`` is not as the store records it, keep it as evidence and record
    each new finding (module docstring); returns one line per finding for the run's log."""
    found = [f for f in findings(con, home.published) if not _recorded_before(con, f)]
    if not found:
        return []
    folder = _evidence_folder(home)
    evidence = str(folder.relative_to(home.root))
    listed, lines = [], []
    for finding in found:  # recorded first: a crash before the move records it again, never loses it
        breach_id = _record(con, finding, evidence, actor)
        _keep(home.published / finding.name, finding, folder)
        listed.append(
            {
                "name": finding.shown,
                "kind": finding.kind,
                "sha256": finding.sha256,
                "release_id": finding.release_id,
                "moved": finding.moved,
                "breach_id": breach_id,
            }
        )
        lines.append(audit.scrub(_log_line(finding, evidence, breach_id)))
    (folder / EVIDENCE_LIST).write_text(json.dumps({"found_at": datetime.now(UTC).isoformat(), "entries": listed}))
    return lines
