"""The benchmark harness at a tiny scale, so it never rots.

Targets are not asserted here (2,000 patients measure fixed costs, not throughput); only that
the harness runs the pipeline and the baseline end to end, produces every stage with sane
numbers, and that the baseline still does the same work as the pipeline (its counts and
published files agree), which is what makes it an honest yardstick.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import run

PIPELINE_STAGES = ("ingest", "validate", "objections", "pseudonymise", "aggregate", "publish")


@pytest.mark.slow
def test_harness_produces_a_complete_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    code = run.main(
        [
            "--patients",
            "2000",
            "--seed",
            "7",
            "--no-gx-pandas",
            "--no-scaling",
            "--quiet",
            "--hmac-rows",
            "5000",
            "--work",
            str(tmp_path / "work"),
            "--results",
            str(results),
        ]
    )
    assert code == 0
    files = list(results.glob("*.json"))
    assert len(files) == 1
    report = json.loads(files[0].read_text())

    assert report["pipeline_success"], report["checks_failed"]
    assert report["agreement"] == [], (
        "the hand-written baseline no longer does the same work as the pipeline; update "
        "benchmarks/baseline.py to the pipeline's rules and outputs: " + "; ".join(report["agreement"])
    )
    stages = report["comparison"]["stages"]
    for name in PIPELINE_STAGES:
        row = stages[name]
        assert row["rows"] > 0, name
        for key in ("pipeline_s", "baseline_s", "plain_s", "ratio"):
            assert row[key] > 0 and math.isfinite(row[key]), (name, key, row)
        assert row["pipeline_rows_per_s"] > 0 and row["baseline_rows_per_s"] > 0, name

    e2e = report["comparison"]["end_to_end"]
    assert 0 < e2e["baseline_s"] and 0 < e2e["pipeline_s"] <= e2e["pipeline_job_s"]
    assert sum(stages[s]["pipeline_s"] for s in PIPELINE_STAGES) <= e2e["pipeline_s"] + 1e-6
    assert report["rows_total"] == sum(report["rows"].values()) > 15_000

    peak = report["memory"]["pipeline_peak_bytes"]
    assert 50 * 2**20 < peak < 8 * 2**30
    hmac = report["hmac"]
    assert hmac["rows"] == 5000
    assert hmac["python_hmac_new"]["rows_per_s"] > 0 and hmac["duckdb_sql"]["rows_per_s"] > 0
    assert hmac["python_table_job"]["rows_per_s"] > 0
    assert hmac["pipeline_pseudonymise"]["rows_per_s"] > 0 and hmac["pipeline_pseudonymise"]["people"] > 0

    # the pseudonymise stage splits into its two jobs, whose times add up to the stage's
    ps = report["pseudonymisation"]
    assert ps["rows"] == stages["pseudonymise"]["rows"] > 0 and ps["vault_entries"] > 0
    assert math.isclose(ps["haven"]["seconds"] + ps["vault"]["seconds"], ps["stage"]["seconds"])
    assert ps["haven"]["rows_per_s"] > ps["stage"]["rows_per_s"] > 0
    assert ps["vs_python_table_job"] > 0 and ps["vs_python_hmac_loop"] > 0
    assert ps["haven_vs_python_table_job"] > 0 and ps["haven_vs_python_hmac_loop"] > 0
    # the 5x targets judge the pipeline's pseudonymisation measured in the micro worker
    assert math.isclose(
        ps["vs_python_hmac_loop"], hmac["pipeline_pseudonymise"]["rows_per_s"] / hmac["python_hmac_new"]["rows_per_s"]
    )

    assert report["machine"]["cores_logical"] >= 1 and report["machine"]["memory_bytes"] > 0
    for name in ("python", "duckdb", "dagster", "great_expectations", "polars"):
        assert report["versions"][name]

    statuses = {t["target"].split(" ")[0]: t["status"] for t in report["targets"]}
    assert len(report["targets"]) == 9
    audit = report["disclosure_audit"]  # the release's LP audit inside the publish stage (issue 19)
    assert audit["seconds"] >= 0 and audit["cells"] > 0 and audit["failing"] == 0
    assert audit["joint"]["iterations"] >= 1
    assert sum("pseudonymis" in t["target"] for t in report["targets"]) == 4
    assert set(statuses.values()) <= {"PASS", "MISS", "SKIP"}

    printed = capsys.readouterr().out
    for word in (
        *PIPELINE_STAGES,
        "end-to-end",
        "targets",
        "disclosure audit",
        "PASS" if "PASS" in statuses.values() else "MISS",
    ):
        assert word in printed
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir()), "scratch not removed"


def test_targets_pass_and_miss_by_their_limits() -> None:
    assert run._target("x", 1.4, 1.5, "<=", "")["status"] == "PASS"
    missed = run._target("x", 3.0, 1.5, "<=", "")
    assert missed["status"] == "MISS" and missed["miss_by"] == "100% over the limit"
    short = run._target("x", 750_000, 1_000_000, ">=", "")
    assert short["status"] == "MISS" and short["miss_by"] == "25% short of the limit"
    assert run._target("x", None, 1.0, "<=", "n/a")["status"] == "SKIP"


def test_the_workers_code_is_a_compiled_copy_whose_digest_is_of_its_sources(tmp_path: Path) -> None:
    """Workers run from a copy of the code compiled to bytecode, as an installed package is (a
    worker started where ``PYTHONDONTWRITEBYTECODE`` is set would otherwise compile every module
    at its start, which the run with nothing to do counts); the copy's digest is of its sources
    only, so two copies of one tree have the same."""
    import importlib.util

    code, digest = run.snapshot(tmp_path / "first")
    sources = sorted((code / "safehaven").rglob("*.py"))
    assert sources
    assert all(Path(importlib.util.cache_from_source(str(p))).is_file() for p in sources)
    assert run.snapshot(tmp_path / "second")[1] == digest
