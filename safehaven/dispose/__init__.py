"""Retention and secure disposal: first logical (destroy the keys), then physical (CoP 43d, 43f, 48-50).

"Disposal may be initially logical (... putting the data beyond use), but should as soon as
possible be physical (destroying all copies of the data ...)" (CoP 49). The haven disposes of
data when its retention period ends or its agreement ends, records what it did in a disposal
certificate, and can show that the bytes are gone.

What is due (:func:`due`, run every day by the ``disposal`` schedule):

* **A collection's records**, ``retention_days`` after the haven *received* them (the
  ``retention_days`` of the collection's contract, counted from the receipt the audit trail
  records, ``safehaven.intake.landings``: never from ``governance.batches.landed_at`` alone,
  which the store key can change; or from ``quarantined_at`` for a file set aside at ingest).
  The unit of disposal is the received file (the batch): every copy of it is known by its
  SHA-256, so "all copies" can be found and shown to be gone. ``safehaven dispose --collection C
  --before D`` disposes of what was received before day ``D`` (00:00 UTC) by hand. The objections
  collection is not disposed of this way: objections are honoured for as long as the haven holds
  data.
* **An agreement's data** when the agreement has expired (CoP 43d: the purpose is achieved) or
  has been suspended *for a breach* (CoP 43f: the agreement's ``on_breach`` arrangements): the
  reason of its suspension, as the audit trail records it, names a breach. Any other suspension
  may be lifted, so it is listed for review, never disposed of automatically; a breach of
  severity 1 or 2 naming the agreement in the breach register since it was suspended is named
  in that review item (the register is in the store, not on the audit trail: a row anyone
  holding the store key could add never destroys data by itself). An agreement in force is
  refused (suspend it first).
* **One release**, ``retention.days`` after it was made, under an agreement still in force:
  the haven's copy of the extract; the agreement's pseudonym key stays (later releases to the
  same recipient must keep its pseudonyms).

What disposal does, in steps recorded in a journal ``store/disposal.json`` (no values: batch
ids, file names, key ids), so that a crash at any point leaves a state the next run completes
(:func:`resume`; the daily job resumes first). The journal is a file beside the store, so it is
carried out only as the haven wrote it and as the audit trail records the disposal starting: it
carries a MAC over all of it (plan, steps done, progress) under a key derived from the audit key,
and the start's entry, written before the journal, holds the SHA-256 of its plan. A journal that
fails either (written or changed outside the haven, or by an earlier version) is refused and
destroys nothing; a person plans that disposal again. A journal of a disposal the trail records
certified (a crash after the certificate, or a copy put back later) is removed with no step run
again (``safehaven.dispose.run._started_on_record``; CoP 23d, 48-50):

1. **keys** (logical, crypto-shredding): the agreement's pseudonym salt
   ``keys/agreement-<id>.key`` is overwritten and unlinked (``safehaven.core.keys.destroy``); its
   release pseudonyms can no longer be computed from haven pids by anyone.
2. **rows** (logical), one transaction that also writes the step's counts into
   ``governance.disposal_progress``, so a crash leaves either all or none of it: the disposed
   batches' rows in every landing and haven table (raw, ``_valid``, ``_rejected``, ``haven``:
   every table of the collection with a ``_batch`` column), their identity-vault entries that
   no kept record needs (see below) and every vault data key left with no entry (each is a
   key destroyed), the ``vault.batches`` rows, GP practice registrations learned only from
   them, and the release-zone tables of the releases disposed of. ``governance.batches`` keeps
   a tombstone (status ``disposed``: file name, hash, row count), so the same file sent again
   is not landed again. Then every **release request still staged** that the disposal reaches
   (not yet delivered nor closed: prepared, awaiting a reviewer, approved, returned) is
   withdrawn, why ``disposed: <disposal id>``, audited (``review.withdraw``), and the pids kept
   for it are deleted (``safehaven.share.review.withdraw_for_disposal``). It reaches, for an
   agreement, every such request of the agreement (with ``--release``, those named); for a
   collection, every record-level request holding the collection prepared since its first
   disposed batch landed (the rule for the releases made from it).
3. **files** (physical): every plain copy under ``$SAFEHAVEN_HOME`` is overwritten with random
   bytes, synced and unlinked: the release directories disposed of (extracts, manifest and, for
   a whole agreement, its objection notices and re-key crosswalks), the staged files of the
   requests withdrawn (``staging/releases/<release-id>/``), the collection's quarantined
   files received before the date (they are plain identifiable data) with their reason files
   (a folder quarantined whole goes whole), and any copy of a disposed file waiting in
   ``incoming/``. The journal is a plain file: it names a copy in ``incoming/`` by its shown path
   and SHA-256, and the files step finds it again by its hash; a file the haven's user cannot
   read or overwrite refuses the disposal, named by its shown path (``found.unreadable_refused``).
   So does a symbolic link (dangling or not) in place of, or inside, a release or staged folder,
   or a file in place of one: its files may have been moved out of reach (``found.files_under``),
   found again at the files step (a link put in the way after the plan refuses it too); a planned
   file gone by then is listed as not found, never certified (``steps._not_there``), and one the
   haven wrote that no haven action accounts for is a breach (``steps._record_unaccounted``).
4. **rebuild** (physical): DuckDB's DELETE leaves the bytes in the file (``docs/design.md``), so the
   store is copied into a fresh file under a fresh key and swapped in atomically
   (``Store.rebuild``: WAL and temporary files go with the old file). The old store key, which
   could open a copy of the old file, is overwritten and unlinked as the key ring replaces it
   (``safehaven.core.keys``: the bytes, not just the name, are destroyed).
5. **record**: the certificate (what, why, when, by whom, rows per table, files with their
   SHA-256 and their paths as shown names, ``safehaven.core.audit.shown_path``: a copy waiting in
   ``incoming/`` still had its sender's name, which may hold an NHS number; key ids destroyed,
   old and new store key ids, the staged requests withdrawn) goes into
   ``governance.disposal_register``, ``registers/disposal_register.csv|.parquet`` and the audit
   trail (``action="dispose"``). Then the journal is removed.

Identity vault entries. The vault holds one encrypted entry per distinct (pid, field, value)
across all collections, so an entry made from a disposed record may also serve a kept one.
For each value of a disposed record: if no kept record (a remaining row of a vaulted batch of
any collection, the objections included) has that person's field, every entry of that (pid,
field) goes, with no decryption. If a kept record has the person's field with another value
(an old postcode), the entries of that (pid, field) are decrypted with the governance lead's
vault private key, deleted, and the values still needed are encrypted again under a fresh data
key: the disposed value is gone and the kept one is intact. Without the private key such a
disposal is refused before anything is changed (run it as the governance lead).

What stays, and why (documented in every certificate's ``retained``):

* published anonymised aggregates, and anonymised-level release extracts disposed of only
  with their agreement: not confidential (CoP 35-36); the next publication is computed from
  what is left;
* the data release register, ``governance.release_members``, opt-out decisions and notices
  log, the breach register and the audit trail: governance records, keyed by haven pseudonyms
  or holding counts only, needed for CoP 14b notices to recipients that still hold an extract,
  for subject access ("was my record released?") and for accountability (CoP 12, 23d, 32-33);
* validation results, quality measures, type 1 incidents: counts per batch, no values;
* batch tombstones: file name, SHA-256, row count and dates;
* on a collection's disposal, an agreement's objection notices and re-key crosswalks under
  ``releases/<agreement>/`` (recipient pseudonyms, no record values): they go with the agreement.

Beyond the home: backups of the store and of ``keys/`` are not reached. Crypto-shredding
covers a backup of the store file only if no copy of the old store key survives: each
certificate names the old store key id (and any agreement key id) the key custodian must also
destroy in key backups. ``$DAGSTER_HOME`` holds counts and ids only (``docs/design.md``).

Nothing here prints or records a value: certificates, journals, logs and metadata carry
counts, ids, file names and hashes.

The package, one module per part: :mod:`.model` (targets, plans, results), :mod:`.journal`
(the crash-safe journal), :mod:`.found` (the files a disposal reaches), :mod:`.vault_sets` (the
identity-vault entries), :mod:`.planning` (:func:`make_plan`), :mod:`.steps` (the five steps),
:mod:`.certificate` (the register and the certificate), :mod:`.run` (:func:`dispose`,
:func:`resume`) and :mod:`.schedule` (:func:`due`, :func:`sweep`). ``safehaven.dispose.disposal``
gathers the public names.
"""
