"""A content export whose headings a person reads (``Provider Code``, ``ProviderCode``: a
spreadsheet's or reporting tool's) is read as its collection's file, not a possible objections
file: names are read in one spelling (``safehaven.intake.ingest.header_name``), so it blocks no
release (review 57, second round)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from safehaven.core.home import Home
from safehaven.intake.ingest import ingest_collection
from safehaven.share.releases import ReleaseRefused
from tests.unit.feed_helpers import Haven, Template, open_haven, opt_out, small_haven_template


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    return small_haven_template(tmp_path_factory.mktemp("small_haven"))


@pytest.fixture
def haven(home: Home, tmp_path: Path, template: Template) -> Iterator[Haven]:
    with open_haven(home, tmp_path, template) as opened:
        yield opened


@pytest.mark.parametrize("style", ["human", "camel"])
def test_a_content_export_with_headings_a_person_reads_blocks_no_release(haven: Haven, style: str) -> None:
    """'Provider Code,NHS Number,Date Of Birth,...' (a spreadsheet's or BI tool's headings) names only
    sex and postcode exactly: 2 of 7, so not the collection's own header."""
    haven.drop("good.csv", [opt_out(10)])
    haven.run()
    fields = haven.registry.contracts["hospital_episodes"].field_names
    if style == "human":
        header = [f.replace("_", " ").title() for f in fields]
    else:
        header = ["".join(p.title() for p in f.split("_")) for f in fields]
    folder = haven.home.incoming_for("hospital_episodes")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "episodes_20241201.csv").write_text(",".join(header) + "\r\nRXX01,x,1970-01-01,F,LS1,a,b,c\r\n")
    contract = haven.registry.contracts["hospital_episodes"]
    assert (
        ingest_collection(haven.con, contract, folder, haven.home.quarantine_for("hospital_episodes")).files_quarantined
        == 1
    )
    haven.run()
    try:
        haven.release()
    except ReleaseRefused as exc:
        pytest.fail(f"{style}: a content export blocks record-level releases: {str(exc)[:300]}")
