"""Worker: run a night (each collection's intake job with something waiting, then the nightly
job; ``assets.runner.night_jobs``) through Dagster, in process, and time every step.

Run by ``benchmarks.run`` in its own subprocess, so that the peak memory it reports
(``ru_maxrss``) is the pipeline's own::

    python -m benchmarks.pipeline --home DIR --out result.json [--threads N]

``DIR/incoming/`` must hold the drop. The job runs on an ephemeral Dagster instance (nothing is
written to ``$DAGSTER_HOME``). Per-step seconds come from the run's STEP_START and
STEP_SUCCESS/STEP_FAILURE event timestamps; each step is put in the stage of the asset(s) it
materialised (or checked): the asset's ``safehaven/stage`` tag, or its ``group_name`` without
one. Rows come from the assets' ``rows_in``/``rows_out`` metadata. A sampling thread records
the resident set size every 100 ms so the report can say which stage holds the peak;
``ru_maxrss`` is the exact peak.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import bisect  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402

from benchmarks.common import peak_rss_bytes, write_json  # noqa: E402


class RssSampler(threading.Thread):
    """Samples this process's RSS and CPU seconds (wall-clock timestamp, bytes, seconds)."""

    def __init__(self, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.cpu: list[tuple[float, float]] = []
        self._stop_event = threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        while not self._stop_event.is_set():
            now = time.time()
            self.samples.append((now, self._proc.memory_info().rss))
            self.cpu.append((now, time.process_time()))
            self._stop_event.wait(self.interval)

    def cpu_at(self, t: float) -> float:
        """Process CPU seconds at wall time ``t``, interpolated between samples."""
        i = bisect.bisect_left(self.cpu, (t, -1.0))
        if i <= 0:
            return self.cpu[0][1] if self.cpu else 0.0
        if i >= len(self.cpu):
            return self.cpu[-1][1]
        (t0, c0), (t1, c1) = self.cpu[i - 1], self.cpu[i]
        return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak_between(self, start: float, end: float) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)


class TracedConnection:
    """A store connection that times every ``execute``/``executemany`` (``--trace-sql``).

    Only for profiling runs: it adds a Python call per statement. Statements are recorded with
    their wall-clock start (to place them in a step), wall and CPU seconds and their text,
    whitespace collapsed and cut to 300 characters (SQL text, never bound parameters).
    """

    def __init__(self, con: Any, sink: list[tuple[float, str, float, float]]) -> None:
        self._con = con
        self._sink = sink

    def _timed(self, method: str, query: Any, *args: Any, **kwargs: Any) -> Any:
        began, wall, cpu = time.time(), time.perf_counter(), time.process_time()
        try:
            return getattr(self._con, method)(query, *args, **kwargs)
        finally:
            text = " ".join(str(query).split())[:300]
            self._sink.append((began, text, time.perf_counter() - wall, time.process_time() - cpu))

    def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        return self._timed("execute", query, *args, **kwargs)

    def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        return self._timed("executemany", query, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def __enter__(self) -> TracedConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self._con.close()


def install_trace(sink: list[tuple[float, str, float, float]]) -> None:
    """Make ``Store.connect`` hand out traced connections (in this process only)."""
    from contextlib import contextmanager

    import safehaven.core.store as store

    original = store.Store.connect

    @contextmanager
    def connect(self: Any, *args: Any, **kwargs: Any) -> Any:
        with original(self, *args, **kwargs) as con:
            traced = TracedConnection(con, sink)
            # answered as the connection itself is: the catalog look-ups ``store._table`` makes
            # without a statement for a connection the store opened would otherwise each be a
            # ``pragma_table_info`` statement here (592 of an idle run's 1,574 statements)
            store._OPENED_BY[traced] = store._OPENED_BY[con]  # type: ignore[index]
            try:
                yield traced
            finally:
                store._OPENED_BY.pop(traced, None)  # type: ignore[call-overload]

    store.Store.connect = connect  # type: ignore[method-assign]


def summarise_trace(
    trace: list[tuple[float, str, float, float]], steps: list[dict[str, Any]], top: int = 40
) -> dict[str, Any]:
    """The statements that took longest (summed per step and text), and each step's SQL total.

    A step's time outside its statements is Python (hashing, encryption, Dagster) or waiting.
    """
    spans = [(s["started"], s["started"] + s["seconds"], s["step"]) for s in steps]
    totals: dict[tuple[str, str], list[float]] = {}
    per_step: dict[str, list[float]] = {}
    for began, text, wall, cpu in trace:
        step = next((name for lo, hi, name in spans if lo <= began <= hi), "-")
        for agg in (totals.setdefault((step, text), [0.0, 0.0, 0]), per_step.setdefault(step, [0.0, 0.0, 0])):
            agg[0] += wall
            agg[1] += cpu
            agg[2] += 1
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "statements": [
            {"step": step, "sql": text, "seconds": w, "cpu_seconds": c, "calls": int(n)}
            for (step, text), (w, c, n) in ranked
        ],
        "steps": {
            step: {"sql_seconds": w, "sql_cpu_seconds": c, "statements": int(n)} for step, (w, c, n) in per_step.items()
        },
    }


