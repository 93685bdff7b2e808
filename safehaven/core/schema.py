"""Every fixed table of the store, declared once: its name, its columns, what it holds and why.

Rule (issue 13; ``docs/architecture.md`` "The rooms"): a table whose columns are known in code is
declared here and nowhere else. Each declaration gives the qualified name (``<zone>.<table>``,
a zone of ``safehaven.core.store.ZONES``) as a constant, its DDL, and one line saying what it
holds and the rule it serves (the rule the owning module's docstring states in full). The
owning module imports the constant (and re-exports it under its old name) and calls
:func:`ensure` before it reads or writes the table.

* :func:`ensure` creates the named tables that are missing, with the views that belong with
  them and the tables those views read, in declaration (dependency) order. When all exist it
  costs a lookup in the catalog per table for up to :data:`LOOKED_UP_AT_MOST` tables
  (``safehaven.core.store.table_columns``), else one catalog query, so a module may call it at
  every unit of work. Migrations of older stores (a column added since the first version)
  live with the table they migrate and run only when a column is missing; a view over a
  migrated table is made again, so it shows the new columns.
* :func:`recreate` replaces a table that is rewritten whole each time (the objection-rate
  monitor, the store's code lists): ``CREATE OR REPLACE``, so no deleted row's bytes are kept
  by the table itself.
* :func:`create_published_file_tables` makes the two fixed tables of the analysts' published
  file (``published.duckdb``, not the store): its dictionary and its quality statements.

Made elsewhere, by shape from data (their columns come from a contract, an output's SELECT or
the rows being copied, so they cannot be declared here):

* ``landing.<collection>``: ``safehaven.intake.ingest.ensure_tables`` (the contract's fields, all text);
* ``landing.<collection>_valid`` and ``landing.<collection>_rejected``:
  ``safehaven.intake.validation.ensure_tables_validated`` (the contract's typed fields; the rule
  ids a rejected row broke);
* ``haven.<collection>``: ``safehaven.protect.haven.build_haven`` (the contract's pseudonymised
  projection, ``CREATE TABLE ... AS``);
* ``release.<agreement>__<collection>``: ``safehaven.share.releases`` (an anonymised agreement's
  protected counts, ``CREATE OR REPLACE TABLE ... AS SELECT``; a record-level extract is never
  kept in the store: it is exported from a temporary relation, ``releases._extract``);
* ``published.<output>``: ``safehaven.publish.outputs`` and ``safehaven.publish.disclosure.tables``
  (an output's protected cells, ``CREATE OR REPLACE TABLE ... AS``);
* ``counts.<output>``: ``safehaven.publish.counting`` (an output's true counts per month, the
  columns of its SELECT);
* the published file's output tables: ``safehaven.publish.publication`` (copies of
  ``published.<output>``);
* the rebuilt store: ``safehaven.core.store.Store.rebuild`` (``COPY FROM DATABASE``: every table
  as it stands);
* connection-local work tables (``CREATE TEMP TABLE``), in the module that uses them.

``tests/unit/test_schema.py`` keeps the rule true: no other module states a column list for a
``CREATE TABLE``, or a ``CREATE TABLE IF NOT EXISTS``, except for a name built from data.

This module imports no Dagster and nothing from the stage packages (only ``duckdb`` and, for the
catalog lookup, ``safehaven.core.store``, which imports nothing of this module), so every room
may import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import duckdb

from safehaven.core.store import table_columns

_IF_NOT_EXISTS = "CREATE TABLE IF NOT EXISTS "


@dataclass(frozen=True)
class Table:
    """One declared table (or view) of the store."""

    name: str
    #: ``CREATE TABLE IF NOT EXISTS ...`` (a view: ``CREATE OR REPLACE VIEW ...``)
    ddl: str
    #: what it holds and the rule it serves, in one line
    doc: str
    #: columns added since the table's first version, as ``<name> <type>`` (added to older stores)
    added: tuple[str, ...] = ()
    #: a view: the tables it reads
    needs: tuple[str, ...] = ()
    #: a view: the table it belongs with (ensuring that table ensures the view)
    owner: str | None = None

    @property
    def is_view(self) -> bool:
        return self.owner is not None


#: Every declared table and view, in dependency order (a view after the tables it reads).
TABLES: dict[str, Table] = {}


def _declare(name: str, columns: str, doc: str, *, added: tuple[str, ...] = ()) -> str:
    TABLES[name] = Table(name, f"{_IF_NOT_EXISTS}{name} ({columns})", doc, added=added)
    return name


def _view(name: str, select: str, doc: str, *, owner: str, needs: tuple[str, ...]) -> str:
    TABLES[name] = Table(name, f"CREATE OR REPLACE VIEW {name} AS {select}", doc, needs=needs, owner=owner)
    return name


# --- core: audit, key epochs, registers ----------------------------------------------------

AUDIT_LOG = _declare(
    "governance.audit_log",
    'seq BIGINT PRIMARY KEY, "at" TIMESTAMPTZ NOT NULL, actor VARCHAR NOT NULL, role VARCHAR NOT NULL, '
    "action VARCHAR NOT NULL, object VARCHAR NOT NULL, purpose VARCHAR, legal_basis VARCHAR, agreement VARCHAR, "
    "outcome VARCHAR NOT NULL, detail JSON, prev_hash VARCHAR NOT NULL, entry_hash VARCHAR NOT NULL",
    "the audit trail, append-only and hash-chained: who did what, when, why (CoP 12, 23d; safehaven.core.audit)",
)
AUDIT_GENESIS = _declare(
    "governance.audit_genesis",
    "seq BIGINT PRIMARY KEY, entry_hash VARCHAR NOT NULL, key_id VARCHAR NOT NULL, recorded_at TIMESTAMPTZ NOT NULL",
    "the first audit entry's hash, so an emptied log is not innocent (CoP 23d; safehaven.core.audit)",
)
KEY_EPOCHS = _declare(
    "governance.key_epochs",
    "purpose VARCHAR, key_id VARCHAR, started_at TIMESTAMPTZ, retired_at TIMESTAMPTZ",
    "the key id each purpose's data is made with, so a swapped key file is refused (CoP 27b-c; safehaven.core.pins)",
)
RELEASE_REGISTER = _declare(
    "governance.release_register",
    "release_id VARCHAR PRIMARY KEY, agreement_id VARCHAR NOT NULL, agreement_version VARCHAR NOT NULL, "
    "agreement_sha256 VARCHAR NOT NULL, recipient VARCHAR NOT NULL, recipient_public_body BOOLEAN NOT NULL, "
    "purposes VARCHAR NOT NULL, legal_basis VARCHAR NOT NULL, legal_basis_reference VARCHAR, "
    "collections VARCHAR NOT NULL, identifiability VARCHAR NOT NULL, agreement_start DATE NOT NULL, "
    "agreement_end DATE NOT NULL, approved_by VARCHAR, approved_on DATE, released_at TIMESTAMPTZ NOT NULL, "
    "opt_outs_applied BOOLEAN NOT NULL, opt_outs_reason VARCHAR NOT NULL, files INTEGER NOT NULL, "
    "records_released BIGINT NOT NULL, people_released BIGINT, records_withheld_objections BIGINT NOT NULL, "
    "objector_records_included BIGINT NOT NULL, people_suppressed_k_anonymity BIGINT NOT NULL, "
    "manifest_sha256 VARCHAR NOT NULL, review_rule VARCHAR, reviewed_by VARCHAR, optout_list_date DATE",
    "the data release register: one row per release that left the haven (CoP 32-33; safehaven.core.registers)",
    added=("review_rule VARCHAR", "reviewed_by VARCHAR", "optout_list_date DATE"),
)
BREACH_REGISTER = _declare(
    "governance.breach_register",
    "breach_id BIGINT PRIMARY KEY, recorded_at TIMESTAMPTZ NOT NULL, kind VARCHAR NOT NULL, "
    "severity INTEGER NOT NULL, severity_label VARCHAR NOT NULL, what VARCHAR NOT NULL, "
    "remedial_action VARCHAR NOT NULL, detail JSON",
    "the breach register: what happened, how severe, the remedy (Govt response rec. 5-6; CoP 22, 42b)",
)
RELEASE_MEMBERS = _declare(
    "governance.release_members",
    "release_id VARCHAR, agreement_id VARCHAR, pid VARCHAR, released_at TIMESTAMPTZ",
    "who was in each record-level release, by haven pid, for the objection notices (CoP 14; safehaven.core.registers)",
)
RELEASE_AUDIT_HEADS = _declare(
    "governance.release_audit_heads",
    "release_id VARCHAR PRIMARY KEY, audit_head_seq BIGINT NOT NULL, audit_head_hash VARCHAR NOT NULL",
    "the audit head when each release was first exported, published with the register (CoP 23d; Govt response rec. 1)",
)
RELEASE_REGISTER_PUBLIC = _view(
    "governance.release_register_public",
    f"SELECT r.*, h.audit_head_seq, h.audit_head_hash FROM {RELEASE_REGISTER} r "
    f"LEFT JOIN {RELEASE_AUDIT_HEADS} h USING (release_id)",
    "the data release register as published: every release with its audit head (CoP 32-33, 23d)",
    owner=RELEASE_AUDIT_HEADS,
    needs=(RELEASE_REGISTER, RELEASE_AUDIT_HEADS),
)

# --- intake: batches, validation, quality measures -----------------------------------------

BATCHES = _declare(
    "governance.batches",
    "batch_id VARCHAR PRIMARY KEY, collection VARCHAR, file_name VARCHAR, sha256 VARCHAR, rows BIGINT, "
    "landed_at TIMESTAMPTZ, status VARCHAR, invalid_rows BIGINT, validated_at TIMESTAMPTZ, contract_version VARCHAR, "
    "drop_key VARCHAR, arrived_at TIMESTAMPTZ",
    "the batch register: each file landed whole, its hash, rows and verdict, the drop (the intake "
    "assets' partition) it came as and when it arrived in incoming/ (CoP 7-9; safehaven.intake.ingest)",
    # a batch landed before drops were partitions: NULL, in no drop, arrived when it landed
    added=("drop_key VARCHAR", "arrived_at TIMESTAMPTZ"),
)
BATCH_CONTENTS = _declare(
    "governance.batch_contents",
    "batch_id VARCHAR PRIMARY KEY, collection VARCHAR, rows BIGINT, digest VARCHAR",
    "each landed batch's records as a multiset digest, so a re-saved copy of a landed file (same "
    "records, other bytes) is known and not landed twice (safehaven.intake.ingest)",
)
VALIDATION_RESULTS = _declare(
    "governance.validation_results",
    "batch_id VARCHAR PRIMARY KEY, collection VARCHAR, contract_version VARCHAR, suite_name VARCHAR, "
    "gx_version VARCHAR, gx_success BOOLEAN, status VARCHAR, rows BIGINT, invalid_rows BIGINT, tolerance DOUBLE, "
    "gx_seconds DOUBLE, evaluated_at TIMESTAMPTZ, document JSON",
    "each batch's validation verdict and its GX document (CoP 7-9, 45-46; safehaven.intake.validation)",
)
VALIDATION_RULE_RESULTS = _declare(
    "governance.validation_rule_results",
    "batch_id VARCHAR, collection VARCHAR, contract_version VARCHAR, rule_id VARCHAR, kind VARCHAR, "
    "description VARCHAR, evaluated_by VARCHAR, expectation_type VARCHAR, sql_failures BIGINT, "
    "gx_unexpected BIGINT, gx_element_count BIGINT, gx_success BOOLEAN, check_digit_failures BIGINT, "
    "PRIMARY KEY (batch_id, rule_id)",
    "per batch and rule, the SQL and GX failure counts (CoP 4, 28-29; safehaven.intake.measures)",
)
QUALITY_MEASURES = _declare(
    "governance.quality_measures",
    "batch_id VARCHAR, collection VARCHAR, contract_version VARCHAR, field VARCHAR, measure VARCHAR, "
    "value DOUBLE, numerator BIGINT, denominator BIGINT, period_start DATE, period_end DATE, "
    "measured_at TIMESTAMPTZ, PRIMARY KEY (batch_id, field, measure)",
    "quality measures per batch, field and measure, for the quality statements (CoP 4, 28-29)",
)

# --- protect: objections, the feed, opt-outs, the identity vault ---------------------------

OBJECTION_EVENTS = _declare(
    "governance.objection_events",
    "event_id BIGINT, pid VARCHAR, objection_type VARCHAR, recorded_date DATE, withdrawn_date DATE, "
    "source_practice VARCHAR, _batch VARCHAR, _row BIGINT, registered_at TIMESTAMPTZ, key_id VARCHAR",
    "the objection register, an append-only history keyed by haven pid (CoP 11-14, 14a; safehaven.protect.objections)",
)
TYPE1_INCIDENTS = _declare(
    "governance.type1_incidents",
    "detected_at TIMESTAMPTZ, collection VARCHAR, sender VARCHAR, records_dropped BIGINT, batches VARCHAR[]",
    "GP records about type 1 objectors received and dropped, per sender (guide Rule 4B; CoP 11-14)",
)
HAVEN_BATCHES = _declare(
    "governance.haven_batches",
    "batch_id VARCHAR, collection VARCHAR, built_at TIMESTAMPTZ",
    "the accepted batches that have entered the haven, including one whose every record was a type 1 "
    "objector's and dropped (safehaven.protect.haven)",
)
PRACTICE_REGISTRATIONS = _declare(
    "governance.practice_registrations",
    "practice VARCHAR, pid VARCHAR, first_seen TIMESTAMPTZ, collection VARCHAR",
    "which practice each person was seen at (every GP haven batch and the dropped type 1 records): the "
    "objection-rate monitor's running list sizes (Govt response 7.15)",
)
PRACTICE_MEMBERS_SEEDED = _declare(
    "governance.practice_members_seeded",
    "collection VARCHAR PRIMARY KEY, seeded_at TIMESTAMPTZ",
    "GP collections whose haven rows were once counted into practice_registrations whole; after that each "
    "new batch adds its own (the objection-rate monitor's running list sizes, Govt response 7.15)",
)
OBJECTION_RATES = _declare(
    "governance.objection_rates",
    "assessed_at TIMESTAMPTZ, practice VARCHAR, objection_type VARCHAR, list_size BIGINT, objectors BIGINT, "
    "rate DOUBLE, baseline DOUBLE, upper_limit DOUBLE, p_value DOUBLE, z DOUBLE, assessed BOOLEAN, outlier BOOLEAN",
    "the objection-rate monitor's latest assessment, replaced whole (Govt response 7.15; safehaven.protect.objections)",
)
OBJECTION_FEED_FAULTS = _declare(
    "governance.objection_feed_faults",
    "sha256 VARCHAR PRIMARY KEY, file_name VARCHAR, level VARCHAR, rules VARCHAR, rows BIGINT, "
    "arrived_at TIMESTAMPTZ, detected_at TIMESTAMPTZ, resolved_at TIMESTAMPTZ, resolved_by VARCHAR, "
    "resolution VARCHAR, reason VARCHAR, arrival VARCHAR, file_sha256 VARCHAR",
    "faults of the objection feed, which block record-level releases until resolved, a file's fault one per "
    "arrival in quarantine (CoP 11-14; guide Rule 4B)",
    added=("arrival VARCHAR", "file_sha256 VARCHAR"),
)
OBJECTION_RESTATEMENTS = _declare(
    "governance.objection_restatements",
    "drop_key VARCHAR PRIMARY KEY, batch_id VARCHAR, file_name VARCHAR, arrived_at TIMESTAMPTZ, "
    "noted_at TIMESTAMPTZ, registered_at TIMESTAMPTZ, statements BIGINT, added BIGINT, withdrawals_held BIGINT, "
    "held_applied_at TIMESTAMPTZ",
    "objections files received again (the bytes or the records of a batch already landed): each a "
    "restatement of that batch's statements, registered in arrival order (CoP 11-14; safehaven.protect.objections)",
    added=("held_applied_at TIMESTAMPTZ",),
)
OBJECTION_WITHDRAWALS_HELD = _declare(
    "governance.objection_withdrawals_held",
    "batch_id VARCHAR, _row BIGINT, statement BOOLEAN, held_at TIMESTAMPTZ, applied_at TIMESTAMPTZ, "
    "PRIMARY KEY (batch_id, _row)",
    "withdrawal rows of a new objections batch held, not registered, because they repeat a withdrawal dated on or "
    "before the register learnt the statement they contradict (a stale file); applied only by a person's decision "
    "(CoP 11-14; safehaven.protect.objections)",
)
OBJECTION_BATCH_SEALS = _declare(
    "governance.objection_batch_seals",
    "batch_id VARCHAR, stage VARCHAR, collection VARCHAR, rows BIGINT, digest VARCHAR, mac VARCHAR, "
    "sealed_at TIMESTAMPTZ, sealed_by VARCHAR, PRIMARY KEY (batch_id, stage)",
    "a MAC (under a key derived from the audit key) of each objections batch's landed and valid rows, "
    "written where they are written (CoP 11-14, 23d; safehaven.intake.batch_seal)",
)
OBJECTION_REFRESHES = _declare(
    "governance.objection_refreshes",
    "as_of DATE, attested_at TIMESTAMPTZ, attested_by VARCHAR, reason VARCHAR",
    "a person's attestation that the objection list is current (CoP 11-14; safehaven.protect.feed)",
)
OPTOUT_DECISIONS = _declare(
    "governance.optout_decisions",
    "release_id VARCHAR, agreement_id VARCHAR, legal_basis VARCHAR, identifiability VARCHAR, applied BOOLEAN, "
    "reason VARCHAR, withheld BIGINT, overruled BIGINT, decided_at TIMESTAMPTZ",
    "whether the national data opt-out was applied to each release, and why (CoP 13-14; safehaven.protect.optouts)",
)
OPTOUT_NOTICES = _declare(
    "governance.optout_notices",
    "agreement_id VARCHAR, issued_at TIMESTAMPTZ, since TIMESTAMPTZ, release_id VARCHAR, objected BIGINT, "
    "withdrawn BIGINT, withheld BIGINT, file VARCHAR",
    "the notices sent to recipients of objections since their release (CoP 14; safehaven.protect.optouts)",
)
VAULT_DATA_KEYS = _declare(
    "vault.data_keys",
    "dek_id VARCHAR PRIMARY KEY, vault_key_id VARCHAR, eph_pub BLOB, wrap_nonce BLOB, wrapped BLOB, "
    "created_at TIMESTAMPTZ, entries BIGINT",
    "the vault's data keys, each wrapped to the vault public key (CoP 27b-c; safehaven.protect.vault)",
)
#: a column of random bytes (AES-GCM nonces and ciphertexts) is stored as it is: nothing compresses
#: output indistinguishable from random, and DuckDB, left to choose, tried dictionary and FSST
#: compression on every segment and kept the bytes as large as before. Writing the benchmark
#: night's 2.47M vault entries took 7.2 s with the choice and 4.9 s without it (insert and
#: commit; measured here, issue 22). The declaration persists in the catalog and survives a
#: rebuild (``COPY FROM DATABASE``); a store made before it has ``vault.identity`` copied once into
#: the declared shape by its next vault write (``safehaven.protect.vault._random_bytes_as_declared``).
RANDOM_BYTES = "BLOB USING COMPRESSION uncompressed"

VAULT_IDENTITY = _declare(
    "vault.identity",
    f"pid VARCHAR, field VARCHAR, nonce {RANDOM_BYTES}, ciphertext {RANDOM_BYTES}, dek_id VARCHAR, "
    "collection VARCHAR, added_at TIMESTAMPTZ",
    "direct identifiers, AES-GCM encrypted, one row per person, field and value (CoP 8a, 27b-c; guide Rule 3)",
)
VAULT_SEEN = _declare(
    "vault.seen",
    "pid VARCHAR, field VARCHAR, lookup UHUGEINT",
    "a keyed digest of each vault entry's (pid, field, value), so a night finds values already vaulted "
    "without reading the landing history (issue 22; safehaven.protect.vault)",
)
VAULT_BATCHES = _declare(
    "vault.batches",
    "batch_id VARCHAR, collection VARCHAR, vaulted_at TIMESTAMPTZ, entries BIGINT",
    "which batches' identifiers are in the vault (CoP 27b-c; safehaven.protect.vault)",
)

# --- share: approvals, review, release bookkeeping ------------------------------------------

AGREEMENT_DECISIONS = _declare(
    "governance.agreement_decisions",
    "decision_id BIGINT PRIMARY KEY, agreement_id VARCHAR NOT NULL, decision VARCHAR NOT NULL, "
    "decided_by VARCHAR NOT NULL, decided_on DATE NOT NULL, reason VARCHAR, agreement_version VARCHAR NOT NULL, "
    "agreement_sha256 VARCHAR NOT NULL, source VARCHAR NOT NULL, recorded_by VARCHAR NOT NULL, "
    "recorded_at TIMESTAMPTZ NOT NULL",
    "each agreement's approvals and suspensions, pinned to its file's hash (Caldicott 1; CoP 41-43)",
)
RELEASE_REQUESTS = _declare(
    "governance.release_requests",
    "release_id VARCHAR PRIMARY KEY, agreement_id VARCHAR NOT NULL, identifiability VARCHAR NOT NULL, "
    "state VARCHAR NOT NULL, rule VARCHAR NOT NULL, rule_reason VARCHAR NOT NULL, staging_dir VARCHAR NOT NULL, "
    "content_sha256 VARCHAR NOT NULL, shape_sha256 VARCHAR NOT NULL, manifest_sha256 VARCHAR NOT NULL, "
    "files JSON NOT NULL, summary JSON NOT NULL, register_row JSON NOT NULL, optout_decision JSON NOT NULL, "
    "prepared_by VARCHAR NOT NULL, prepared_at TIMESTAMPTZ NOT NULL, updated_at TIMESTAMPTZ NOT NULL, "
    "comment VARCHAR",
    "release requests waiting for, or past, output checking (SATRE 3.3.04-3.3.05; safehaven.share.review)",
)
RELEASE_REVIEWS = _declare(
    "governance.release_reviews",
    "release_id VARCHAR NOT NULL, reviewer VARCHAR NOT NULL, file_name VARCHAR NOT NULL, sha256 VARCHAR NOT NULL, "
    "decision VARCHAR NOT NULL, comment VARCHAR, decided_at TIMESTAMPTZ NOT NULL",
    "each reviewer's decision per file, pinned to its hash (SATRE 3.3.04-3.3.05; safehaven.share.review)",
)
RELEASE_REQUEST_MEMBERS = _declare(
    "governance.release_request_members",
    "release_id VARCHAR, agreement_id VARCHAR, pid VARCHAR",
    "who a prepared release would hold, moved to release_members on delivery (CoP 14; safehaven.share.review)",
)
RELEASE_INPUTS = _declare(
    "governance.release_inputs",
    "agreement_id VARCHAR, inputs_sha VARCHAR, release_id VARCHAR, recorded_at TIMESTAMPTZ",
    "the inputs' digest of each prepared release, so unchanged inputs are not built again (issue 22)",
)
RELEASES_DUE = _declare(
    "governance.releases_due",
    "agreement_id VARCHAR, agreement_version VARCHAR, agreement_sha256 VARCHAR, due_since TIMESTAMPTZ, "
    "last_seen_at TIMESTAMPTZ, released_as VARCHAR, released_at TIMESTAMPTZ",
    "identifiable releases due, waiting for the key custodian (CoP 27b, 30-31; safehaven.share.due)",
)

# --- publish: code lists, outputs, quality statements, reuse --------------------------------

CODE_LIST = _declare(
    "governance.code_list",
    "list VARCHAR, code VARCHAR, display VARCHAR, grp VARCHAR, system VARCHAR, version VARCHAR",
    "the store's copy of the code lists in use, replaced whole, for the outputs' domains (CoP 28-29)",
)
OUTPUT_QUALITY = _declare(
    "governance.output_quality",
    "output VARCHAR PRIMARY KEY, built_at TIMESTAMPTZ, statement JSON",
    "each output's latest quality statement on the ESS dimensions (CoP 28-29; safehaven.publish.quality)",
)
OUTPUT_RELEASES = _declare(
    "governance.output_releases",
    "release_id VARCHAR, output VARCHAR, published_at TIMESTAMPTZ, statement JSON, PRIMARY KEY (release_id, output)",
    "the quality statement each published release carried (CoP 29i; safehaven.publish.quality)",
)
OUTPUT_BUILDS = _declare(
    "governance.output_builds",
    "output VARCHAR PRIMARY KEY, fingerprint VARCHAR, table_sha VARCHAR, built_at TIMESTAMPTZ, metadata JSON",
    "each output's inputs fingerprint at its last passing build, so unchanged ones are reused (issue 22)",
)
OUTPUT_COUNTS = _declare(
    "governance.output_counts",
    "output VARCHAR, month DATE, fingerprint VARCHAR, counted_at TIMESTAMPTZ, cells BIGINT, seal VARCHAR",
    "per output and reporting month, the inputs fingerprint its counts.<output> rows were made from, and their seal",
    added=("seal VARCHAR",),  # a store counted before the seal: NULL, so every month is counted again
)
PUBLICATION_CONTENTS = _declare(
    "governance.publication_contents",
    "release_id VARCHAR PRIMARY KEY, content_sha VARCHAR, files JSON, rows BIGINT, published_at TIMESTAMPTZ",
    "each publication's content digest, so an unchanged one is not published again (issue 22)",
)
PUBLICATION_PENDING = _declare(
    "governance.publication_pending",
    "release_id VARCHAR PRIMARY KEY, files JSON, started_at TIMESTAMPTZ",
    "a publication being put in place and not yet recorded: after a crash its files in published/ are "
    "known as what analysts may hold (safehaven.publish.release_audit)",
)

# --- dispose: the disposal register --------------------------------------------------------

DISPOSAL_REGISTER = _declare(
    "governance.disposal_register",
    "disposal_id VARCHAR PRIMARY KEY, target_kind VARCHAR NOT NULL, target VARCHAR NOT NULL, agreement_id VARCHAR, "
    "collection VARCHAR, received_before DATE, release_ids VARCHAR, reason VARCHAR NOT NULL, "
    "requested_by VARCHAR NOT NULL, authorised_by VARCHAR, started_at TIMESTAMPTZ NOT NULL, "
    "logical_done_at TIMESTAMPTZ, physical_done_at TIMESTAMPTZ, completed_at TIMESTAMPTZ NOT NULL, "
    "batches BIGINT NOT NULL, rows_disposed BIGINT NOT NULL, files_destroyed BIGINT NOT NULL, "
    "bytes_destroyed BIGINT NOT NULL, keys_destroyed BIGINT NOT NULL, key_ids_destroyed VARCHAR, "
    "store_key_old VARCHAR, store_key_new VARCHAR, method VARCHAR NOT NULL, retained VARCHAR NOT NULL, "
    "certificate JSON NOT NULL",
    "the disposal register: each disposal's certificate (CoP 48-50, 23d; safehaven.dispose.certificate)",
)
DISPOSAL_PROGRESS = _declare(
    "governance.disposal_progress",
    "disposal_id VARCHAR, step VARCHAR, done_at TIMESTAMPTZ, detail JSON, PRIMARY KEY (disposal_id, step)",
    "the steps of each disposal done so far, so a crashed one resumes (CoP 48-50; safehaven.dispose)",
)

# --- the published file (published.duckdb), not the store ----------------------------------

#: The published file's fixed tables, by name in its ``main`` schema: columns (``safehaven.publish.publication``).
PUBLISHED_FILE_TABLES: dict[str, str] = {
    "dictionary": "output VARCHAR, column_name VARCHAR, type VARCHAR, role VARCHAR, description VARCHAR",
    "quality": "output VARCHAR, release_id VARCHAR, published_at VARCHAR, statement JSON, statement_markdown VARCHAR",
}


def _closure(names: Iterable[str]) -> list[Table]:
    """The declared objects ``names`` need, with their views and the views' tables, in declaration order."""
    wanted: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in TABLES:
            raise KeyError(f"{name} is not a table declared in safehaven.core.schema")
        if name in wanted:
            continue
        wanted.add(name)
        todo.extend(t.name for t in TABLES.values() if t.owner == name)
        todo.extend(TABLES[name].needs)
    return [t for t in TABLES.values() if t.name in wanted]


