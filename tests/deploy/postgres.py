"""A real PostgreSQL server for one test module: initdb into a temporary directory, pg_ctl start
on a free port of 127.0.0.1 with password (SCRAM) authentication, stop and delete at the end.

The binaries come from the Debian ``postgresql`` package (``.ci/run`` installs it). When they
are missing and we are root with apt-get, they are installed here; only when neither works is
the caller told why, so that it can skip with that reason.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def find_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl (the newest Debian version, else PATH)."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if debian:
        return debian[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def install_binaries() -> str | None:
    """Install the Debian package if we can; return why not, or None when the binaries exist."""
    if find_bin_dir():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "PostgreSQL binaries (initdb, pg_ctl) not found and apt-get cannot run here as root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}"
    return None if find_bin_dir() else "apt-get installed postgresql but initdb is still missing"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PostgresServer:
    bin_dir: Path
    root: Path
    port: int
    user: str = "haven"
    password: str = ""
    run_as: str | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _cmd(self, *args: str) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *args]
        return list(args)

    def start(self) -> None:
        self.password = secrets.token_urlsafe(24)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        pwfile.chmod(0o600)
        subprocess.run(
            self._cmd(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-locale",
            ),
            check=True,
            capture_output=True,
        )
        pwfile.unlink()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root} -c fsync=off"
        subprocess.run(
            self._cmd(
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "server.log"),
                "-w",
                "-t",
                "120",
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, password=self.password, dbname=dbname)

    def create_database(self, name: str) -> None:
        con = self.connect()
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            con.close()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                self._cmd(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"),
                capture_output=True,
            )
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """A started server; the caller must call ``stop()``. Raises RuntimeError with the reason."""
    reason = install_binaries()
    if reason:
        raise RuntimeError(reason)
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    run_as = None
    if os.geteuid() == 0:  # initdb and postgres refuse to run as root
        try:
            run_as = pwd.getpwnam("postgres").pw_name
        except KeyError as exc:
            raise RuntimeError("running as root and there is no postgres user to run the server as") from exc
    root = Path(tempfile.mkdtemp(prefix="safehaven-pg-"))
    server = PostgresServer(bin_dir=bin_dir, root=root, port=free_port(), run_as=run_as)
    try:
        server.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                server.connect().close()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    except BaseException:
        server.stop()
        raise
    return server