#: The asset tag naming an asset's pipeline stage; without it, the asset's group is its stage.
STAGE_TAG = "safehaven/stage"


def stage_of(node: Any) -> str:
    """An asset's stage: its ``safehaven/stage`` tag if it has one, else its group name."""
    tags = getattr(node, "tags", None) or {}
    return tags.get(STAGE_TAG) or node.group_name or "default"


@dataclass
class _RunEvents:
    """What the nightly job's event log says, per step: start, end, assets, groups; and failed checks."""

    group_of: dict[Any, str | None]
    starts: dict[str, float] = field(default_factory=dict)
    ends: dict[str, tuple[float, str]] = field(default_factory=dict)
    step_assets: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    step_groups: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    assets: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks_failed: list[str] = field(default_factory=list)

    def group(self, key: Any) -> str:
        """The stage group of an asset key ("default" when it has none)."""
        return self.group_of.get(key) or "default"

    def step_started(self, step: str, record: Any, event: Any) -> None:
        """A STEP_START event."""
        self.starts[step] = record.timestamp

    def step_ended(self, step: str, record: Any, event: Any) -> None:
        """A STEP_SUCCESS or STEP_FAILURE event."""
        self.ends[step] = (record.timestamp, event.event_type_value)

    def materialised(self, step: str, record: Any, event: Any) -> None:
        """An ASSET_MATERIALIZATION event: the asset, its group and its plain metadata."""
        mat = event.event_specific_data.materialization
        key = mat.asset_key
        self.step_assets[step].add(key.to_user_string())
        self.step_groups[step].add(self.group(key))
        meta = {
            k: v.value
            for k, v in mat.metadata.items()
            if isinstance(v.value, (int, float, str, dict, list)) and not isinstance(v.value, bool)
        }
        self.assets[key.to_user_string()] = {
            "step": step,
            "group": self.group(key),
            "rows_in": meta.get("rows_in"),
            "rows_out": meta.get("rows_out"),
            "metadata": meta,
        }

    def checked(self, step: str, record: Any, event: Any) -> None:
        """An ASSET_CHECK_EVALUATION event: the asset's group, and the check if it failed."""
        evaluation = event.event_specific_data
        key = evaluation.asset_key
        self.step_groups[step].add(self.group(key))
        if not evaluation.passed:
            self.checks_failed.append(f"{key.to_user_string()}:{evaluation.check_name}")


EVENT_HANDLERS: dict[str, Callable[[_RunEvents, str, Any, Any], None]] = {
    "STEP_START": _RunEvents.step_started,
    "STEP_SUCCESS": _RunEvents.step_ended,
    "STEP_FAILURE": _RunEvents.step_ended,
    "ASSET_MATERIALIZATION": _RunEvents.materialised,
    "ASSET_CHECK_EVALUATION": _RunEvents.checked,
}