#: tables of one ``ensure`` looked up one by one rather than by one catalog scan: a scan costs about
#: 1.5 ms and more with the store's tables (measured here, 65 tables), a lookup 0.2 ms for a view or a
#: name not there, 2 microseconds for a table of the store on its own connection (``store._table``):
#: past a few names, a new or partly made store's many missing tables cost more than the scan
LOOKED_UP_AT_MOST = 4


def _catalog(con: duckdb.DuckDBPyConnection, wanted: list[Table]) -> set[tuple[str, str | None]]:
    """Those of ``wanted`` that exist in the database in use, as (name, column) pairs, with the
    columns of a table that has migrations and of a view (a table or view has at least one
    column, so a name is present exactly when it has a pair); the column is None for the others.
    Up to :data:`LOOKED_UP_AT_MOST` tables are looked up one by one (``store.table_columns``);
    more, by one query: ``duckdb_columns`` (tables and views alike) when one of them needs its
    columns, else the cheaper ``duckdb_tables``."""
    if len(wanted) <= LOOKED_UP_AT_MOST:
        return {pair for table in wanted for pair in _pairs(con, table)}
    names = [t.name for t in wanted]
    marks = ", ".join("?" for _ in names)
    columns = any(t.added or t.is_view for t in wanted)
    source = "column_name FROM duckdb_columns()" if columns else "NULL FROM duckdb_tables()"
    sql = (
        f"SELECT schema_name || '.' || table_name, {source} "
        f"WHERE database_name = current_database() AND schema_name || '.' || table_name IN ({marks})"
    )
    return set(con.execute(sql, names).fetchall())


