"""Great Expectations imported beside a landing's insert (``safehaven.intake.preload``, issue 22):
validation finds its modules imported, the import never outlives the landing, and a failed
import is left for validation to raise."""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from safehaven.core.home import Home
from safehaven.core.store import Store
from safehaven.intake import gx_quiet, ingest, preload
from safehaven.intake.contracts import CONTRACTS_DIR, ContractRegistry
from tests.unit.validation_helpers import gp_rows, write_csv

ROOT = Path(__file__).resolve().parents[2]
GP = ContractRegistry(CONTRACTS_DIR).contracts["gp_events"]
THREAD = "safehaven-import-checks"


def _in_a_new_process(code: str) -> str:
    """Run ``code`` in a fresh interpreter (nothing of Great Expectations imported yet); its output."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_the_checks_are_imported_while_the_block_runs_and_the_thread_ends_with_it() -> None:
    """Inside the block another thread imports the checks' modules while this one goes on; at its
    end they are imported and the thread has ended; GX's environment was set in the calling
    thread, before the import began; a second block starts nothing."""
    out = _in_a_new_process(
        "import os, sys, threading\n"
        "from safehaven.intake import preload\n"
        "assert not any(m in sys.modules for m in ('great_expectations', *preload.CHECK_MODULES))\n"
        "with preload.checks_imported_beside():\n"
        "    env = os.environ.get('GX_ANALYTICS_ENABLED')\n"
        "    during = [t.name for t in threading.enumerate()]\n"
        "after = [t.name for t in threading.enumerate()]\n"
        "imported = all(m in sys.modules for m in ('great_expectations', *preload.CHECK_MODULES))\n"
        "with preload.checks_imported_beside():\n"
        "    again = [t.name for t in threading.enumerate()]\n"
        "print(env, 'safehaven-import-checks' in during, 'safehaven-import-checks' in after, imported,"
        " 'safehaven-import-checks' in again)"
    )
    assert out == "False True False True False"


def test_a_module_that_fails_to_import_is_left_for_validation_to_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The block ends quietly and the thread with it; GX's environment was set in the calling
    thread (the process's environment is never changed from a thread while DuckDB runs)."""
    quietened: list[str] = []
    monkeypatch.setattr(preload, "CHECK_MODULES", ("safehaven.intake.no_such_module",))
    monkeypatch.setattr(preload.gx_quiet, "apply", lambda: quietened.append(threading.current_thread().name))
    with preload.checks_imported_beside():
        pass
    assert THREAD not in [t.name for t in threading.enumerate()]
    assert "safehaven.intake.no_such_module" not in sys.modules
    assert quietened == [threading.current_thread().name]


def test_a_landing_imports_the_checks_while_it_inserts_the_file(
    store: Store, home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The landing's insert runs inside the block (no row landed at its start, the file's at its
    end): the import runs beside DuckDB's work on the file, not beside the landing's own Python
    work before it (the file's digest and byte checks), which it would hold up."""
    landed: list[int] = []
    original = ingest.checks_imported_beside
    with store.connect() as con:

        @contextlib.contextmanager
        def recording() -> Iterator[None]:
            with original():
                landed.append(con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0])
                yield
                landed.append(con.execute("SELECT count(*) FROM landing.gp_events").fetchone()[0])

        monkeypatch.setattr(ingest, "checks_imported_beside", recording)
        write_csv(home.incoming_for("gp_events") / "gp.csv", gp_rows(4), GP.field_names)
        report = ingest.ingest_collection(con, GP, home.incoming_for("gp_events"), home.quarantine_for("gp_events"))
    assert report.files_landed == 1
    assert landed == [0, 4]


def test_nothing_is_started_once_the_checks_are_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """The night's later landings (another file, another collection) start no thread."""
    for module in preload.CHECK_MODULES:
        importlib.import_module(module)
    started: list[str] = []

    class Recording(threading.Thread):
        def start(self) -> None:
            started.append(self.name)
            super().start()

    monkeypatch.setattr(preload.threading, "Thread", Recording)
    with preload.checks_imported_beside():
        pass
    assert started == []


