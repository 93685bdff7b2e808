"""Keyed pseudonyms computed inside DuckDB, and the pseudonymised haven tables.

Rules (CoP 8a, 27b-c; ``docs/rules.md`` "Pseudonymisation and encryption"; confidentiality guide Rule 3):

* A pseudonym is HMAC-SHA256 over the canonical NHS number under a secret key, never a plain
  hash: the whole valid NHS-number space (about 0.9 billion values) can be hashed in seconds,
  so an unkeyed hash is reversible by enumeration. The first 128 bits (32 hex digits) are
  kept.
* HMAC is written in DuckDB SQL, ``sha256((K xor opad) || unhex(sha256((K xor ipad) || m)))``
  (RFC 2104), so a whole collection is pseudonymised in one vectorised pass
  (``docs/design.md`` "Pseudonymisation in SQL": about 1.1M rows/s, against 0.2M rows/s for
  Python per-row HMAC). The padded key blocks are
  passed as bound parameters into a temporary table, so key material never appears in SQL
  text, logs or errors.
* A collection has several records per person (GP events: about 7.5), so the haven computes
  the HMAC once per *distinct* NHS number and joins it back (``haven_select_sql``): measured
  on 5M rows and 2 cores, 2.5x faster than hashing every row.
* **Agreement domains** (CoP 8a; ``docs/rules.md``: "each agreement gets its own pseudonym domain (derived key),
  so two recipients cannot join their extracts"): a release pseudonym is
  ``HMAC-SHA256(agreement key, haven pid)``, 128 bits, with the agreement key derived by HKDF
  from the haven key and the agreement's own salt (``safehaven.core.keys.agreement_key``). It is
  computed from the haven pid, not the NHS number: the haven holds no NHS number outside the
  identity vault, which the pipeline cannot read, and the pid is itself a keyed function of
  the canonical NHS number, so the release pseudonym is too (a keyed function of a keyed
  function). Without the agreement key a recipient's pseudonyms cannot be linked to the
  haven's or to another recipient's; destroying the agreement's salt file shreds the domain.
  Rotating the haven key re-keys every domain with it (``safehaven.protect.rotation`` then writes
  each recipient a crosswalk from its old pseudonyms to its new ones).
* Haven content tables hold no direct identifier: the NHS number is replaced by the
  pseudonym; date of birth is kept only to its week (``birth_week``, a Monday) and postcode
  only to its district (outward code), the finest a release may ask for.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Literal

import duckdb

from safehaven.core import pins
from safehaven.core.keys import Key, KeyRing, check_agreement_id
from safehaven.core.sql import q
from safehaven.intake.contracts import Contract, FieldSpec

BLOCK = 64
PSEUDONYM_HEX = 32


def _pads(key: bytes) -> tuple[bytes, bytes]:
    if len(key) > BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(BLOCK, b"\x00")
    return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def install_key(con: duckdb.DuckDBPyConnection, name: str, key: bytes | Key) -> None:
    """Bind an HMAC key's padded blocks into temp table ``_hmac_<name>`` for this connection."""
    if not name.replace("_", "").isalnum() or not name.isascii():
        raise ValueError(f"invalid key name {name!r}")
    ipad, opad = _pads(key.material if isinstance(key, Key) else key)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _hmac_{name} (ipad BLOB, opad BLOB)")
    con.execute(f"INSERT INTO _hmac_{name} VALUES (?, ?)", [ipad, opad])


def hmac_sql(value_sql: str, name: str) -> str:
    """SQL: the pseudonym (32 hex digits) of ``value_sql`` under the installed key ``name``."""
    ipad = f"(SELECT ipad FROM _hmac_{name})"
    opad = f"(SELECT opad FROM _hmac_{name})"
    inner = f"unhex(sha256({ipad} || encode(CAST({value_sql} AS VARCHAR))))"
    return f"left(sha256({opad} || {inner}), {PSEUDONYM_HEX})"