def _pairs(con: duckdb.DuckDBPyConnection, table: Table) -> set[tuple[str, str | None]]:
    """``table``'s pairs for :func:`_catalog`: none when it does not exist."""
    columns = table_columns(con, *table.name.split("."))
    if not columns:
        return set()
    return {(table.name, c) for c in columns} if table.added or table.is_view else {(table.name, None)}


def _migrate(con: duckdb.DuckDBPyConnection, tables: list[Table], have: set[tuple[str, str | None]]) -> set[str]:
    """Add the columns an older store's tables lack (``have``: their columns now); returns the
    names of the tables changed."""
    changed: set[str] = set()
    for table in tables:
        for column in table.added:
            if (table.name, column.split()[0]) not in have:
                con.execute(f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS {column}")
                changed.add(table.name)
    return changed


def ensure(con: duckdb.DuckDBPyConnection, *tables: str) -> None:
    """Create the declared ``tables`` that are missing (with their views), in dependency order.

    Asks the catalog once (:func:`_catalog`: one lookup per table for a few, else one query),
    which also tells the columns: a table with migrations is brought up to date, and a view over
    a table that gained a column is made again. Safe inside a caller's transaction (a lookup of
    a missing table does not abort it).
    """
    wanted = _closure(tables)
    have = _catalog(con, wanted)
    present = {name for name, _ in have}
    changed = _migrate(con, [t for t in wanted if t.added and t.name in present], have)
    created = {t.name for t in wanted if t.name not in present}
    for table in wanted:
        if table.name in created:
            con.execute(table.ddl)
    for view in (v for v in TABLES.values() if v.is_view and changed & set(v.needs) and v.name not in created):
        if view.name in present or _catalog(con, [view]):
            con.execute(view.ddl)


def recreate(con: duckdb.DuckDBPyConnection, table: str) -> None:
    """Replace ``table`` with an empty one of its declared shape (a table rewritten whole each time)."""
    declared = TABLES[table]
    if declared.is_view:
        raise ValueError(f"{table} is a view; ensure() makes it")
    con.execute("CREATE OR REPLACE TABLE " + declared.ddl.removeprefix(_IF_NOT_EXISTS))


def create_published_file_tables(con: duckdb.DuckDBPyConnection, catalog: str) -> None:
    """Make the published file's fixed tables (:data:`PUBLISHED_FILE_TABLES`) in attached ``catalog``."""
    for name, columns in PUBLISHED_FILE_TABLES.items():
        con.execute(f"CREATE TABLE {catalog}.main.{name} ({columns})")
