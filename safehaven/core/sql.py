"""Quoting for the SQL the haven builds: the one place identifiers and string literals are quoted.

Names from declarations (contract fields, collections, outputs, dimensions) and from received
files (CSV headers) reach SQL text; each is quoted here so that no name can end the identifier
or literal and run SQL of its own (a header ``postcode"; DROP TABLE x; --`` stays one column
name). Values are passed as parameters wherever DuckDB allows; :func:`lit` is for the few
places it does not (macro bodies, ``list_contains`` constants).
"""

from __future__ import annotations

import re
from pathlib import Path

IDENTIFIER_QUOTE = '"'
LITERAL_QUOTE = "'"


def q(name: str) -> str:
    """Quote an SQL identifier for DuckDB: wrapped in double quotes, each double quote doubled."""
    return IDENTIFIER_QUOTE + name.replace(IDENTIFIER_QUOTE, IDENTIFIER_QUOTE * 2) + IDENTIFIER_QUOTE


#: the characters DuckDB's file readers take as a glob pattern in a path
GLOB_CHARACTERS = "*?["
#: and the one DuckDB also splits a pattern's folders on: a received name holding any of these is
#: never read (``safehaven.intake.ingest.bad_name``); the haven's own paths are escaped here
PATTERN_CHARACTERS = frozenset(GLOB_CHARACTERS + "\\")
_GLOB = re.compile(f"([{re.escape(GLOB_CHARACTERS)}])")


def file_lit(path: Path) -> str:
    """A path as a literal for DuckDB's file readers (``read_csv``, ``read_parquet``) that names
    that one file: each glob character is written as a one-character class (``*`` as ``[*]``).

    DuckDB reads a path holding ``*``, ``?`` or ``[`` as a pattern, so a received file named
    ``*.csv`` would be read together with every other file of its folder, a symbolic link's
    target outside the home included (a file is landed whole or not at all: CoP 7-9).
    """
    return lit(_GLOB.sub(r"[\1]", str(path)))


#: DuckDB's integer types, by the names a relation's description gives them (``str(type)``): the one
#: list (which Parquet types hold a contract's integers, which published columns are counts, which
#: exported cells are numbers and never neutralised)
_SIGNED_INTEGERS = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT")
INTEGER_TYPES = (*_SIGNED_INTEGERS, *(f"U{name}" for name in _SIGNED_INTEGERS))


def lit(value: str) -> str:
    """Quote a string literal for DuckDB: wrapped in single quotes, each single quote doubled."""
    return LITERAL_QUOTE + value.replace(LITERAL_QUOTE, LITERAL_QUOTE * 2) + LITERAL_QUOTE


#: the haven's calendar: the dates senders give (an objection's recorded and withdrawn dates) are
#: UK dates, so a time is turned into the haven's day here, never in the session's time zone (the host's)
HAVEN_TIME_ZONE = "Europe/London"


def haven_day_sql(timestamp: str) -> str:
    """SQL of the haven's calendar day (:data:`HAVEN_TIME_ZONE`) of a TIMESTAMPTZ expression: 00:30
    BST on 2 July is 2 July, whatever the host's zone (CoP 11-14: objection dates are UK dates)."""
    return f"CAST(timezone({lit(HAVEN_TIME_ZONE)}, {timestamp}) AS DATE)"
