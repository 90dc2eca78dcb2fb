"""A real PostgreSQL server for tests: Debian's `postgresql` package (`.ci/run` installs it), its
`initdb` and `pg_ctl` run as the `postgres` user (initdb refuses root) on a data directory in a
temporary folder, the server on a free 127.0.0.1 port with trust authentication. A test may stop
it and start it again (same port, same data) to see what its clients do during an outage."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ops.launcher import free_port

BIN_GLOB = "/usr/lib/postgresql/*/bin"
USER = "postgres"  # the package's system user, and the database superuser initdb creates
START_TIMEOUT_S = 30


def find_bin() -> Path:
    """The newest installed PostgreSQL's bin directory; the test fails (not skips) without one."""
    found = [Path(d) for d in glob.glob(BIN_GLOB) if (Path(d) / "pg_ctl").exists() and (Path(d) / "initdb").exists()]
    if not found:
        pytest.fail(
            f"PostgreSQL is not installed (no initdb/pg_ctl under {BIN_GLOB}): the store's tests need a real "
            "server. Install Debian's package: `apt-get install postgresql` (.ci/run does)."
        )
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


class Postgres:
    """One server: ``start()``, ``stop()`` (fast shutdown: clients' connections are cut), ``url``,
    ``create_database()``; ``close()`` stops it and deletes its data."""

    def __init__(self) -> None:
        self.bin = find_bin()
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="pg-test-"))
        self.data = self.root / "data"
        self.sockets = self.root / "run"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.running = False
        try:
            self._init()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _init(self) -> None:
        self.sockets.mkdir()
        if self.as_root:
            try:
                user = pwd.getpwnam(USER)
            except KeyError:
                pytest.fail(f"as root, PostgreSQL runs as the {USER!r} user: missing (the postgresql package adds it)")
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "--auth=trust", f"--username={USER}", "--no-sync", "--encoding=UTF8", "-D", str(self.data))

    @property
    def url(self) -> str:
        return self.database_url(USER)

    def database_url(self, name: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def _command(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin / tool), *args]
        return ["runuser", "-u", USER, "--", *cmd] if self.as_root else cmd

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            self._command(tool, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            output = f"{done.stdout}{done.stderr}{self._log()}"
            pytest.fail(f"{tool} {' '.join(args)} exited with {done.returncode}:\n{output}")

    def _log(self, n: int = 30) -> str:
        try:
            return "\nserver log:\n" + "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def start(self) -> None:
        """Start (again) on the same port and data; returns once the server accepts connections."""
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.sockets} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        wait = ["-w", "-t", str(START_TIMEOUT_S)]
        self._run("pg_ctl", "start", *wait, "-D", str(self.data), "-l", str(self.log), "-o", options)
        self.running = True
        self._wait_accepting()

    def _wait_accepting(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL does not accept connections on port {self.port}{self._log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown: open transactions are rolled back and every client is disconnected."""
        if self.running:
            self._run("pg_ctl", "stop", "-m", "fast", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data))
            self.running = False

    def create_database(self, prefix: str = "test") -> str:
        """A new, empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.database_url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[Postgres]:
    pg = Postgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()
