"""``make bench``: the whole nightly pipeline against a hand-written DuckDB baseline.

::

    python -m benchmarks.run [--patients N] [--seed S] [--keep] [--no-scaling] [--no-gx-pandas]
                             [--threads N] [--repeat N] [--trace-sql] [--nights [N]]

With ``--nights`` it runs the multi-night benchmark of ``benchmarks.nights`` instead (issue 22).

What it does, in a temporary folder (kept with ``--keep``):

1. Copies the code (``safehaven``, ``assets``, ``resources``, ``data_contracts``, ``docs``,
   ``benchmarks``) into the folder and runs every worker from that copy, so that all the runs
   of one benchmark measure the same code even while the tree is being edited. The copy's
   SHA-256 is in the report, beside the git commit.
2. Generates a synthetic drop (``safehaven.tools.synthetic.generate``) at ``--patients`` (default
   1,000,000, capped to the largest population the 999 test range allows, 909,091 patients:
   about 9.15M rows across gp_events, hospital_episodes and social_care plus 65k objections),
   and at a tenth of it for the scaling measurement.
3. Runs the nightly job through Dagster, in process, in its own subprocess
   (``benchmarks.pipeline``), on a fresh haven home holding a copy of the drop. A stage's
   seconds are the summed durations (STEP_START to STEP_SUCCESS) of its asset group's steps.
4. Runs the hand-written baseline (``benchmarks.baseline``) on the same drop, on an encrypted
   DuckDB file and again on an unencrypted one, each in its own subprocess.
5. Measures Python per-row HMAC against DuckDB SQL HMAC (``benchmarks.micro hmac``) and Great
   Expectations on a pandas frame of gp_events (``benchmarks.micro gx``).
6. Checks that the pipeline and the baseline agree: every count (valid and invalid rows,
   failures per rule, type 1 drops, haven rows, cells and suppressions) and every published
   file row for row. A baseline that did less work would be a dishonest yardstick.
7. Prints the table and PASS/MISS per target; writes everything to
   ``benchmarks/results/<UTC timestamp>.json`` with the machine and the versions used.

Each heavy part runs in its own process so the peak resident memory it reports (``ru_maxrss``)
is its own. Runs happen one after another, never in parallel; the drop's files are in the page
cache for all of them. With ``--repeat N`` the pipeline and the baseline run N times,
alternately, and each stage (and the end-to-end time) is the best of N: the usual estimate on
a machine with other work. The CPU used by other processes during every run is recorded and a
busy machine is reported: wall times are then pessimistic for both sides.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from benchmarks.common import COLLECTIONS, CONTENT, STAGES, write_json
from safehaven.core.sql import q
from safehaven.tools.synthetic import MAX_PATIENTS  # valid NHS numbers in the 999 test range

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
#: What the workers run from (copied into the scratch folder).
SNAPSHOT = ("safehaven", "assets", "resources", "data_contracts", "docs", "benchmarks")
GIB = 1 << 30
MIB = 1 << 20

#: Targets on a 2-core, 24 GiB machine (issue #8).
TARGET_E2E_RATIO = 1.5
TARGET_PSEUDO_ROWS_PER_S = 1_000_000
TARGET_PSEUDO_VS_PYTHON = 5.0
TARGET_VALIDATE_RATIO = 1.5
TARGET_PEAK_BYTES = 3 * GIB
TARGET_SCALING = 11.0
#: The disclosure audit of the whole release (all outputs, linear programming) within the publish
#: stage: its budget there, in seconds, at the default population (issue #19).
TARGET_SDC_AUDIT_S = 30.0


# --- running workers ---------------------------------------------------------------------


class Progress:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.began = time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.began:7.1f}s] {message}", file=sys.stderr, flush=True)


def _busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; steal counts as busy)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _children_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Runner:
    """Runs workers from the code snapshot, one at a time, recording how busy the machine was."""

    def __init__(self, code: Path, logs: Path, say: Progress, wait_quiet: float) -> None:
        self.code = code
        self.logs = logs
        self.say = say
        self.wait_quiet = wait_quiet
        self.contention: list[dict[str, Any]] = []

    def _wait_for_quiet(self) -> float:
        """Wait (up to ``wait_quiet`` seconds) until other processes use under 0.25 of the cores."""
        if self.wait_quiet <= 0:
            return 0.0
        began = time.perf_counter()
        cores = os.cpu_count() or 1
        while time.perf_counter() - began < self.wait_quiet:
            if psutil.cpu_percent(interval=2.0) / 100 * cores < 0.25:
                break
        return time.perf_counter() - began

    def run(
        self, module: str, args: list[str], log_name: str, env: dict[str, str] | None = None, label: str = ""
    ) -> tuple[int, float]:
        """Run ``python -m module args`` (output to ``logs/<log_name>.log``); return (exit code, seconds)."""
        waited = self._wait_for_quiet()
        cmd = [sys.executable, "-m", module, *args]
        busy0, own0 = _busy_cpu_seconds(), _children_cpu_seconds()
        load0 = os.getloadavg()[0]
        began = time.perf_counter()
        environment = {**os.environ, **(env or {})}
        environment.pop("SAFEHAVEN_CONTRACTS", None)  # the snapshot's own data_contracts
        with open(self.logs / f"{log_name}.log", "wb") as fh:
            proc = subprocess.run(cmd, cwd=self.code, stdout=fh, stderr=subprocess.STDOUT, env=environment, check=False)
        wall = time.perf_counter() - began
        own = _children_cpu_seconds() - own0
        other = max(0.0, _busy_cpu_seconds() - busy0 - own)
        self.contention.append(
            {
                "run": label or log_name,
                "wall_s": wall,
                "own_cpu_s": own,
                "other_cpu_s": other,
                "other_cores_busy": other / wall if wall else 0.0,
                "load_1min_before": load0,
                "waited_for_quiet_s": waited,
            }
        )
        return proc.returncode, wall

    def load(self, path: Path, log_name: str, what: str, code: int) -> dict[str, Any]:
        if not path.exists():
            log = self.logs / f"{log_name}.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} failed (exit {code}); last output:\n{tail}")
        return json.loads(path.read_text())


def snapshot(work: Path) -> tuple[Path, str]:
    """Copy the code the workers run into ``work/code``; return it and the SHA-256 of its files.

    The copy's modules are compiled to bytecode once, as installing a package does: where
    ``PYTHONDONTWRITEBYTECODE`` is set (as on this workplace's machines), every worker would
    otherwise compile the haven's modules from source at its start, a cost an installed haven
    never pays (the run with nothing to do counts its worker's start)."""
    code = work / "code"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", ".*")
    for name in SNAPSHOT:
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, code / name, ignore=ignore)
    digest = hashlib.sha256()
    for path in sorted(p for p in code.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(code)).encode() + b"\0" + path.read_bytes())
    compileall.compile_dir(code, quiet=1)  # as an installed package is: see the function's docstring
    return code, digest.hexdigest()


