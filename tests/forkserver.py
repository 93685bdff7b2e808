"""Run ``python -c``/``python -m`` commands as forks of one warm interpreter (tests only).

A test that starts ``safehaven run`` in a process of its own many times (the crash matrix kills
one and starts the next, 23 times) paid each process's imports again: Dagster, Great
Expectations (about 2 s alone), the haven's modules, some 3-5 s a process on 2 shared cores.
Here one server process per test worker imports them once; each command is then a
``fork`` of it. The child is a process of its own as a ``subprocess.run`` child is: its own
pid, environment, working directory, ``sys.argv`` and standard streams (fds 0-2 replaced, so
every handler writing to them writes to the command's), and a ``SIGKILL`` kills it as it kills
any process. Its exit status comes back as ``subprocess.run``'s does (-9 for ``SIGKILL``).

What a warm interpreter holds is only modules imported, never state of a run: the server
imports and does nothing else (no store, no Dagster instance, no definitions built, no
thread). Modules whose import reads the environment are left out (``assets.definitions``
builds the definitions from it), so each command imports them under its own.

Protocol (one command at a time): the client writes a JSON request per line on the server's
stdin; the server forks, answers ``{"pid": ...}`` and, when the child has ended,
``{"status": ...}`` on its stdout.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: the heavy imports every ``safehaven`` command makes; none reads the environment on import
#: (``safehaven.intake.gx_duckdb`` sets GX's analytics switch before importing GX, as it must)
WARM = (
    "safehaven.intake.gx_duckdb",
    "dagster",
    "safehaven.cli.main",
    "safehaven.intake.validation",
    "safehaven.publish.outputs",
    "polars",
    "scipy.optimize",
)


# --- the server (``python -m tests.forkserver``) ----------------------------------------------


def _child(request: dict[str, Any], channel: tuple[int, int]) -> None:
    """In the forked child: become the command, run it, exit with its status (never returns)."""
    code = 1
    try:
        for fd in channel:
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in (
            (0, os.devnull, os.O_RDONLY),
            (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC),
        ):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        code = _run(request["argv"])
    except BaseException:  # noqa: BLE001 - the child reports whatever ended it, as Python would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run(argv: list[str]) -> int:
    """``python -c CODE args`` or ``python -m MODULE args`` in this process; its exit status."""
    flag, target, *rest = argv
    try:
        if flag == "-m":
            sys.argv = [target, *rest]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif flag == "-c":
            sys.argv = ["-c", *rest]
            exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102 - a test's own command
        else:
            raise ValueError(f"forkserver runs -c or -m commands, not {flag!r}")
    except SystemExit as ended:
        return _exit_status(ended.code)
    return 0


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` gives a process (as the interpreter maps it)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def serve() -> None:
    """Read requests until stdin closes; run each as a fork, answering its pid and status."""
    for module in WARM:
        __import__(module)
    from safehaven.core import store

    store.DEFAULT_THREADS = 1  # as in the suite's own processes (tests/conftest.py): the workers use every core
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    requests = os.fdopen(os.dup(0), "r")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):  # the server's own streams carry nothing a child could inherit by mistake
        os.dup2(devnull, fd)
    channel = (replies.fileno(), requests.fileno())
    for line in requests:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, channel)
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")


# --- the client (a test) -------------------------------------------------------------------------


class ForkServer:
    """A warm server process and the commands it runs (``run``, as ``subprocess.run`` would)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._server = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._pending = b""

    def run(
        self, argv: list[str], *, env: dict[str, str], cwd: Path, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python *argv`` (``-c CODE ...`` or ``-m MODULE ...``) as a fork of the server, its
        output captured as text; raises ``subprocess.TimeoutExpired`` (after killing it) past
        ``timeout`` seconds."""
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            out.touch()
            err.touch()
            request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
            pid = self._ask(request)["pid"]
            status = self._status(pid, timeout, [sys.executable, *argv])
            return subprocess.CompletedProcess(
                [sys.executable, *argv], status, out.read_text(errors="replace"), err.read_text(errors="replace")
            )

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._server.stdin is not None
        self._server.stdin.write(json.dumps(request) + "\n")
        self._server.stdin.flush()
        reply = self._reply(None)
        assert reply is not None
        return reply

    def _reply(self, timeout: float | None) -> dict[str, Any] | None:
        """The server's next answer, or None past ``timeout`` seconds (read unbuffered, so a
        second answer already sent is never hidden from ``select`` in a buffer)."""
        assert self._server.stdout is not None
        fd = self._server.stdout.fileno()
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended (status {self._server.poll()})")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def _status(self, pid: int, timeout: float, args: list[str]) -> int:
        reply = self._reply(timeout)
        if reply is None:
            os.kill(pid, signal.SIGKILL)
            self._reply(None)
            raise subprocess.TimeoutExpired(args, timeout)
        return int(reply["status"])

    def close(self) -> None:
        """End the server (it ends when its stdin closes)."""
        assert self._server.stdin is not None
        self._server.stdin.close()
        self._server.wait(timeout=60)


if __name__ == "__main__":
    serve()
