"""A real Redis server for tests: Debian's `redis-server` (`.ci/run` installs it) on a free
127.0.0.1 port, without persistence, in a temporary folder. A test may stop it and start it again
on the same port to see what the gateway does while it is gone."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ops.launcher import free_port

START_TIMEOUT_S = 20


class Redis:
    """One server: ``start()``, ``stop()`` (SIGTERM; its clients' connections are cut), ``url``;
    ``close()`` stops it and removes its folder."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail(
                "redis-server is not installed: the per-key limits' tests need a real server. "
                "Install Debian's package: `apt-get install redis-server` (.ci/run does)."
            )
        self.exe = exe
        self.root = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited with {self.proc.returncode}: {(self.root / 'redis.log').read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        pytest.fail(f"redis-server did not answer within {START_TIMEOUT_S}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_redis() -> Iterator[Redis]:
    r = Redis()
    try:
        r.start()
        yield r
    finally:
        r.close()
