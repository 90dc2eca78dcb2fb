"""``ensemble-gateway serve``: single-node mode's process. The servers the config names are
launched, the gateway is served by uvicorn, and a signal drains it before everything stops."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import uvicorn

from service.config import load_config
from service.errors import ConfigError, GatewayError
from service.members.checks import startup_server_args
from service.models.build.materialize import materialize
from service.ops.launcher import Launcher
from service.pipeline.admission import Admission
from service.serving.app import create_app
from service.telemetry.logs import setup_logging

logger = logging.getLogger("service.cli")


class _Interrupted(Exception):
    pass


def _raise_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted(signal.Signals(signum).name)


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: for ``drain_grace_s`` keep listening but answer new requests with 503
    and ``Connection: close`` (and fail /ready), so that clients leave their keep-alive
    connections cleanly; then close the listener while uvicorn lets the requests in flight
    finish, for up to ``drain_timeout_s``. A second signal stops at once."""

    def __init__(self, config: uvicorn.Config, admission: Admission, grace_s: float):
        super().__init__(config)
        self.admission = admission
        self.grace_s = grace_s
        self.timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.timer is not None or self.grace_s <= 0:
            super().handle_exit(sig, frame)
            return
        logger.info("draining: %d requests in flight", self.admission.running)
        self.admission.draining = True
        timer = threading.Timer(self.grace_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()
        self.timer = timer


def serve(config_path: Path, host: str, port: int, log_dir: Path, ops_port: int | None = None) -> int:
    """``ensemble-gateway serve``: the config's servers launched, the gateway served until a signal
    (draining first); the exit status (2: a bad config, named). ``ops_port``: a second port on the
    same host for metrics, status and the status page (served there only), and the probes."""
    if ops_port is not None and ops_port == port:
        print(f"ensemble-gateway: --ops-port {ops_port} is the API's port; give another", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path)
        setup_logging(config.logging.level, config.logging.json_logs)
        config = materialize(config)  # merges and soups built (or found in the cache), adapters checked
    except ConfigError as e:
        print(f"ensemble-gateway: {e}", file=sys.stderr)
        return 2
    launcher = Launcher(log_dir)
    # SIGTERM/SIGINT unwind through the finally below. While serving, uvicorn handles them (it
    # drains requests), then restores this handler and re-raises the signal, which lands here too.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_on_signal)
    try:
        if config.servers:
            launcher.start(config.servers, startup_server_args(config))
        app = create_app(
            config,
            launcher=launcher,
            config_path=config_path,
            members_checked=True,
            host=host,
            port=port,
            ops_port=ops_port,
        )
        logger.info("serving on http://%s:%d", host, port)
        server_config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            log_level=config.logging.level,
            access_log=False,
            timeout_graceful_shutdown=max(1, round(config.resilience.drain_timeout_s)),
        )
        server = _DrainingServer(server_config, app.state.runtime.admission, config.resilience.drain_grace_s)
        if ops_port is None:
            server.run()
        else:
            # One server, two listeners: the app tells them apart by the port a request came in on.
            logger.info("operators' port: http://%s:%d (metrics, status)", host, ops_port)
            ops = uvicorn.Config(app, host=host, port=ops_port, log_config=None)
            server.run(sockets=[server_config.bind_socket(), ops.bind_socket()])
        return 0
    except _Interrupted as e:
        logger.info("stopping on %s", e)
        return 0
    except GatewayError as e:
        print(f"ensemble-gateway: {e}", file=sys.stderr)
        return 1
    finally:
        # Stopping is bounded (SIGTERM, then SIGKILL); a second signal must not cut it short.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop()