def _read_events(instance: Any, run_ids: list[str], group_of: dict[Any, str | None]) -> _RunEvents:
    """Gather the step events of a night's runs (those without a step are skipped)."""
    events = _RunEvents(group_of)
    for run_id in run_ids:
        for record in instance.all_logs(run_id):
            event = record.dagster_event
            if event is None or not event.step_key:
                continue
            handler = EVENT_HANDLERS.get(event.event_type_value)
            if handler is not None:
                handler(events, event.step_key, record, event)
    return events


#: the stage groups of a collection's intake step (``assets.intake``: landing and validation in one step)
INTAKE_GROUPS = ["ingest", "validate"]


def _split_intake(record: dict[str, Any], events: _RunEvents) -> list[dict[str, Any]]:
    """An intake step as its two stages: validation's seconds are its own clock (the validated
    asset's ``seconds`` metadata, ``total``), landing the rest; CPU split in the same proportion."""
    validated = [a for a in record["assets"] if a.startswith("validated/")]
    timed = events.assets.get(validated[0], {}).get("metadata", {}).get("seconds") if validated else None
    total = timed.get("total", 0.0) if isinstance(timed, dict) else 0.0
    share = min(1.0, total / record["seconds"]) if record["seconds"] else 0.0
    ingest = {**record, "group": "ingest", "assets": [a for a in record["assets"] if a not in validated]}
    validate = {**record, "group": "validate", "assets": validated, "started": record["started"]}
    ingest["seconds"], validate["seconds"] = record["seconds"] * (1 - share), record["seconds"] * share
    ingest["cpu_seconds"], validate["cpu_seconds"] = record["cpu_seconds"] * (1 - share), record["cpu_seconds"] * share
    validate["step"] = record["step"] + " (validation)"
    return [ingest, validate]


def _step_groups(events: _RunEvents, step: str) -> list[str]:
    """A step's stage groups; for a step that failed before materialising, from its asset key."""
    groups = sorted(events.step_groups.get(step, set()))
    if not groups:
        groups = sorted({g for k, g in events.group_of.items() if k.to_python_identifier() == step}) or ["default"]
    return groups


def _steps(events: _RunEvents, sampler: RssSampler, wall_end: float) -> list[dict[str, Any]]:
    """One record per step in start order: its group, assets, seconds, CPU, status and sampled peak RSS."""
    steps: list[dict[str, Any]] = []
    for step, start in sorted(events.starts.items(), key=lambda kv: kv[1]):
        end, status = events.ends.get(step, (wall_end, "STEP_INCOMPLETE"))
        groups = _step_groups(events, step)
        record = {
            "step": step,
            "started": start,
            "group": groups[0] if len(groups) == 1 else "+".join(groups),
            "assets": sorted(events.step_assets.get(step, set())),
            "seconds": end - start,
            "cpu_seconds": sampler.cpu_at(end) - sampler.cpu_at(start),
            "status": status,
            "peak_rss_sampled": sampler.peak_between(start, end),
        }
        steps += _split_intake(record, events) if groups == INTAKE_GROUPS else [record]
    return steps