def generate(
    runner: Runner, out: Path, patients: int, seed: int, cache: Path | None
) -> tuple[Path, dict[str, int], float]:
    """The drop (or a cached copy): returns (folder, rows per collection, seconds)."""
    if cache is not None:
        folder = cache / f"p{patients}_s{seed}"
        marker = folder / ".counts.json"
        if marker.exists():
            return folder, json.loads(marker.read_text()), 0.0
        out = folder
    counts_file = out.parent / f".counts_{out.name}.json"
    code, _ = runner.run(
        "benchmarks.generate",
        ["--out", str(out), "--patients", str(patients), "--seed", str(seed), "--counts", str(counts_file)],
        f"generate_{patients}",
    )
    doc = runner.load(counts_file, f"generate_{patients}", "generating the drop", code)
    if cache is not None:
        (out / ".counts.json").write_text(json.dumps(doc["rows"]))
    return out, doc["rows"], doc["seconds"]


def run_pipeline(
    runner: Runner, drop: Path, work: Path, threads: int | None, trace_sql: bool = False, memory_limit: str = ""
) -> dict[str, Any]:
    home = work / "home"
    if home.exists():
        shutil.rmtree(home)
    for collection in COLLECTIONS:
        shutil.copytree(drop / collection, home / "incoming" / collection)
    (work / "dagster_home").mkdir(parents=True, exist_ok=True)
    out = work / "pipeline.json"
    out.unlink(missing_ok=True)
    args = ["--home", str(home), "--out", str(out)] + (["--threads", str(threads)] if threads else [])
    args += ["--trace-sql"] if trace_sql else []
    args += ["--memory-limit", memory_limit] if memory_limit else []
    code, seconds = runner.run("benchmarks.pipeline", args, work.name, {"DAGSTER_HOME": str(work / "dagster_home")})
    doc = runner.load(out, work.name, "the pipeline run", code)
    doc["seconds_process"] = seconds
    doc["exit_code"] = code
    store = home / "store" / "haven.duckdb"
    doc["store_bytes"] = store.stat().st_size if store.exists() else 0
    doc["published_dir"] = str(home / "published")
    return doc


def run_baseline(runner: Runner, drop: Path, work: Path, encrypted: bool, threads: int | None) -> dict[str, Any]:
    out = work / "baseline.json"
    out.unlink(missing_ok=True)
    args = ["--drop", str(drop), "--work", str(work), "--out", str(out)]
    args += ([] if encrypted else ["--plain"]) + (["--threads", str(threads)] if threads else [])
    code, seconds = runner.run("benchmarks.baseline", args, work.name)
    doc = runner.load(out, work.name, "the baseline run", code)
    doc["seconds_process"] = seconds
    doc["published_dir"] = str(work / "published")
    return doc


def run_micro(runner: Runner, what: str, csv: Path, work: Path, rows: int, threads: int | None) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{what}.json"
    args = [what, "--csv", str(csv), "--out", str(out), "--rows", str(rows)]
    args += ["--threads", str(threads)] if threads else []
    code, _ = runner.run("benchmarks.micro", args, f"micro_{what}")
    return runner.load(out, f"micro_{what}", f"the {what} measurement", code)


# --- combining repeats -------------------------------------------------------------------