def _slow_import(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An import that lasts until the returned event is set (the checks' modules made to look unimported)."""
    release = threading.Event()
    monkeypatch.setattr(preload, "CHECK_MODULES", ("safehaven.intake.not_imported_here",))
    monkeypatch.setattr(preload, "_import_checks", lambda: release.wait(30))
    return release


def test_an_interrupt_waits_for_the_import_so_no_import_is_left_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during a landing is raised once the import has ended, never with it still running: a
    process exiting mid-import aborted, and a child forked then hung (found by review)."""
    release = _slow_import(monkeypatch)
    threading.Timer(0.2, release.set).start()
    with pytest.raises(KeyboardInterrupt), preload.checks_imported_beside():
        raise KeyboardInterrupt
    assert THREAD not in [t.name for t in threading.enumerate()]


def test_a_process_interrupted_while_landing_exits_cleanly_and_can_fork() -> None:
    """The review's reproduction: a real import interrupted at once, then a fork whose child imports
    the checks, then the interrupt raised to the top: the child imports, and the process ends by
    its KeyboardInterrupt (SIGINT), not by an abort."""
    code = (
        "import os, sys, time\n"
        "from safehaven.intake.preload import checks_imported_beside\n"
        "try:\n"
        "    with checks_imported_beside():\n"
        "        time.sleep(0.05)\n"
        "        raise KeyboardInterrupt\n"
        "except KeyboardInterrupt:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        import signal\n"
        "        signal.alarm(60)  # a child hung on the import lock ends itself\n"
        "        import safehaven.intake.gx_duckdb\n"
        "        os._exit(0)\n"
        "    print('child', os.waitpid(pid, 0)[1], flush=True)\n"
        "    raise\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "child 0"
    assert done.returncode == -signal.SIGINT and "KeyboardInterrupt" in done.stderr  # not -SIGABRT
    assert "terminate called" not in done.stderr


def test_an_error_in_the_block_waits_for_the_import_before_it_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    release = _slow_import(monkeypatch)
    threading.Timer(0.2, release.set).start()
    with pytest.raises(ValueError, match="the landing failed"), preload.checks_imported_beside():
        raise ValueError("the landing failed")
    assert THREAD not in [t.name for t in threading.enumerate()]


def test_gx_is_made_quiet_without_writing_the_environment_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The import's own call (``gx_duckdb`` at import, in the thread) finds the variable set and
    writes nothing: the environment is written once, in the calling thread."""
    writes: list[str] = []

    class Environ(dict):
        def __setitem__(self, key: str, value: str) -> None:
            writes.append(key)
            super().__setitem__(key, value)

    monkeypatch.setattr(gx_quiet.os, "environ", Environ())
    gx_quiet.apply()
    gx_quiet.apply()
    assert writes == ["GX_ANALYTICS_ENABLED"]
    assert gx_quiet.os.environ["GX_ANALYTICS_ENABLED"] == "False"


def _importing_gx() -> list[str]:
    """The haven's modules that import Great Expectations at their top."""
    found = []
    for path in sorted((ROOT / "safehaven").rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        if any(line.startswith(("import great_expectations", "from great_expectations")) for line in lines):
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


@pytest.mark.parametrize("module", _importing_gx())
def test_every_module_that_imports_gx_makes_it_quiet_first(module: str) -> None:
    """Whichever of them a process imports first (validation imports ``expectations`` before
    ``gx_duckdb``: found by re-reading), Great Expectations is imported with analytics off and its
    records kept from every handler (``safehaven.intake.gx_quiet``)."""
    out = _in_a_new_process(
        "import logging, os, sys\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'great_expectations':\n"
        "            logger = logging.getLogger('great_expectations')\n"
        "            print(os.environ.get('GX_ANALYTICS_ENABLED'), logger.propagate, logger.level)\n"
        "        return None\n"
        "sys.meta_path.insert(0, Watch())\n"
        f"import {module}\n"
    )
    assert out == f"False False {logging.CRITICAL}"
