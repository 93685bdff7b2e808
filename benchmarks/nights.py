"""``python -m benchmarks.run --nights N``: successive nightly drops into one haven home.

Issue 22: a night's cost should be set by its own drop, not by the nights before it. This
runs N nights (default 12) of about the same size, one calendar month apart (the last one's
period ends last month, as a real nightly drop's would), into ONE haven home:

1. Night i's drop is generated (``benchmarks.generate --period-end``, the same seed: the same
   population sending a later twelve-month extract) and copied into the home's ``incoming/``.
2. The nightly job runs on it in a fresh worker process (``benchmarks.pipeline``), so each
   night's peak RSS is its own. The store (``store/haven.duckdb``) is kept from night to night.
3. The plain baseline (``benchmarks.baseline --append``) does the same incremental work in its
   own worker: it lands and validates the night's drop, adds its records to its haven and its
   objection statements to its register, in ONE persistent encrypted DuckDB file, and rebuilds
   the outputs over the whole haven, as the pipeline does.
4. After the last night, one more pipeline run with an empty ``incoming/``: the fixed cost of
   a run with nothing to do (``idle_run_seconds``: the worker process, start to exit). The
   haven's one-time set-up (the vault pair, the agreements adopted) is done once before night 1
   in its own worker, so neither a night nor the idle run counts it.

Per night: wall and CPU seconds per stage (an asset's ``safehaven/stage`` tag, or its group),
the job's wall and CPU seconds, peak RSS, the store's bytes, each over night 1; the
baseline's seconds, CPU seconds, peak RSS and file size beside them. The pipeline's counts and
published files are checked against the baseline's every night, as in the single-night run.
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from benchmarks import run as bench
from benchmarks.common import COLLECTIONS, STAGES

#: Targets (issue 22), on the bench machine and scale.
TARGET_NIGHT_RATIO = 1.1
TARGET_NIGHT_PEAK_BYTES = 2 * bench.GIB
TARGET_IDLE_SECONDS = 5.0
DEFAULT_NIGHTS = 12


def period_ends(nights: int, last: date | None = None) -> list[date]:
    """``nights`` month ends one month apart, the last one ``last`` (default: last month's end)."""
    end = last or date.today().replace(day=1) - timedelta(days=1)
    out = [end]
    for _ in range(nights - 1):
        out.append(out[-1].replace(day=1) - timedelta(days=1))
    return out[::-1]


# --- running the nights ------------------------------------------------------------------


def _generate(
    runner: bench.Runner, out: Path, patients: int, seed: int, end: date, cache: Path | None
) -> tuple[Path, dict[str, int]]:
    """Night's drop (or a cached copy): (folder, rows per collection)."""
    if cache is not None:
        out = cache / f"p{patients}_s{seed}_{end:%Y%m%d}"
        if (out / ".counts.json").exists():
            return out, json.loads((out / ".counts.json").read_text())
    counts = out.parent / f".counts_{out.name}.json"
    log = f"generate_{end:%Y%m%d}"
    args = ["--out", str(out), "--patients", str(patients), "--seed", str(seed), "--counts", str(counts)]
    code, _ = runner.run("benchmarks.generate", [*args, "--period-end", end.isoformat()], log)
    rows = runner.load(counts, log, "generating the drop", code)["rows"]
    if cache is not None:
        (out / ".counts.json").write_text(json.dumps(rows))
    return out, rows


def _pipeline(
    runner: bench.Runner,
    home: Path,
    work: Path,
    name: str,
    threads: int | None,
    memory_limit: str = "",
    trace_sql: bool = False,
) -> dict[str, Any]:
    """The nightly job on whatever ``home/incoming`` holds, in a fresh worker (``--trace-sql``:
    every store statement timed, the slowest kept in the night's raw run)."""
    out = work / f"{name}.json"
    args = ["--home", str(home), "--out", str(out), "--no-set-up"] + (["--threads", str(threads)] if threads else [])
    args += ["--memory-limit", memory_limit] if memory_limit else []
    args += ["--trace-sql"] if trace_sql else []
    code, seconds = runner.run("benchmarks.pipeline", args, name, {"DAGSTER_HOME": str(work / "dagster_home")})
    doc = runner.load(out, name, f"the pipeline run ({name})", code)
    store = home / "store" / "haven.duckdb"
    doc.update(seconds_process=seconds, exit_code=code, store_bytes=store.stat().st_size if store.exists() else 0)
    doc["stages"] = bench.pipeline_stages(doc)
    return doc


def _set_up(runner: bench.Runner, home: Path, work: Path) -> None:
    """The haven's one-time set-up, in its own worker before night 1: no night pays for it, and
    the run with nothing to do measures a run, not the set-up (``benchmarks.pipeline``)."""
    out = work / "pipeline_set_up.json"
    args = ["--home", str(home), "--out", str(out), "--set-up-only"]
    code, _ = runner.run("benchmarks.pipeline", args, "pipeline_set_up", {"DAGSTER_HOME": str(work / "dagster_home")})
    runner.load(out, "pipeline_set_up", "the haven's set-up", code)


def _baseline(runner: bench.Runner, drop: Path, work: Path, name: str, threads: int | None) -> dict[str, Any]:
    out = work / f"{name}.json"
    args = ["--drop", str(drop), "--work", str(work / "baseline"), "--out", str(out), "--append"]
    code, seconds = runner.run("benchmarks.baseline", args + (["--threads", str(threads)] if threads else []), name)
    doc = runner.load(out, name, f"the baseline run ({name})", code)
    doc.update(seconds_process=seconds, published_dir=str(work / "baseline" / "published"))
    return doc


def _land(drop: Path, home: Path) -> None:
    for collection in COLLECTIONS:
        target = home / "incoming" / collection
        target.mkdir(parents=True, exist_ok=True)
        for path in (drop / collection).iterdir():
            shutil.copy2(path, target / path.name)


def run_nights(args: argparse.Namespace, patients: int, work: Path, runner: bench.Runner) -> dict[str, Any]:
    """Raw runs of every night and the idle run (``report["runs"]``)."""
    threads = args.threads or None
    cache = args.drop_cache.resolve() if args.drop_cache else None
    home, nights_work = work / "home", work / "nights"
    (nights_work / "dagster_home").mkdir(parents=True)
    nights: list[dict[str, Any]] = []
    ends = period_ends(args.nights)
    _set_up(runner, home, nights_work)
    for i, end in enumerate(ends, start=1):
        runner.say(f"night {i}/{len(ends)}: generating the drop ending {end} ({patients:,} patients)")
        drop, rows = _generate(runner, work / "drops" / f"night_{i}", patients, args.seed, end, cache)
        _land(drop, home)
        runner.say(f"  pipeline on {sum(rows.values()):,} rows")
        pipe = _pipeline(runner, home, nights_work, f"pipeline_night_{i}", threads, args.memory_limit, args.trace_sql)
        pipe["published_dir"] = str(home / "published")
        runner.say(f"  job {pipe['seconds_job']:.1f} s, peak {pipe['peak_rss_bytes'] / bench.MIB:.0f} MiB; baseline")
        base = _baseline(runner, drop, nights_work, f"baseline_night_{i}", threads)
        problems = bench.agreement(pipe, base)
        runner.say(f"  baseline {base['seconds_end_to_end']:.1f} s; {len(problems)} disagreements")
        nights.append({"night": i, "period_end": end.isoformat(), "rows": rows, "pipeline": pipe, "baseline": base})
        nights[-1]["agreement"] = problems
        if cache is None and not args.keep:
            shutil.rmtree(drop, ignore_errors=True)
    runner.say("idle run: the nightly job with nothing in incoming/")
    idle = _pipeline(runner, home, nights_work, "pipeline_idle", threads, args.memory_limit, args.trace_sql)
    return {"nights": nights, "idle": idle}


# --- summarising -------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _night(raw: dict[str, Any]) -> dict[str, Any]:
    """One night's figures from its raw runs."""
    pipe, base = raw["pipeline"], raw["baseline"]
    return {
        "night": raw["night"],
        "period_end": raw["period_end"],
        "rows": sum(raw["rows"].values()),
        "success": bool(pipe["success"]),
        "checks_failed": pipe["checks_failed"],
        "stages": {n: {"seconds": s["seconds"], "cpu_seconds": s["cpu_seconds"]} for n, s in pipe["stages"].items()},
        "seconds": pipe["seconds_job"],
        "cpu_seconds": pipe["cpu_seconds_job"],
        "seconds_process": pipe["seconds_process"],
        "seconds_import": pipe["seconds_import"],
        "seconds_build_definitions": pipe["seconds_build_definitions"],
        "peak_rss_bytes": pipe["peak_rss_bytes"],
        "store_bytes": pipe["store_bytes"],
        "baseline": {
            "seconds": base["seconds_end_to_end"],
            "cpu_seconds": base["cpu_seconds_end_to_end"],
            "peak_rss_bytes": base["peak_rss_bytes"],
            "store_bytes": base["db_bytes"],
            "stages": {
                n: {"seconds": s["seconds"], "cpu_seconds": s.get("cpu_seconds")} for n, s in base["stages"].items()
            },
        },
        "agreement": raw.get("agreement", []),
    }


RATIO_KEYS = ("seconds", "cpu_seconds", "peak_rss_bytes", "store_bytes")


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """``report["nights"]``: per night, each over night 1, the last-over-first ratios and the idle run."""
    per_night = [_night(raw) for raw in runs["nights"]]
    first, last = per_night[0], per_night[-1]
    for night in per_night:
        night["ratio_to_first"] = {k: _ratio(night[k], first[k]) for k in RATIO_KEYS}
        night["baseline"]["ratio_to_first"] = {
            k: _ratio(night["baseline"][k], first["baseline"][k]) for k in RATIO_KEYS
        }
    idle = runs["idle"]
    return {
        "per_night": per_night,
        "time_ratio_last_first": last["ratio_to_first"]["seconds"],
        "peak_rss_ratio_last_first": last["ratio_to_first"]["peak_rss_bytes"],
        "cpu_ratio_last_first": last["ratio_to_first"]["cpu_seconds"],
        "store_ratio_last_first": last["ratio_to_first"]["store_bytes"],
        "baseline": {
            "time_ratio_last_first": last["baseline"]["ratio_to_first"]["seconds"],
            "peak_rss_ratio_last_first": last["baseline"]["ratio_to_first"]["peak_rss_bytes"],
            "cpu_ratio_last_first": last["baseline"]["ratio_to_first"]["cpu_seconds"],
            "store_ratio_last_first": last["baseline"]["ratio_to_first"]["store_bytes"],
        },
        "peak_rss_bytes_max": max(n["peak_rss_bytes"] for n in per_night),
        "rows_per_night_max": max(n["rows"] for n in per_night),
        "idle_run_seconds": idle["seconds_process"],
        "idle": {
            "success": bool(idle["success"]),
            "seconds_process": idle["seconds_process"],
            "seconds_import": idle["seconds_import"],
            "seconds_build_definitions": idle["seconds_build_definitions"],
            "seconds_job": idle["seconds_job"],
            "peak_rss_bytes": idle["peak_rss_bytes"],
            "stages": {n: s["seconds"] for n, s in idle["stages"].items()},
        },
        "all_succeeded": all(n["success"] for n in per_night) and bool(idle["success"]),
    }


def targets(nights: dict[str, Any]) -> list[dict[str, Any]]:
    """Met/missed per issue 22 target."""
    n = len(nights["per_night"])
    time_r, rss_r = nights["time_ratio_last_first"], nights["peak_rss_ratio_last_first"]
    peak, rows = nights["peak_rss_bytes_max"], nights["rows_per_night_max"]
    idle = nights["idle"]
    base = nights["baseline"]
    return [
        bench._target(
            f"night {n} time <= 1.1x night 1",
            time_r,
            TARGET_NIGHT_RATIO,
            "<=",
            f"{time_r:.2f}x (cpu {bench._s(nights['cpu_ratio_last_first'], '{:.2f}x')}; "
            f"baseline {bench._s(base['time_ratio_last_first'], '{:.2f}x')})",
        ),
        bench._target(
            f"night {n} peak memory <= 1.1x night 1",
            rss_r,
            TARGET_NIGHT_RATIO,
            "<=",
            f"{rss_r:.2f}x (baseline {bench._s(base['peak_rss_ratio_last_first'], '{:.2f}x')})",
        ),
        bench._target(
            f"peak RSS < 2 GiB at 10M rows a night (this run: {rows / 1e6:.2f}M rows a night)",
            peak,
            TARGET_NIGHT_PEAK_BYTES,
            "<",
            f"{peak / bench.GIB:.2f} GiB (highest night)",
        ),
        bench._target(
            "a run with nothing to do <= 5 s",
            nights["idle_run_seconds"],
            TARGET_IDLE_SECONDS,
            "<=",
            f"{nights['idle_run_seconds']:.1f} s (imports {idle['seconds_import']:.1f} s, definitions "
            f"{idle['seconds_build_definitions']:.1f} s, job {idle['seconds_job']:.1f} s)",
        ),
    ]


def assemble(report: dict[str, Any]) -> dict[str, Any]:
    """Everything derived from ``report["runs"]`` (also for ``--rebuild``)."""
    report["nights"] = summarise(report["runs"])
    report["targets"] = targets(report["nights"])
    return report


# --- printing ----------------------------------------------------------------------------


def _stage_names(per_night: list[dict[str, Any]]) -> list[str]:
    seen = {s for n in per_night for s in n["stages"]}
    return [s for s in STAGES if s in seen] + sorted(seen - set(STAGES))


def _row(cells: list[str], widths: list[int]) -> str:
    return "".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def table(per_night: list[dict[str, Any]]) -> list[str]:
    """The per-night table: stage wall/CPU seconds, totals, memory, store; the baseline beside it."""
    stages = _stage_names(per_night)
    head = ["night", "period end", "rows", *stages, "total s", "cpu s", "peak MiB", "store MiB"]
    head += ["base s", "base cpu", "base MiB", "base store"]
    widths = [6, 12, 11, *[max(12, len(s) + 2) for s in stages], 9, 8, 10, 11, 8, 9, 10, 11]

    def cells(n: dict[str, Any]) -> list[str]:
        b = n["baseline"]
        out = [str(n["night"]), n["period_end"], f"{n['rows']:,}"]
        for s in stages:
            st = n["stages"].get(s)
            out.append(f"{st['seconds']:.1f}/{st['cpu_seconds']:.1f}" if st else "-")
        out += [f"{n['seconds']:.1f}", f"{n['cpu_seconds']:.1f}", f"{n['peak_rss_bytes'] / bench.MIB:.0f}"]
        out += [f"{n['store_bytes'] / bench.MIB:.1f}", f"{b['seconds']:.1f}", f"{b['cpu_seconds']:.1f}"]
        return out + [f"{b['peak_rss_bytes'] / bench.MIB:.0f}", f"{b['store_bytes'] / bench.MIB:.1f}"]

    lines = [_row(head, widths), "-" * sum(widths)]
    lines += [_row(cells(n), widths) for n in per_night]
    first, last = per_night[0], per_night[-1]
    ratio = [f"{len(per_night)}/1", "", ""]
    for s in stages:
        a, b = last["stages"].get(s), first["stages"].get(s)
        ratio.append(bench._s(_ratio(a["seconds"], b["seconds"]) if a and b else None, "{:.2f}x"))
    r, br = last["ratio_to_first"], last["baseline"]["ratio_to_first"]
    ratio += [bench._s(r[k], "{:.2f}x") for k in RATIO_KEYS] + [bench._s(br[k], "{:.2f}x") for k in RATIO_KEYS]
    return [*lines, "-" * sum(widths), _row(ratio, widths)]


def render(report: dict[str, Any]) -> str:
    cfg, nights = report["config"], report["nights"]
    per_night = nights["per_night"]
    lines = [
        f"safehaven multi-night benchmark: {len(per_night)} nights of {cfg['patients']:,} patients "
        f"(about {nights['rows_per_night_max']:,} rows a night) into one haven home; seed {cfg['seed']}",
        f"code: git {report['git']['commit'][:12]}{' + uncommitted changes' if report['git']['dirty'] else ''}, "
        f"snapshot sha256 {report['code_sha256'][:12]}; {report['machine']['cores_logical']} cores",
        "",
        "per night: stage cells are wall/CPU seconds of the Dagster steps; total = the job; "
        "peak = the worker's ru_maxrss; store = store/haven.duckdb; base = the plain baseline appending "
        "to its own file",
        *table(per_night),
        "",
    ]
    idle = nights["idle"]
    lines.append(
        f"idle run (empty incoming/): {nights['idle_run_seconds']:.1f} s for the worker process: "
        f"imports {idle['seconds_import']:.1f} s, building definitions {idle['seconds_build_definitions']:.1f} s, "
        f"job {idle['seconds_job']:.1f} s; peak {idle['peak_rss_bytes'] / bench.MIB:.0f} MiB"
        + ("" if idle["success"] else " (the run did not succeed)")
    )
    lines.append(
        "  idle job by stage (wall s): "
        + ", ".join(f"{name} {idle['stages'][name]:.1f}" for name in _stage_names([{"stages": idle["stages"]}]))
    )
    for n in per_night:
        if n["agreement"]:
            lines.append(f"night {n['night']}: pipeline and baseline DISAGREE: " + "; ".join(n["agreement"][:5]))
        if not n["success"]:
            lines.append(f"WARNING: night {n['night']} did not succeed: " + ", ".join(n["checks_failed"]))
    if not any(n["agreement"] for n in per_night):
        lines.append("agreement: pipeline and baseline agree every night (counts and published files)")
    busy = [c for c in report.get("contention", []) if c["other_cores_busy"] > 0.1]
    if busy:
        mean = sum(c["other_cores_busy"] * c["wall_s"] for c in busy) / sum(c["wall_s"] for c in busy)
        lines.append(
            f"WARNING: other processes shared the machine ({len(busy)} runs; {mean:.2f} cores busy with other "
            "work on average during them): wall times and ratios are disturbed; CPU seconds are steadier"
        )
    lines += ["", "targets (issue 22):"]
    for t in report["targets"]:
        status = {"PASS": "met", "MISS": "MISSED", "SKIP": "skip"}[t["status"]]
        extra = f"  (missed by {t['miss_by']})" if t.get("miss_by") else ""
        lines.append(f"  {status:<7}{t['target']}: {t['figure']}{extra}")
    return "\n".join(lines)


def main_nights(
    args: argparse.Namespace, patients: int, work: Path, runner: bench.Runner, code_sha: str
) -> dict[str, Any]:
    """The whole multi-night benchmark: runs, then the report."""
    report: dict[str, Any] = {
        "mode": "nights",
        "config": {"patients": patients, "seed": args.seed, "threads": args.threads or None, "nights": args.nights},
        "machine": bench._machine(),
        "versions": bench._versions(),
        "git": bench._git(),
        "code_sha256": code_sha,
    }
    report["runs"] = run_nights(args, patients, work, runner)
    report["contention"] = runner.contention
    return assemble(report)
