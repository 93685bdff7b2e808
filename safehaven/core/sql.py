"""Quoting for the SQL the haven builds: the one place identifiers and string literals are quoted.

Names from declarations (contract fields, collections, outputs, dimensions) and from received
files (CSV headers) reach SQL text; each is quoted here so that no name can end the identifier
or literal and run SQL of its own (a header ``postcode"; DROP TABLE x; --`` stays one column
name). Values are passed as parameters wherever DuckDB allows; :func:`lit` is for the few
places it does not (macro bodies, ``list_contains`` constants).
"""

from __future__ import annotations

IDENTIFIER_QUOTE = '"'
LITERAL_QUOTE = "'"


def q(name: str) -> str:
    """Quote an SQL identifier for DuckDB: wrapped in double quotes, each double quote doubled."""
    return IDENTIFIER_QUOTE + name.replace(IDENTIFIER_QUOTE, IDENTIFIER_QUOTE * 2) + IDENTIFIER_QUOTE


def lit(value: str) -> str:
    """Quote a string literal for DuckDB: wrapped in single quotes, each single quote doubled."""
    return LITERAL_QUOTE + value.replace(LITERAL_QUOTE, LITERAL_QUOTE * 2) + LITERAL_QUOTE
