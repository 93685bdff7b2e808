"""Where the haven keeps its files: one directory, named by the edge (default ``data/``).

Layout (one place for it, so every module agrees):

* ``incoming/<collection>/``   drops as received (CSV or Parquet), identifiable
* ``quarantine/<collection>/`` rejected files, each with ``<file>.reason.json``
* ``store/haven.duckdb``       the encrypted store (zones landing, haven, release, ...)
* ``keys/``                    key files, mode 0600 (see ``safehaven.core.keys``)
* ``published/``               anonymised outputs: CSV, Parquet and ``published.duckdb``
* ``releases/<agreement>/``    per-agreement extracts with manifests
* ``registers/``               data release and breach registers (CSV and Parquet)
* ``staging/``                 files being prepared (a publication, rotation crosswalks), never
  read by anyone; on the same file system, so they are renamed into place
* ``evidence/published-<when>/`` 0700: what a publication found altered or planted in
  ``published/``, kept for the governance lead (``safehaven.publish.integrity``)

The landing and haven zones live only inside the encrypted store: the haven is a secure
environment distinct from other activity (CoP 27h).

One place lies outside the tree on purpose: the optional **write-once audit anchor target**
(``audit_worm``, see ``safehaven.core.anchors``), on storage that someone who can rewrite the
whole home still cannot change (CoP 12, 23d). It is configuration the edge passes in (the
``SafeHavenResource`` field ``audit_worm_dir``, or ``$SAFEHAVEN_AUDIT_WORM`` read by the CLI),
never read from the environment here. The home itself is passed in the same way: the CLI reads
``$SAFEHAVEN_HOME`` (``safehaven.cli.common.home_from_env``) and the Dagster resource takes its
``home`` field, else the same variable (``resources.haven.SafeHavenResource.home_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = Path("data")
#: The analysts' database in ``published/`` and the manifest of the release it belongs to (each
#: published file's SHA-256), one name each for the publication and every reader of it.
PUBLISHED_DB = "published.duckdb"
PUBLISHED_MANIFEST = "release.json"


class HomeError(Exception):
    """A folder of the home's layout cannot be made: something else stands at its path."""


def _folder(path: Path, mode: int | None = None) -> None:
    """Make one folder of the layout (``mode``: its permissions). A file, or a link to a folder that
    is not there, at its path is refused in words a person can act on, not with the OS error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        what = "a symbolic link to a folder that is not there" if path.is_symlink() else "not a folder"
        raise HomeError(
            f"{path} is {what}: the haven keeps a folder there. Make it a folder (or point the link at one), "
            "then run again"
        ) from None
    if mode is not None:
        path.chmod(mode)


@dataclass(frozen=True)
class Home:
    """The directory tree of one safe haven."""

    root: Path
    #: the external write-once anchor directory (``safehaven.core.anchors``); None: no such target
    audit_worm: Path | None = None
    #: DuckDB's memory limit for the store (``"4GB"``; ``safehaven.core.store.default_memory_limit``
    #: when None), passed in by the edge like ``audit_worm``
    memory_limit: str | None = None

    @property
    def incoming(self) -> Path:
        return self.root / "incoming"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def store_file(self) -> Path:
        return self.store_dir / "haven.duckdb"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def published(self) -> Path:
        return self.root / "published"

    @property
    def published_db(self) -> Path:
        return self.published / PUBLISHED_DB

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    @property
    def registers(self) -> Path:
        return self.root / "registers"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    def staged_release(self, release_id: str) -> Path:
        """``staging/releases/<release-id>/``: where a release request's files wait for review."""
        return self.staging / "releases" / release_id

    @property
    def evidence(self) -> Path:
        return self.root / "evidence"

    def ensure(self) -> Home:
        """Create the tree. Directories that can hold confidential data are 0700."""
        for path in (self.incoming, self.quarantine, self.store_dir, self.keys, self.releases, self.staging):
            _folder(path, 0o700)
        for path in (self.published, self.registers):
            _folder(path)
        return self

    def incoming_for(self, collection: str) -> Path:
        return self.incoming / collection

    def quarantine_for(self, collection: str) -> Path:
        return self.quarantine / collection