def _add_sql_totals(steps: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Each step's seconds and number of statements in SQL, from the trace summary."""
    for step in steps:
        in_sql = summary["steps"].get(step["step"], {})
        step["sql_seconds"] = in_sql.get("sql_seconds", 0.0)
        step["sql_statements"] = in_sql.get("statements", 0)


def _vault_pair(home: Path) -> None:
    """The identity vault's key pair, as a custodian sets a haven up; the benchmark never reads the
    vault, so the private half is sealed under a random passphrase nobody keeps."""
    import secrets

    from safehaven.core.home import Home
    from safehaven.core.keys import VAULT, Custodian, KeyRing

    keyring = KeyRing(Home(home).ensure().keys, Custodian.of(secrets.token_urlsafe(32)))
    if not keyring.recorded(VAULT):
        keyring.create_keypair(VAULT)


#: who adopts the project's agreements on a benchmark haven (named in its store and audit trail)
BENCHMARK_ADOPTER = "benchmark set-up (benchmarks/pipeline.py)"


def _adopt_agreements(home: Path) -> None:
    """Adopt the project's agreements' approval blocks, as the demo set-up does, so the benchmark
    measures the releases and the linked output (a file's block alone approves nothing)."""
    from safehaven.core.home import Home
    from safehaven.core.registers import current_actor
    from safehaven.core.store import Store
    from safehaven.intake.contracts import ContractRegistry
    from safehaven.share import approvals

    reason = "synthetic benchmark haven: the example agreements are adopted so every stage runs"
    with Store(Home(home).ensure()).connect() as con:
        approvals.adopt(con, None, BENCHMARK_ADOPTER, reason, registry=ContractRegistry(), actor=current_actor())


def set_up(home: Path) -> None:
    """The haven's one-time set-up a person does before its first run (the vault pair, the
    agreements adopted): not part of any night's cost, so a multi-night run does it once."""
    _vault_pair(home)
    _adopt_agreements(home)


def run(
    home: Path, threads: int | None, trace_sql: bool = False, *, with_set_up: bool = True, memory_limit: str = ""
) -> dict[str, Any]:
    os.environ["SAFEHAVEN_HOME"] = str(home)
    if with_set_up:
        set_up(home)
    import dagster as dg

    trace: list[tuple[float, str, float, float]] = []
    if trace_sql:
        install_trace(trace)

    from assets.definitions import build_definitions
    from assets.runner import night_jobs
    from safehaven.core.home import Home

    imported = time.perf_counter()
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    group_of = {key: stage_of(graph.get(key)) for key in graph.get_all_asset_keys()}
    jobs = [defs.resolve_job_def(n) for n in night_jobs(Home(home), [j.name for j in defs.resolve_all_job_defs()])]
    instance = dg.DagsterInstance.ephemeral()
    config = {"threads": threads} if threads else {}
    config |= {"memory_limit": memory_limit} if memory_limit else {}
    run_config = {"resources": {"haven": {"config": config}}} if config else None
    built = time.perf_counter()

    sampler = RssSampler()
    sampler.start()
    began, cpu_began = time.perf_counter(), time.process_time()
    results = [job.execute_in_process(instance=instance, raise_on_error=False, run_config=run_config) for job in jobs]
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    wall_end = time.time()
    sampler.stop()

    events = _read_events(instance, [r.run_id for r in results], group_of)
    steps = _steps(events, sampler, wall_end)
    from assets import definitions as definitions_module

    summary = summarise_trace(trace, steps) if trace_sql else None
    if summary:
        _add_sql_totals(steps, summary)
    return {
        "code": str(Path(definitions_module.__file__).parents[1]),
        "sql_trace": summary,
        "success": all(r.success for r in results),
        "checks_failed": events.checks_failed,
        "seconds_import": imported - _T0,
        "seconds_build_definitions": built - imported,
        "seconds_job": wall,
        "cpu_seconds_job": cpu,
        "seconds_steps_total": sum(s["seconds"] for s in steps),
        "steps": steps,
        "assets": events.assets,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_sampled": max((r for _, r in sampler.samples), default=0),
        "threads": threads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline")
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--memory-limit", default="", help="DuckDB's memory limit for the store (e.g. 1.5GB)")
    parser.add_argument("--trace-sql", action="store_true", help="time every store statement (profiling)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--set-up-only", action="store_true", help="only the haven's one-time set-up (no run)")
    mode.add_argument("--no-set-up", action="store_true", help="the haven is set up already (--set-up-only)")
    args = parser.parse_args(argv)
    if args.set_up_only:
        os.environ["SAFEHAVEN_HOME"] = str(args.home.resolve())
        set_up(args.home.resolve())
        write_json(args.out, {"success": True, "set_up": True})
        return 0
    doc = run(
        args.home.resolve(),
        args.threads or None,
        args.trace_sql,
        with_set_up=not args.no_set_up,
        memory_limit=args.memory_limit,
    )
    write_json(args.out, doc)
    return 0 if doc["success"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