def pseudonym(key: bytes, canonical_nhs: str) -> str:
    """Python twin of ``hmac_sql`` for one value (CLI look-ups and tests only)."""
    return hmac.new(key, canonical_nhs.encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def haven_coarsening(spec: FieldSpec) -> Literal["district", "week"] | None:
    """How the haven coarsens a field, or None when it keeps it as it is.

    The one rule: a UK postcode (``rule.format: uk_postcode``) is kept only to its district;
    a quasi-identifying ``DATE`` (a date of birth) only to its week. The full values go to
    the identity vault.
    """
    if spec.rule is not None and spec.rule.format == "uk_postcode":
        return "district"
    if spec.identifiability == "quasi_identifier" and spec.type == "DATE":
        return "week"
    return None


def haven_column(spec: FieldSpec) -> str:
    """The haven column holding a contract field (``haven_coarsening`` decides it).

    A postcode ``<name>`` is held as ``<name>_district``; a quasi-identifying date as its
    name without ``date_of_`` plus ``_week`` (``date_of_birth`` -> ``birth_week``); any other
    field under its own name. (The NHS number and other direct identifiers are not held.)
    """
    coarsening = haven_coarsening(spec)
    if coarsening == "district":
        return f"{spec.name}_district"
    if coarsening == "week":
        return spec.name.replace("date_of_", "") + "_week"
    return spec.name


def postcode_district_sql(expr: str) -> str:
    """The outward code (district) of a UK postcode: everything before the last three characters."""
    compact = f"replace(upper({expr}), ' ', '')"
    return f"CASE WHEN {expr} IS NULL THEN NULL ELSE left({compact}, length({compact}) - 3) END"


def birth_week_sql(expr: str) -> str:
    """The Monday of the ISO week of a date of birth."""
    return f"CAST(date_trunc('week', {expr}) AS DATE)"


def release_key_name(agreement_id: str) -> str:
    """The SQL-safe name under which an agreement's pseudonym key is installed."""
    return "agreement_" + hashlib.sha256(check_agreement_id(agreement_id).encode()).hexdigest()[:16]


def install_agreement_domain(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, agreement_id: str, *, create: bool = True
) -> tuple[str, str]:
    """Install an agreement's pseudonym key on ``con``: ``(name for hmac_sql, key id)``.

    The key is derived once (``safehaven.core.keys.agreement_key``); the key id is public and goes
    into release manifests.
    """
    name = release_key_name(agreement_id)
    key = pins.agreement_key(con, keyring, agreement_id, create=create)  # salt pinned; never re-created
    install_key(con, name, key)
    return name, key.key_id


def install_agreement_key(
    con: duckdb.DuckDBPyConnection, keyring: KeyRing, agreement_id: str, *, create: bool = True
) -> str:
    """Install an agreement's pseudonym key on ``con``; returns its name for ``hmac_sql``."""
    return install_agreement_domain(con, keyring, agreement_id, create=create)[0]


def release_pseudonym_sql(
    con: duckdb.DuckDBPyConnection, pid_expr: str, agreement_id: str, keyring: KeyRing, *, create: bool = True
) -> str:
    """SQL: the agreement-domain pseudonym of a haven pid (``pid_expr``), key installed on ``con``.

    ``HMAC-SHA256(agreement key, haven pid)``, first 128 bits (see the module docstring).
    """
    return hmac_sql(pid_expr, install_agreement_key(con, keyring, agreement_id, create=create))


def release_pseudonym(key: Key, pid: str) -> str:
    """Python twin of ``release_pseudonym_sql`` for one pid (tests and CLI look-ups)."""
    return pseudonym(key.material, pid)


def ids_sql(contract: Contract, source: str, key_name: str = "haven") -> str:
    """SELECT (nhs, pid): the pseudonym of each distinct NHS number of ``source``, HMAC'd once each."""
    nhs = q(contract.patient_key)
    return (
        f"SELECT nhs, {hmac_sql('nhs', key_name)} AS pid "
        f"FROM (SELECT DISTINCT {nhs} AS nhs FROM {source} WHERE {nhs} IS NOT NULL)"
    )


def haven_select_sql(contract: Contract, source: str, key_name: str = "haven", ids: str | None = None) -> str:
    """SELECT turning a valid landing table into its pseudonymised haven form.

    The NHS number and other direct identifiers are dropped; each other field becomes its
    ``haven_column``, coarsened as ``haven_coarsening`` says. The HMAC runs once per distinct
    NHS number (``ids_sql``, or a table of it passed as ``ids``), joined back to the records.
    """
    cols: list[str] = ["_ids.pid AS pid"]
    for spec in contract.fields:
        if spec.name == contract.patient_key or spec.identifiability == "direct_identifier":
            continue
        value, coarsening = f"_src.{q(spec.name)}", haven_coarsening(spec)
        if coarsening == "district":
            value = postcode_district_sql(value)
        elif coarsening == "week":
            value = birth_week_sql(value)
        cols.append(f"{value} AS {q(haven_column(spec))}")
    cols += ["_src._batch", "_src._row"]
    return f"SELECT {', '.join(cols)} {pid_join_sql(contract, source, key_name, ids)}"


def pid_join_sql(contract: Contract, source: str, key_name: str = "haven", ids: str | None = None) -> str:
    """FROM clause: the records of ``source`` as ``_src``, each with its pseudonym as ``_ids.pid``.

    The pseudonymisation itself: the HMAC runs once per distinct NHS number (``ids_sql``, or a
    table of it passed as ``ids``) and is joined back to every record; a record without an NHS
    number gets no pseudonym.
    """
    nhs = q(contract.patient_key)
    ids = f"{ids} _ids" if ids else f"({ids_sql(contract, source, key_name)}) _ids"
    return f"FROM {source} _src LEFT JOIN {ids} ON _ids.nhs = _src.{nhs}"