def best_pipeline(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """One pipeline document from repeats.

    End to end, the fastest run as it ran (its job time, CPU time, steps total and stages); per
    step, the fastest of the runs (with that run's CPU and SQL seconds); peak memory, the highest.
    """
    fastest = min(docs, key=lambda d: d["seconds_job"])
    best = json.loads(json.dumps(fastest))
    best["run_stages"] = pipeline_stages(fastest)
    best["run_seconds_steps_total"] = fastest["seconds_steps_total"]
    for step in best["steps"]:
        times = [s for d in docs for s in d["steps"] if s["step"] == step["step"]]
        step.update({k: v for k, v in min(times, key=lambda s: s["seconds"]).items() if k != "peak_rss_sampled"})
        step["peak_rss_sampled"] = max(s["peak_rss_sampled"] for s in times)
    best["seconds_steps_total"] = sum(s["seconds"] for s in best["steps"])
    best["peak_rss_bytes"] = max(d["peak_rss_bytes"] for d in docs)
    best["repeats_seconds_job"] = [d["seconds_job"] for d in docs]
    return best


def best_baseline(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """End to end, the fastest run; per stage, the fastest of the runs; peak memory, the highest."""
    best = json.loads(json.dumps(min(docs, key=lambda d: d["seconds_end_to_end"])))
    for name, stage in best["stages"].items():
        fastest = min((d["stages"][name] for d in docs if name in d["stages"]), key=lambda s: s["seconds"])
        stage.update(seconds=fastest["seconds"], cpu_seconds=fastest.get("cpu_seconds"))
    for name in best.get("stage_detail", {}):
        best["stage_detail"][name] = min(d["stage_detail"][name] for d in docs if name in d.get("stage_detail", {}))
    best["peak_rss_bytes"] = max(d["peak_rss_bytes"] for d in docs)
    best["repeats_seconds_end_to_end"] = [d["seconds_end_to_end"] for d in docs]
    return best


# --- summarising -------------------------------------------------------------------------


def pipeline_stages(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Seconds, CPU seconds, rows and sampled peak RSS per asset group of one pipeline run.

    Rows are what the stage takes in: records landed, checked, registered, entering the haven
    (``haven/*`` assets: the vault's entries are derived from the same records), held in the
    haven (for the aggregates, which read it), published cells, released records.
    """
    stages: dict[str, dict[str, Any]] = {}
    for step in doc["steps"]:
        s = stages.setdefault(
            step["group"], {"seconds": 0.0, "cpu_seconds": 0.0, "rows": 0, "steps": 0, "peak_rss_sampled": 0}
        )
        s["seconds"] += step["seconds"]
        s["cpu_seconds"] += step.get("cpu_seconds") or 0.0
        s["steps"] += 1
        s["peak_rss_sampled"] = max(s["peak_rss_sampled"], step["peak_rss_sampled"])
    keys = _asset_keys()
    assets = doc["assets"]
    haven = [a for k, a in assets.items() if k.startswith(f"{keys.HAVEN}/")]
    register = keys.OBJECTION_REGISTER.to_user_string()
    for group, s in stages.items():
        if group == "pseudonymise" and haven:
            s["rows"] = sum(a["rows_in"] or 0 for a in haven)
        elif group == "aggregate" and haven:
            s["rows"] = sum(a["rows_out"] or 0 for a in haven)
        elif group == "objections" and register in assets:
            s["rows"] = assets[register]["rows_in"] or 0
        else:
            s["rows"] = sum(a["rows_in"] or 0 for a in assets.values() if a["group"] == group)
    return stages


def _asset_keys() -> Any:
    """``assets.keys``, where every asset key is built; imported when first needed, since it
    imports Dagster, which the rest of this module (it starts the measured runs) does without."""
    from assets import keys

    return keys


def _meta(doc: dict[str, Any], asset: Any, key: str) -> Any:
    """Metadata ``key`` of ``asset`` (an asset key, or its name as ``doc`` records it)."""
    name = asset if isinstance(asset, str) else asset.to_user_string()
    return doc["assets"].get(name, {}).get("metadata", {}).get(key)


def agreement(pipe: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """Differences between the pipeline's and the baseline's results (empty: they agree).

    Counts from the pipeline's asset metadata against the baseline's, and the published
    Parquet files row for row (on the baseline's columns).
    """
    keys = _asset_keys()
    counts = base["counts"]
    pairs: list[tuple[str, Any, Any]] = []
    for c in COLLECTIONS:
        pairs.append((f"{c} valid rows", _meta(pipe, keys.validated(c), "rows_out"), counts["valid"][c]))
        pairs.append((f"{c} invalid rows", _meta(pipe, keys.validated(c), "rows_invalid"), counts["rejected"][c]))
        rules = _meta(pipe, keys.validated(c), "failures_per_rule")
        if isinstance(rules, dict):
            pairs.append(
                (
                    f"{c} failures per rule",
                    dict(sorted(rules.items())),
                    dict(sorted(counts["failures_by_rule"][c].items())),
                )
            )
    for c in CONTENT:
        pairs.append((f"haven {c} rows", _meta(pipe, keys.haven(c), "rows_out"), counts["haven"][c]))
    type1 = _meta(pipe, keys.haven("gp_events"), "type1_records_dropped")
    pairs.append(("type 1 records dropped", type1, counts.get("type1_dropped")))
    for name, p in counts["published"].items():
        output = keys.published(name)
        if output.to_user_string() not in pipe["assets"]:
            pairs.append((f"{name}", "not built", "built"))
            continue
        pairs.append((f"{name} cells", _meta(pipe, output, "rows_out"), p["cells"]))
        pairs.append((f"{name} primary suppressed", _meta(pipe, output, "sdc_people_primary"), p["primary"]))
        pairs.append((f"{name} secondary suppressed", _meta(pipe, output, "sdc_people_secondary"), p["secondary"]))
    problems = [f"{what}: pipeline {a} != baseline {b}" for what, a, b in pairs if a is not None and a != b]
    if pipe.get("published_dir") and base.get("published_dir"):
        problems += _compare_published(
            Path(pipe["published_dir"]), Path(base["published_dir"]), list(counts["published"])
        )
    return problems


def _compare_published(pipe_dir: Path, base_dir: Path, names: list[str]) -> list[str]:
    import duckdb

    problems = []
    con = duckdb.connect()
    for name in names:
        a, b = pipe_dir / f"{name}.parquet", base_dir / f"{name}.parquet"
        if not a.exists() or not b.exists():
            problems.append(f"published {name}: no Parquet file to compare")
            continue
        theirs = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{a}')").fetchall()]
        ours = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{b}')").fetchall()]
        missing = [c for c in ours if c not in theirs]
        if missing:
            problems.append(f"published {name}: pipeline file lacks columns {missing}")
            continue
        cols = ", ".join(q(c) for c in ours)
        differ = con.execute(
            f"SELECT count(*) FROM ((SELECT {cols} FROM read_parquet('{a}') EXCEPT ALL "
            f"SELECT {cols} FROM read_parquet('{b}')) UNION ALL (SELECT {cols} FROM read_parquet('{b}') "
            f"EXCEPT ALL SELECT {cols} FROM read_parquet('{a}')))"
        ).fetchone()[0]
        if differ:
            problems.append(f"published {name}: {differ} rows differ between the pipeline's and the baseline's file")
    con.close()
    return problems


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in (
        "duckdb",
        "dagster",
        "great-expectations",
        "polars",
        "pandas",
        "numpy",
        "pyarrow",
        "duckdb-ext-httpfs",
        "cryptography",
    ):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist.replace("-", "_")] = "not installed"
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cpu_model": model or platform.processor(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
    }


def pseudonymisation(pipe: dict[str, Any], hmac_doc: dict[str, Any] | None) -> dict[str, Any]:
    """The pseudonymise stage split into its two jobs, with the HMAC comparisons.

    * ``haven``: the ``haven/*`` steps, which pseudonymise the records (HMAC-SHA256 in SQL once
      per person, joined back; type 1 drop; coarsening). Rows: records entering the haven.
    * ``vault``: the ``vault/*`` steps, which encrypt the direct identifiers into the identity
      vault (AES-GCM per distinct value). Rows: the same records, so the two rates add up.
    * ``stage``: both.

    ``vs_python_*`` (the issue's "at least 5x a Python per-row HMAC baseline"): the pipeline's
    own pseudonymisation (``safehaven.protect.pseudonymise.pid_join_sql``: HMAC once per person in SQL,
    joined back to every record) over Python per-row HMAC, both run by ``benchmarks.micro
    hmac`` in one process on the same gp_events NHS numbers: against the same table-to-table
    job done row by row in Python (read the table, ``hmac.new`` per row, write the pseudonyms
    back), and against a bare ``hmac.new`` loop with no I/O. ``haven_vs_python_*``: the haven
    steps' rate over the same Python rates, for context: those steps also read the landing
    records, coarsen them and write them to the encrypted store, which the Python jobs do not.
    """
    keys = _asset_keys()
    parts: dict[str, dict[str, float]] = {}
    for step in pipe["steps"]:
        if step["group"] != "pseudonymise":
            continue
        kind = "haven" if any(a.startswith(f"{keys.HAVEN}/") for a in step["assets"]) else "vault"
        for key in (kind, "stage"):
            part = parts.setdefault(key, {"seconds": 0.0, "cpu_seconds": 0.0, "steps": 0})
            part["seconds"] += step["seconds"]
            part["cpu_seconds"] += step.get("cpu_seconds") or 0.0
            part["steps"] += 1
    rows = sum(a["rows_in"] or 0 for k, a in pipe["assets"].items() if k.startswith(f"{keys.HAVEN}/"))
    out: dict[str, Any] = {"rows": rows}
    for key, part in parts.items():
        out[key] = {**part, "rows_per_s": rows / part["seconds"] if part["seconds"] else None}
    out["vault_entries"] = sum(a["rows_out"] or 0 for k, a in pipe["assets"].items() if k.startswith(f"{keys.VAULT}/"))
    if not hmac_doc or "error" in hmac_doc:
        return out
    python = {
        "table_job": hmac_doc.get("python_table_job", {}).get("rows_per_s"),
        "hmac_loop": hmac_doc["python_hmac_new"]["rows_per_s"],
    }
    mine = {
        "": hmac_doc.get("pipeline_pseudonymise", {}).get("rows_per_s"),
        "haven_": out.get("haven", {}).get("rows_per_s"),
    }
    if mine[""]:
        out["pseudonymise_rows_per_s"] = mine[""]
    for prefix, rate in mine.items():
        for name, base in python.items():
            if rate and base:
                out[f"{prefix}vs_python_{name}"] = rate / base
    out["sql_hmac_vs_python_hmac_loop"] = hmac_doc["duckdb_sql"]["rows_per_s"] / python["hmac_loop"]
    return out


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """PASS/MISS per target, with the figure and the margin."""
    out: list[dict[str, Any]] = []
    cmp = report["comparison"]
    e2e = cmp["end_to_end"]
    out.append(
        _target(
            "end-to-end <= 1.5x plain baseline",
            e2e["ratio"],
            TARGET_E2E_RATIO,
            "<=",
            f"{e2e['ratio']:.2f}x ({e2e['pipeline_s']:.1f} s vs {e2e['baseline_s']:.1f} s)",
        )
    )
    ps = report["pseudonymisation"]
    for key, name in (("haven", "pseudonymisation (haven steps)"), ("stage", "pseudonymise stage with the vault")):
        part = ps.get(key, {})
        rate = part.get("rows_per_s")
        out.append(
            _target(
                f"{name} >= 1M rows/s",
                rate,
                TARGET_PSEUDO_ROWS_PER_S,
                ">=",
                f"{rate / 1e6:.2f}M rows/s ({ps['rows']:,} rows in {part['seconds']:.1f} s)"
                if rate
                else "not measured",
            )
        )
    rate = ps.get("pseudonymise_rows_per_s")
    for key, name in (
        ("vs_python_table_job", "the same job in Python, per row"),
        ("vs_python_hmac_loop", "a bare Python hmac.new loop, no I/O"),
    ):
        value = ps.get(key)
        out.append(
            _target(
                f"pseudonymisation >= 5x {name}",
                value,
                TARGET_PSEUDO_VS_PYTHON,
                ">=",
                f"{value:.2f}x (pipeline SQL {rate / 1e6:.2f}M rows/s; haven steps "
                f"{_s(ps.get('haven_' + key), '{:.2f}x')})"
                if value and rate
                else "not measured",
            )
        )
    val = cmp["stages"].get("validate", {})
    out.append(
        _target(
            "validation <= 1.5x its baseline",
            val.get("ratio"),
            TARGET_VALIDATE_RATIO,
            "<=",
            f"{val['ratio']:.2f}x ({val['pipeline_s']:.1f} s vs {val['baseline_s']:.1f} s)"
            if val.get("ratio")
            else "not measured",
        )
    )
    peak = report["memory"]["pipeline_peak_bytes"]
    rows = report["rows_total"]
    out.append(
        _target(
            f"peak memory < 3 GiB at 10M rows (this run: {rows / 1e6:.2f}M rows)",
            peak,
            TARGET_PEAK_BYTES,
            "<",
            f"{peak / GIB:.2f} GiB",
        )
    )
    audit = report.get("disclosure_audit") or {}
    out.append(
        _target(
            f"disclosure audit of the release <= {TARGET_SDC_AUDIT_S:.0f} s (publish stage budget)",
            audit.get("seconds"),
            TARGET_SDC_AUDIT_S,
            "<=",
            f"{audit['seconds']:.1f} s for {audit.get('cells', 0):,} suppressed cells and "
            f"{audit.get('changes', 0):,} changes, {audit.get('lp_solves', 0)} LPs"
            if audit.get("seconds") is not None
            else "not measured",
        )
    )
    scaling = report.get("scaling")
    if scaling and "time_ratio" in scaling:
        out.append(
            _target(
                "10x rows costs <= 11x time",
                scaling["time_ratio"],
                TARGET_SCALING,
                "<=",
                f"{scaling['time_ratio']:.2f}x time for {scaling['rows_ratio']:.2f}x rows",
            )
        )
    else:
        why = "--no-scaling" if report["config"].get("scaling") is False else "scaling run failed"
        out.append({"target": "10x rows costs <= 11x time", "status": "SKIP", "figure": why})
    return out


def _target(name: str, value: float | None, limit: float, op: str, figure: str) -> dict[str, Any]:
    if value is None:
        return {"target": name, "status": "SKIP", "figure": figure}
    ok = {"<=": value <= limit, ">=": value >= limit, "<": value < limit}[op]
    out = {"target": name, "status": "PASS" if ok else "MISS", "figure": figure, "value": value, "limit": limit}
    if not ok:
        out["miss_by"] = (
            f"{(value / limit - 1) * 100:.0f}% over the limit"
            if op != ">="
            else f"{(1 - value / limit) * 100:.0f}% short of the limit"
        )
    return out


def compare(pipe: dict[str, Any], base: dict[str, Any], plain: dict[str, Any] | None) -> dict[str, Any]:
    """Per stage and end to end: seconds, rows/s, ratio to the baseline, encryption overhead."""
    pstages = pipeline_stages(pipe)
    stages: dict[str, Any] = {}
    names = [s for s in STAGES if s in pstages or s in base["stages"]]
    names += sorted(set(pstages) - set(names)) + sorted(set(base["stages"]) - set(names) - set(pstages))
    for name in names:
        p = pstages.get(name)
        b = base["stages"].get(name)
        q = plain["stages"].get(name) if plain else None
        row: dict[str, Any] = {"rows": (p or b or {}).get("rows", 0)}
        if p:
            row.update(
                pipeline_s=p["seconds"],
                pipeline_rows_per_s=p["rows"] / p["seconds"] if p["seconds"] else None,
                pipeline_cpu_s=p["cpu_seconds"],
                pipeline_steps=p["steps"],
                pipeline_peak_rss_sampled=p["peak_rss_sampled"],
            )
        if b:
            row.update(
                baseline_s=b["seconds"],
                baseline_rows_per_s=b["rows"] / b["seconds"] if b["seconds"] else None,
                baseline_cpu_s=b.get("cpu_seconds"),
            )
        if q and b:
            row.update(
                plain_s=q["seconds"], encryption_overhead=b["seconds"] / q["seconds"] - 1 if q["seconds"] else None
            )
        if p and b and b["seconds"]:
            row["ratio"] = p["seconds"] / b["seconds"]
            if b.get("cpu_seconds"):
                row["cpu_ratio"] = p["cpu_seconds"] / b["cpu_seconds"]
        stages[name] = row
    only_pipeline = [n for n in pstages if n not in base["stages"]]
    only_baseline = [n for n in base["stages"] if n not in pstages]
    run_stages = pipe.get("run_stages") or pstages  # end to end: one run as it ran
    excluded = sum(run_stages[n]["seconds"] for n in only_pipeline if n in run_stages)
    pipe_e2e = pipe["seconds_job"] - excluded
    pipe_cpu = pipe.get("cpu_seconds_job", 0.0) - sum(
        run_stages[n]["cpu_seconds"] for n in only_pipeline if n in run_stages
    )
    base_e2e = base["seconds_end_to_end"]
    base_cpu = base.get("cpu_seconds_end_to_end")
    e2e = {
        "pipeline_s": pipe_e2e,
        "pipeline_job_s": pipe["seconds_job"],
        "pipeline_framework_overhead_s": pipe["seconds_job"]
        - pipe.get("run_seconds_steps_total", pipe["seconds_steps_total"]),
        "pipeline_import_s": pipe["seconds_import"],
        "pipeline_build_definitions_s": pipe["seconds_build_definitions"],
        "baseline_s": base_e2e,
        "baseline_setup_s": base["seconds_setup"],
        "plain_s": plain["seconds_end_to_end"] if plain else None,
        "ratio": pipe_e2e / base_e2e,
        "pipeline_cpu_s": pipe_cpu,
        "baseline_cpu_s": base_cpu,
        "cpu_ratio": pipe_cpu / base_cpu if base_cpu else None,
        "excluded_pipeline_stages": only_pipeline,
        "excluded_pipeline_s": excluded,
        "excluded_baseline_stages": only_baseline,
        "encryption_overhead": base_e2e / plain["seconds_end_to_end"] - 1 if plain else None,
    }
    return {"stages": stages, "end_to_end": e2e}


# --- printing ----------------------------------------------------------------------------


def _s(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _pct(x: float | None) -> float | None:
    return None if x is None else x * 100


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e5 else f"{x / 1e3:.1f}k"


def _render_header(report: dict[str, Any]) -> list[str]:
    """The run's size, the machine, the versions and the code it measured."""
    cfg = report["config"]
    m = report["machine"]
    return [
        f"safehaven benchmark: {cfg['patients']:,} patients, {report['rows_total']:,} rows "
        f"({', '.join(f'{k} {v:,}' for k, v in report['rows'].items())}); seed {cfg['seed']}"
        + (f"; best of {cfg['repeat']} runs" if cfg.get("repeat", 1) > 1 else ""),
        f"machine: {m['cores_logical']} cores ({m['cpu_model']}), {m['memory_bytes'] / GIB:.1f} GiB; "
        f"DuckDB threads: {cfg['threads'] or 'default'}; "
        + ", ".join(
            f"{k} {v}"
            for k, v in report["versions"].items()
            if k in ("python", "duckdb", "dagster", "great_expectations", "polars")
        ),
        f"code: git {report['git']['commit'][:12]}{' + uncommitted changes' if report['git']['dirty'] else ''}"
        f", snapshot sha256 {report['code_sha256'][:12]}",
        "",
    ]


STAGE_TABLE_HEAD = (
    f"{'stage':<14}{'rows':>12}{'pipeline s':>12}{'rows/s':>9}{'baseline s':>12}{'rows/s':>9}"
    f"{'ratio':>8}{'cpu ratio':>10}{'plain s':>9}{'encr.':>7}{'peak MiB':>10}"
)


def _render_stage_row(name: str, r: dict[str, Any]) -> str:
    """One stage of the comparison table, noting a stage only one side has."""
    note = "" if "pipeline_s" in r else "  (baseline only)"
    if "baseline_s" not in r:
        note = "  (pipeline only: no baseline; not in end-to-end)"
    peak = r.get("pipeline_peak_rss_sampled")
    return (
        f"{name:<14}{r['rows']:>12,}{_s(r.get('pipeline_s')):>12}{_rate(r.get('pipeline_rows_per_s')):>9}"
        f"{_s(r.get('baseline_s')):>12}{_rate(r.get('baseline_rows_per_s')):>9}"
        f"{_s(r.get('ratio'), '{:.2f}x'):>8}{_s(r.get('cpu_ratio'), '{:.2f}x'):>10}{_s(r.get('plain_s')):>9}"
        f"{_s(_pct(r.get('encryption_overhead')), '{:+.0f}%'):>7}"
        f"{_s(peak / MIB if peak else None, '{:.0f}'):>10}{note}"
    )


def _render_end_to_end(report: dict[str, Any]) -> list[str]:
    """The framework line, the end-to-end line and what the pipeline's figure leaves out."""
    e = report["comparison"]["end_to_end"]
    return [
        f"{'(framework)':<14}{'':>12}{e['pipeline_framework_overhead_s']:>12.1f}{'':>9}"
        f"{e['baseline_setup_s']:>12.1f}   Dagster run outside steps / baseline connect + attach",
        "-" * len(STAGE_TABLE_HEAD),
        f"{'end-to-end':<14}{report['rows_total']:>12,}{e['pipeline_s']:>12.1f}"
        f"{_rate(report['rows_total'] / e['pipeline_s']):>9}{e['baseline_s']:>12.1f}"
        f"{_rate(report['rows_total'] / e['baseline_s']):>9}{e['ratio']:>7.2f}x"
        f"{_s(e.get('cpu_ratio'), '{:.2f}x'):>10}{_s(e.get('plain_s')):>9}"
        f"{_s(_pct(e.get('encryption_overhead')), '{:+.0f}%'):>7}"
        f"{report['memory']['pipeline_peak_bytes'] / MIB:>10.0f}",
        f"  pipeline: the Dagster job took {e['pipeline_job_s']:.1f} s"
        + (
            f", of which {', '.join(e['excluded_pipeline_stages'])} {e['excluded_pipeline_s']:.1f} s (no baseline)"
            if e["excluded_pipeline_stages"]
            else ""
        )
        + f"; not counted: {e['pipeline_import_s']:.1f} s imports, {e['pipeline_build_definitions_s']:.1f} s "
        "building definitions. ratio = wall seconds; cpu ratio = CPU seconds (less disturbed by other load).",
    ]


def _render_stages(report: dict[str, Any]) -> list[str]:
    """The per-stage comparison table, then end to end."""
    lines = [STAGE_TABLE_HEAD, "-" * len(STAGE_TABLE_HEAD)]
    lines += [_render_stage_row(name, r) for name, r in report["comparison"]["stages"].items()]
    return lines + _render_end_to_end(report)


def _render_slowest(report: dict[str, Any]) -> list[str]:
    """The ten slowest pipeline steps and, when traced, the slowest store statements."""
    steps = sorted(report["pipeline"]["steps"], key=lambda x: -x["seconds"])[:10]
    lines = ["", "slowest pipeline steps:"]
    for x in steps:
        where = f"; {x['sql_seconds']:.1f} s in {x['sql_statements']} store statements" if "sql_seconds" in x else ""
        lines.append(
            f"  {x['seconds']:7.1f} s  cpu {x.get('cpu_seconds', 0):6.1f} s  "
            f"{x['peak_rss_sampled'] / MIB:6.0f} MiB  {x['step']} ({x['group']}{where})"
        )
    trace = report["pipeline"].get("sql_trace")
    if trace:
        lines.append("slowest store statements (--trace-sql; fastest run):")
        lines += [
            f"  {t['seconds']:7.1f} s  cpu {t['cpu_seconds']:6.1f} s  x{t['calls']:<3} {t['step']}: {t['sql'][:160]}"
            for t in trace["statements"][:15]
        ]
    return lines


def _render_disclosure_audit(report: dict[str, Any]) -> list[str]:
    """The publish stage's disclosure audit and joint protection, when measured."""
    audit = report.get("disclosure_audit") or {}
    if audit.get("seconds") is None:
        return []
    joint = audit.get("joint") or {}
    parts = [
        f"disclosure audit (publish): {audit['seconds']:.2f} s",
        f"of the {_s(audit.get('publish_stage_s'))} s publish stage;",
        f"{audit.get('cells', 0):,} suppressed cells and {audit.get('changes', 0):,} changes audited,",
        f"{audit.get('in_relations', 0):,} in relations, {audit.get('blocks', 0)} blocks,",
        f"{audit.get('lp_solves', 0)} LPs, {audit.get('failing', 0)} failing;",
        f"joint protection of discharge_to_social_care: {_s(joint.get('seconds'), '{:.2f}')} s,",
        f"{joint.get('iterations', '-')} round(s)",
    ]
    return ["", " ".join(parts)]


def _render_memory(report: dict[str, Any]) -> list[str]:
    """Peak memory of the pipeline and the baselines."""
    mem = report["memory"]
    return [
        "",
        f"peak memory (ru_maxrss): pipeline {mem['pipeline_peak_bytes'] / GIB:.2f} GiB "
        f"(highest sampled in {mem['pipeline_peak_step']}), baseline {mem['baseline_peak_bytes'] / GIB:.2f} GiB"
        + (f", baseline unencrypted {mem['plain_peak_bytes'] / GIB:.2f} GiB" if mem.get("plain_peak_bytes") else ""),
    ]


def _render_pseudonymisation(report: dict[str, Any]) -> list[str]:
    """Pseudonymisation rates beside the HMAC comparison, when it ran."""
    h = report.get("hmac")
    ps = report.get("pseudonymisation") or {}
    if not h or "error" in h:
        return []
    return [
        "pseudonymisation: haven steps "
        f"{_rate(ps.get('haven', {}).get('rows_per_s'))} rows/s, identity vault "
        f"{_rate(ps.get('vault', {}).get('rows_per_s'))} rows/s ({ps.get('vault_entries', 0):,} entries), "
        f"stage {_rate(ps.get('stage', {}).get('rows_per_s'))} rows/s; on {h['rows']:,} gp_events NHS "
        f"numbers: the pipeline's pseudonymisation (HMAC once per person in SQL, joined back) "
        f"{_rate(h.get('pipeline_pseudonymise', {}).get('rows_per_s'))} rows/s, DuckDB SQL HMAC per row "
        f"{_rate(h['duckdb_sql']['rows_per_s'])} rows/s, Python hmac.new loop "
        f"{_rate(h['python_hmac_new']['rows_per_s'])} rows/s, Python hashlib loop "
        f"{_rate(h['python_hashlib_copy']['rows_per_s'])} rows/s, Python table job "
        f"{_rate(h.get('python_table_job', {}).get('rows_per_s'))} rows/s"
    ]


def _render_validation(report: dict[str, Any]) -> list[str]:
    """Great Expectations on pandas beside the pipeline's validation, or why it was not measured."""
    g = report.get("gx_pandas")
    val = report.get("validate_gp_events", {})
    if g and "error" not in g:
        return [
            f"validation of gp_events: GX {g['versions']['great_expectations']} on pandas "
            f"{g['seconds_validate']:.1f} s for {g['expectations']} expectations on {g['rows']:,} rows "
            f"(+ {g['seconds_load_pandas']:.1f} s reading the CSV into pandas; "
            f"peak {g['peak_rss_bytes'] / GIB:.2f} GiB); "
            f"pipeline step {_s(val.get('pipeline_s'))} s; baseline {_s(val.get('baseline_s'))} s "
            f"({val.get('rules', '?')} rules)"
        ]
    if not report["config"].get("gx_pandas"):
        return ["validation: GX on pandas not measured (--no-gx-pandas)"]
    return []


def _render_scaling(report: dict[str, Any]) -> list[str]:
    """How time grew from the small run to the large one, when both ran."""
    sc = report.get("scaling")
    if not (sc and "time_ratio" in sc):
        return []
    return [
        f"scaling: {sc['small_patients']:,} patients ({sc['small_rows']:,} rows): pipeline {sc['small_s']:.1f} s, "
        f"baseline {sc['small_baseline_s']:.1f} s; {sc['large_patients']:,} patients ({sc['large_rows']:,} rows): "
        f"pipeline {sc['large_s']:.1f} s, baseline {sc['large_baseline_s']:.1f} s; pipeline time "
        f"x{sc['time_ratio']:.2f} (baseline x{sc['baseline_time_ratio']:.2f}) for rows x{sc['rows_ratio']:.2f}; "
        f"CPU seconds x{sc['cpu_time_ratio']:.2f} (baseline x{_s(sc.get('baseline_cpu_time_ratio'), '{:.2f}')})"
    ]


def _render_agreement(report: dict[str, Any]) -> list[str]:
    """Whether the pipeline and the baseline agree on every count and published row."""
    agree = report["agreement"]
    return [
        "agreement: pipeline and baseline "
        + (
            "agree on every count (valid/invalid rows, failures per rule, type 1 drops, haven rows, cells, "
            "suppressions) and every published file row for row"
            if not agree
            else "DISAGREE: " + "; ".join(agree)
        )
    ]


def _render_failures(report: dict[str, Any]) -> list[str]:
    """A warning for a pipeline run that did not succeed and for each phase that failed."""
    lines: list[str] = []
    if not report["pipeline_success"]:
        lines.append("WARNING: the pipeline run did not succeed: " + ", ".join(report.get("checks_failed") or []))
    for phase, error in report.get("errors", {}).items():
        lines.append(f"WARNING: {phase} failed: {error.splitlines()[-1] if error else ''}")
    return lines


def _mean_busy(contention: list[dict[str, Any]], prefix: str) -> float:
    """Other cores busy during the ``prefix`` runs (full size, encrypted), weighted by wall seconds."""
    runs = [c for c in contention if c["run"].startswith(prefix) and not {"small", "plain"} & set(c["run"].split("_"))]
    return sum(c["other_cores_busy"] * c["wall_s"] for c in runs) / max(1e-9, sum(c["wall_s"] for c in runs))


def _render_contention(report: dict[str, Any]) -> list[str]:
    """A warning when other processes shared the machine during the runs."""
    contention = report.get("contention", [])
    if not any(c["other_cores_busy"] > 0.1 for c in contention):
        return []
    return [
        f"WARNING: other processes shared the machine: on average {_mean_busy(contention, 'pipeline_'):.2f} of the "
        f"{report['machine']['cores_logical']} cores were busy with other work during the pipeline runs, "
        f"{_mean_busy(contention, 'baseline_'):.2f} during the baseline runs. Wall times are pessimistic, and a ratio "
        "is biased when the two sides were disturbed differently; the cpu ratio is the steadier figure. "
        "Rerun on a quiet machine (--repeat, --wait-quiet) for headline figures."
    ]


def _render_targets(report: dict[str, Any]) -> list[str]:
    """Each target with its status and figure."""
    lines = ["", "targets (2 cores, 24 GiB):"]
    for t in report["targets"]:
        extra = f"  (missed by {t['miss_by']})" if t.get("miss_by") else ""
        lines.append(f"  {t['status']:<5} {t['target']}: {t['figure']}{extra}")
    return lines


#: the report's sections, in print order
RENDER_SECTIONS: tuple[Callable[[dict[str, Any]], list[str]], ...] = (
    _render_header,
    _render_stages,
    _render_slowest,
    _render_disclosure_audit,
    _render_memory,
    _render_pseudonymisation,
    _render_validation,
    _render_scaling,
    _render_agreement,
    _render_failures,
    _render_contention,
    _render_targets,
)


def render(report: dict[str, Any]) -> str:
    """The report as the text the harness prints, section by section."""
    return "\n".join(line for section in RENDER_SECTIONS for line in section(report))


# --- main --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description="The whole nightly pipeline against a plain-DuckDB baseline."
    )
    p.add_argument(
        "--patients",
        type=int,
        default=1_000_000,
        help=f"population size (default 1,000,000, capped to the {MAX_PATIENTS:,} valid 999 test numbers)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (drops, stores, logs)")
    p.add_argument("--no-scaling", action="store_true", help="skip the run at patients/10")
    p.add_argument("--no-gx-pandas", action="store_true", help="skip Great Expectations on pandas")
    p.add_argument("--threads", type=int, default=0, help="DuckDB threads (default: DuckDB's, the core count)")
    p.add_argument("--repeat", type=int, default=1, help="runs of the pipeline and the baseline; best of N")
    p.add_argument("--no-plain", action="store_true", help="skip the unencrypted baseline")
    p.add_argument(
        "--hmac-rows",
        type=int,
        default=0,
        help="cap on gp_events NHS numbers for the HMAC comparison (0: all, as the pipeline sees them)",
    )
    p.add_argument("--gx-rows", type=int, default=0, help="cap on gp_events rows for GX on pandas (0: all)")
    p.add_argument("--work", type=Path, default=None, help="parent of the scratch folder (default: the system's)")
    p.add_argument("--drop-cache", type=Path, default=None, help="reuse generated drops from this folder")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        help="before each run, wait up to this many seconds for other processes to go quiet",
    )
    p.add_argument(
        "--trace-sql",
        action="store_true",
        help="profile: time every statement the pipeline runs on the store and list the slowest "
        "(adds a Python call per statement)",
    )
    p.add_argument(
        "--nights",
        type=int,
        nargs="?",
        const=12,
        default=0,
        help="multi-night benchmark: N successive monthly drops into one haven home, one run a night, "
        "then a run with nothing to do (--nights alone: 12); the single-night report is skipped",
    )
    p.add_argument(
        "--memory-limit",
        default="",
        help="the haven resource's memory_limit for the pipeline runs (e.g. 1GB; default: the haven's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument(
        "--rebuild", type=Path, default=None, help="recompute and print a report from its results JSON (no runs)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from benchmarks import nights  # imports this module

    args = build_parser().parse_args(argv)
    if args.rebuild:
        report = json.loads(args.rebuild.read_text())
        report = nights.assemble(report) if report.get("mode") == "nights" else assemble(report)
        write_json(args.rebuild, report)
        print((nights.render if report.get("mode") == "nights" else render)(report))
        return 0
    if args.patients > MAX_PATIENTS:
        print(
            f"note: {args.patients:,} patients capped to {MAX_PATIENTS:,}, the valid NHS numbers in the 999 test range",
            file=sys.stderr,
        )
    patients = min(args.patients, MAX_PATIENTS)
    say = Progress(args.quiet)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="safehaven-bench-", dir=args.work))
    logs = work / "logs"
    logs.mkdir()
    started = datetime.now(UTC)
    say(f"working in {work}")
    try:
        report = _run_nights(args, patients, work, logs, say) if args.nights else _run(args, patients, work, logs, say)
    except Exception:
        say(f"failed; scratch folder and logs kept in {work}")
        raise
    report["started"] = started.isoformat(timespec="seconds")
    report["command"] = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    report["work"] = str(work) if args.keep else None
    path = args.results / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    write_json(path, report)
    print((nights.render if args.nights else render)(report))
    print(f"\nresults: {path}")
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _run_nights(args: argparse.Namespace, patients: int, work: Path, logs: Path, say: Progress) -> dict[str, Any]:
    from benchmarks import nights

    code, code_sha = snapshot(work)
    runner = Runner(code, logs, say, args.wait_quiet)
    return nights.main_nights(args, patients, work, runner, code_sha)


def _run(args: argparse.Namespace, patients: int, work: Path, logs: Path, say: Progress) -> dict[str, Any]:
    threads = args.threads or None
    repeat = max(1, args.repeat)
    code, code_sha = snapshot(work)
    runner = Runner(code, logs, say, args.wait_quiet)
    cache = args.drop_cache.resolve() if args.drop_cache else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}

    say(f"generating the synthetic drop: {patients:,} patients")
    drop, rows, gen_s = generate(runner, work / "drop", patients, args.seed, cache)
    say(f"  {sum(rows.values()):,} rows in {gen_s:.1f} s")

    pipes, bases, plains = [], [], []
    for i in range(repeat):
        n = f" ({i + 1}/{repeat})" if repeat > 1 else ""
        say(f"pipeline: the Dagster nightly job, in process, in its own subprocess{n}")
        pipes.append(
            run_pipeline(
                runner, drop, work / f"pipeline_{i}", threads, trace_sql=args.trace_sql, memory_limit=args.memory_limit
            )
        )
        say(f"  job {pipes[-1]['seconds_job']:.1f} s, peak {pipes[-1]['peak_rss_bytes'] / GIB:.2f} GiB")
        say(f"baseline: hand-written DuckDB SQL, encrypted file{n}")
        bases.append(run_baseline(runner, drop, work / f"baseline_{i}", True, threads))
        say(f"  {bases[-1]['seconds_end_to_end']:.1f} s")
        if not args.no_plain:
            say(f"baseline: unencrypted file{n}")
            plains.append(run_baseline(runner, drop, work / f"baseline_plain_{i}", False, threads))
            say(f"  {plains[-1]['seconds_end_to_end']:.1f} s")
    report: dict[str, Any] = {
        "config": {
            "patients": patients,
            "seed": args.seed,
            "threads": threads,
            "repeat": repeat,
            "gx_pandas": not args.no_gx_pandas,
            "scaling": not args.no_scaling,
            "hmac_rows": args.hmac_rows,
            "gx_rows": args.gx_rows,
            "trace_sql": args.trace_sql,
        },
        "machine": _machine(),
        "versions": _versions(),
        "git": _git(),
        "code_sha256": code_sha,
        "rows": rows,
        "rows_total": sum(rows.values()),
        "seconds_generate": gen_s,
        "runs": {"pipeline": pipes, "baseline": bases, "plain": plains},
    }
    report["agreement"] = [
        f"run {i + 1}: {d}" if repeat > 1 else d for i, p in enumerate(pipes) for d in agreement(p, bases[0])
    ]

    gp_csv = next((drop / "gp_events").glob("*.csv"))
    say(f"Python HMAC vs DuckDB SQL HMAC ({min(args.hmac_rows or rows['gp_events'], rows['gp_events']):,} NHS numbers)")
    try:
        report["hmac"] = run_micro(runner, "hmac", gp_csv, work / "micro", args.hmac_rows, threads)
    except Exception:
        errors["hmac"] = traceback.format_exc()
    if not args.no_gx_pandas:
        say(f"Great Expectations on pandas ({args.gx_rows or rows['gp_events']:,} gp_events rows)")
        try:
            report["gx_pandas"] = run_micro(runner, "gx", gp_csv, work / "micro", args.gx_rows, threads)
        except Exception:
            errors["gx_pandas"] = traceback.format_exc()

    if not args.no_scaling:
        small = max(1, patients // 10)
        try:
            say(f"scaling: generating {small:,} patients")
            sdrop, srows, _ = generate(runner, work / "drop_small", small, args.seed, cache)
            spipes, sbases = [], []
            for i in range(repeat):
                say("scaling: pipeline")
                spipes.append(
                    run_pipeline(runner, sdrop, work / f"pipeline_small_{i}", threads, memory_limit=args.memory_limit)
                )
                say("scaling: baseline")
                sbases.append(run_baseline(runner, sdrop, work / f"baseline_small_{i}", True, threads))
            report["runs"].update(small_pipeline=spipes, small_baseline=sbases)
            report["small"] = {
                "patients": small,
                "rows": srows,
                "agreement": agreement(best_pipeline(spipes), sbases[0]),
            }
        except Exception:
            errors["scaling"] = traceback.format_exc()
    report["errors"] = errors
    report["contention"] = runner.contention
    return assemble(report)


def assemble(report: dict[str, Any]) -> dict[str, Any]:
    """Everything derived from the raw runs in ``report["runs"]``: comparison, memory, scaling, targets.

    Also used by ``--rebuild`` to recompute a report from its JSON.
    """
    from benchmarks.baseline import load_code_lists, rules

    runs = report["runs"]
    pipe, base = best_pipeline(runs["pipeline"]), best_baseline(runs["baseline"])
    plain = best_baseline(runs["plain"]) if runs.get("plain") else None
    comparison = compare(pipe, base, plain)
    peak_step = max(pipe["steps"], key=lambda s: s["peak_rss_sampled"])["step"] if pipe["steps"] else "-"
    gp_validated = _asset_keys().validated("gp_events").to_python_identifier()  # its step's name
    gp_step = next((s for s in pipe["steps"] if s["step"] == gp_validated), None)
    report.update(
        {
            "comparison": comparison,
            "memory": {
                "pipeline_peak_bytes": pipe["peak_rss_bytes"],
                "pipeline_peak_step": peak_step,
                "baseline_peak_bytes": base["peak_rss_bytes"],
                "plain_peak_bytes": plain["peak_rss_bytes"] if plain else None,
            },
            "validate_gp_events": {
                "pipeline_s": gp_step["seconds"] if gp_step else None,
                "baseline_s": base.get("stage_detail", {}).get("validate.gp_events"),
                "rules": len(rules("gp_events", load_code_lists())[1]),
            },
            "pipeline_success": all(p["success"] for p in runs["pipeline"]),
            "checks_failed": sorted({c for p in runs["pipeline"] for c in p["checks_failed"]}),
            "pipeline": pipe,
            "baseline": base,
            "baseline_plain": plain,
        }
    )
    if runs.get("small_pipeline") and runs.get("small_baseline"):
        spipe, sbase = best_pipeline(runs["small_pipeline"]), best_baseline(runs["small_baseline"])
        small_cmp = compare(spipe, sbase, None)
        large, small = comparison["end_to_end"], small_cmp["end_to_end"]
        small_rows = sum(report["small"]["rows"].values())
        report["scaling"] = {
            "small_patients": report["small"]["patients"],
            "large_patients": report["config"]["patients"],
            "small_rows": small_rows,
            "large_rows": report["rows_total"],
            "rows_ratio": report["rows_total"] / small_rows,
            "small_s": small["pipeline_s"],
            "large_s": large["pipeline_s"],
            "time_ratio": large["pipeline_s"] / small["pipeline_s"],
            "small_baseline_s": small["baseline_s"],
            "large_baseline_s": large["baseline_s"],
            "baseline_time_ratio": large["baseline_s"] / small["baseline_s"],
            "cpu_time_ratio": large["pipeline_cpu_s"] / small["pipeline_cpu_s"],
            "baseline_cpu_time_ratio": (
                large["baseline_cpu_s"] / small["baseline_cpu_s"] if small["baseline_cpu_s"] else None
            ),
            "small_stages": small_cmp["stages"],
            "small_pipeline_peak_bytes": spipe["peak_rss_bytes"],
            "small_agreement": report["small"]["agreement"],
        }
    report["pseudonymisation"] = pseudonymisation(report["pipeline"], report.get("hmac"))
    report["disclosure_audit"] = disclosure_audit(report["pipeline"])
    report["targets"] = targets(report)
    return report


def disclosure_audit(pipe: dict[str, Any]) -> dict[str, Any]:
    """The release's disclosure audit (publish asset metadata) and the joint protection of the linked output."""
    keys = _asset_keys()
    meta = _meta_all(pipe, keys.PUBLISHED_FILES.to_user_string())
    joint = _meta_all(pipe, keys.published("discharge_to_social_care").to_user_string())
    publish = pipeline_stages(pipe).get("publish", {})
    out = {k.removeprefix("audit_"): v for k, v in meta.items() if k.startswith("audit_")}
    out["publish_stage_s"] = publish.get("seconds")
    out["joint"] = {k.removeprefix("audit_"): v for k, v in joint.items() if k.startswith("audit_")}
    return out


def _meta_all(doc: dict[str, Any], asset: str) -> dict[str, Any]:
    return doc["assets"].get(asset, {}).get("metadata", {})


if __name__ == "__main__":
    raise SystemExit(main())
