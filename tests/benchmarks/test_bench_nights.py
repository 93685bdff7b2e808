"""The multi-night benchmark (issue 22) at a tiny scale, so it never rots.

Targets live in the benchmark, not here: at 150 patients a night measures fixed costs. This
checks only that every night and the idle run produced figures, and that the report carries
the two last-over-first ratios.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from benchmarks import nights, run

NIGHTS = 2


@pytest.mark.slow
def test_multi_night_report_has_every_night_and_the_idle_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    args = ["--patients", "150", "--seed", "7", "--nights", str(NIGHTS), "--quiet"]
    code = run.main([*args, "--work", str(tmp_path / "work"), "--results", str(results)])
    assert code == 0
    (path,) = results.glob("*.json")
    report = json.loads(path.read_text())["nights"]

    per_night = report["per_night"]
    assert [n["night"] for n in per_night] == list(range(1, NIGHTS + 1))
    ends = [date.fromisoformat(n["period_end"]) for n in per_night]
    assert ends == sorted(ends) and len(set(ends)) == NIGHTS
    for n in per_night:
        assert n["rows"] > 0 and n["seconds"] > 0 and n["cpu_seconds"] > 0, n
        assert n["peak_rss_bytes"] > 0 and n["store_bytes"] > 0, n
        assert n["stages"] and all(s["seconds"] >= 0 for s in n["stages"].values()), n
        assert n["baseline"]["seconds"] > 0 and n["baseline"]["store_bytes"] > 0, n
    for key in ("time_ratio_last_first", "peak_rss_ratio_last_first"):
        assert report[key] > 0, key
    assert report["idle_run_seconds"] > 0
    for key in ("seconds_import", "seconds_build_definitions", "seconds_job"):
        assert report["idle"][key] >= 0, key

    printed = capsys.readouterr().out
    assert f"{NIGHTS}/1" in printed and "idle run" in printed and "targets" in printed


def test_period_ends_are_successive_month_ends() -> None:
    assert nights.period_ends(3, date(2026, 3, 31)) == [date(2026, 1, 31), date(2026, 2, 28), date(2026, 3, 31)]
    assert nights.period_ends(1)[0] < date.today().replace(day=1)
