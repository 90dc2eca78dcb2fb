"""Static checks of the deployment files: nothing here needs Docker, a cluster or a GPU.

The tools they use are the real ones, offline: check-jsonschema (the compose-spec schema),
kubernetes-validate (Kubernetes' schemas), `kubectl kustomize` (kustomize, built into kubectl),
`promtool` (Debian's prometheus package), and the gateway itself for a live scrape of /metrics.
A missing tool is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
EXAMPLE_CONFIG = DEPLOY / "config" / "ensemble.yaml"  # compose's gateway, with its models in process
CLUSTER_CONFIG = DEPLOY / "config" / "cluster.yaml"  # Kubernetes' gateways, the models on the tier
TIER_CONFIG = DEPLOY / "config" / "tier.yaml"  # Kubernetes' model tier (serve-models)
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "ensemble-gateway.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
VLLM_IMAGE = "vllm/vllm-openai"
ADAPTERS_IMAGE = "ensemble-gateway-adapters"  # deploy/Dockerfile.adapters
MODELS_IMAGE = "ensemble-gateway-models"  # deploy/Dockerfile.models: the model tier and the downloads
VLLM_PORT = 8000
POSTGRES_IMAGE = "postgres"  # the official image: the store of answers and feedback
POSTGRES_PORT = 5432
# The Secrets deploy/k8s generates, each from an env file whose committed example is named here.
K8S_SECRET_EXAMPLES = {
    "gateway-secrets": "secrets.env.example",
    "postgres-secrets": "postgres-secrets.env.example",
    "members-secrets": "members-secrets.env.example",
    "model-tier-secrets": "model-tier-secrets.env.example",
    "hub-token": "hub-token.env.example",
}


def require_tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed; {install}")
    return path


def promtool() -> str:
    return require_tool("promtool", "install it with `apt-get install prometheus` (Debian's package brings promtool)")


def flag_value(args: list[str], flag: str) -> str | None:
    """`--flag value` or `--flag=value` in a command line."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def lora_module_names(args: list[str]) -> set[str]:
    """Names given to `--lora-modules NAME=PATH ...` (several may follow one flag)."""
    names: set[str] = set()
    collecting = False
    for a in args:
        if a.startswith("--lora-modules="):
            names.add(a.split("=", 2)[1])
            collecting = False
        elif a == "--lora-modules":
            collecting = True
        elif collecting and not a.startswith("--"):
            names.add(a.split("=", 1)[0])
        else:
            collecting = False
    return names


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="session")
def rendered_k8s(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """`kubectl kustomize deploy/k8s`, with each secrets file (K8S_SECRET_EXAMPLES) written from
    its committed example."""
    kubectl = require_tool(
        "kubectl", "kustomize is built into kubectl (`kubectl kustomize`); install kubectl to render deploy/k8s"
    )
    work = tmp_path_factory.mktemp("kustomize")
    shutil.copytree(DEPLOY, work / "deploy", ignore=shutil.ignore_patterns("*.env"))
    k8s = work / "deploy" / "k8s"
    for example in K8S_SECRET_EXAMPLES.values():
        shutil.copy(k8s / example, k8s / example.removesuffix(".example"))
    proc = subprocess.run([kubectl, "kustomize", str(k8s)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize deploy/k8s failed:\n{proc.stderr}"
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert docs, "kustomize rendered nothing"
    return docs


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def live_scrape(tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics of a real `ensemble-gateway serve`, whose one member points at a closed port:
    the gateway starts and serves its metrics without any member up."""
    tmp = tmp_path_factory.mktemp("scrape")
    member_port, port = _free_port(), _free_port()
    cfg = tmp / "scrape.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "members": [{"name": "down", "endpoint": f"http://127.0.0.1:{member_port}/v1", "model": "none"}],
                "ensembles": {"scrape": {"members": ["down"]}},
            }
        )
    )
    exe = shutil.which("ensemble-gateway", path=str(Path(sys.executable).parent)) or "ensemble-gateway"
    log = tmp / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "serve", "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--log-dir", str(tmp)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=tmp,
        )
    try:
        text = _scrape(proc, f"http://127.0.0.1:{port}/metrics", log)
    finally:
        _stop(proc)
    return text


def _scrape(proc: subprocess.Popen[bytes], url: str, log: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gateway exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            resp = httpx.get(url, timeout=5)
            if resp.status_code == 200:
                return resp.text
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"no /metrics from the gateway within 60 s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def live_families(live_scrape: str) -> dict[str, str]:
    """Metric family name -> type, from the scrape's `# TYPE` lines (printed for every registered
    family, also for labelled ones that have no series yet)."""
    families: dict[str, str] = {}
    for line in live_scrape.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind
    assert families, "the scrape has no # TYPE lines"
    return families


@pytest.fixture(scope="session")
def adapters_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stand-ins for the example's adapters, in the PEFT formats check-config reads: a LoRA
    adapter_config.json, and a prompt-tuning checkpoint with Llama 3.1 8B's hidden size."""
    import json

    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("adapters")
    (root / "llama-sql").mkdir()
    (root / "llama-sql" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]})
    )
    (root / "llama-concise").mkdir()
    (root / "llama-concise" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8, "token_dim": 4096})
    )
    save_file({"prompt_embeddings": torch.zeros(8, 4096)}, str(root / "llama-concise" / "adapter_model.safetensors"))
    (root / "llama-houlsby").mkdir()  # what save_adapter writes for a bottleneck adapter (its config, in part)
    (root / "llama-houlsby" / "adapter_config.json").write_text(
        json.dumps(
            {
                "config": {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "gelu"},
                "hidden_size": 4096,
                "model_class": "LlamaForCausalLM",
                "model_type": "llama",
                "name": "llama-houlsby",
                "version": "adapters.1.3.0",
            }
        )
    )
    return root


class Server:
    """A vLLM server as a deployment file declares it: reachable name and port, its arguments."""

    def __init__(self, name: str, port: int, image: str, args: list[str], env: dict[str, str]):
        self.name, self.port, self.image, self.args, self.env = name, port, image, args, env

    @property
    def served_names(self) -> set[str]:
        served = flag_value(self.args, "--served-model-name")
        return {served} if served else {self.args[0]}


def runtime_lora(server: Server) -> bool:
    """Whether a vLLM server lets clients load and unload LoRA adapters (/v1/load_lora_adapter)."""
    return server.env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")


def check_members_served(config: Any, servers: dict[str, Server]) -> dict[str, set[str]]:
    """Every member of ``config`` (a GatewayConfig) reaches a declared vLLM server that serves
    what it asks for. Returns server name -> the member kinds it carries."""
    from urllib.parse import urlsplit

    kinds: dict[str, set[str]] = {}
    for m in config.members:
        assert m.server is None, f"member {m.name}: the gateway must not launch servers here (use `endpoint`)"
        url = urlsplit(m.endpoint)
        server = servers.get(url.hostname or "")
        assert server is not None, f"member {m.name}: no service named {url.hostname!r} (have {sorted(servers)})"
        assert url.port == server.port, f"member {m.name}: port {url.port}, but {server.name} listens on {server.port}"
        assert url.path.rstrip("/") == "/v1", f"member {m.name}: endpoint should end in /v1: {m.endpoint}"
        args = server.args
        if m.kind in ("bottleneck", "prefix"):
            image = server.image.split(":")[0].rsplit("/", 1)[-1]  # a registry in front, after kustomize
            assert image == ADAPTERS_IMAGE, f"{server.name}: not the adapter server's image"
            assert f"{m.served_name}=" in " ".join(a for i, a in enumerate(args) if i and args[i - 1] == "--adapter"), (
                f"member {m.name}: {server.name} does not load adapter {m.served_name!r} (--adapter)"
            )
            kinds.setdefault(server.name, set()).add(m.kind)
            continue
        assert server.image.split(":")[0] == VLLM_IMAGE, f"{server.name}: not the official vLLM image"
        if m.kind == "lora":
            assert "--enable-lora" in args, f"member {m.name}: {server.name} lacks --enable-lora"
            assert m.served_name in lora_module_names(args), (
                f"member {m.name}: {server.name} does not preload adapter {m.served_name!r} (--lora-modules)"
            )
            # The gateway asks to load runtime LoRA members; without this the route is missing (404).
            if m.load == "runtime":
                assert runtime_lora(server), (
                    f"member {m.name}: {server.name} needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                )
        else:
            assert m.served_name in server.served_names, (
                f"member {m.name}: {server.name} serves {sorted(server.served_names)}, not {m.served_name!r}"
            )
        if m.kind == "soft_prompt":
            assert "--enable-prompt-embeds" in args, f"member {m.name}: {server.name} lacks --enable-prompt-embeds"
        kinds.setdefault(server.name, set()).add(m.kind)
    return kinds


# Grafana's variables, replaced by values of the same kind before PromQL parsing.
_VARIABLES = {"$__rate_interval": "5m", "$__range": "3h", "$__interval": "1m", "$ensemble": ".*", "$member": ".*"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        out += [(panel["title"], t["expr"]) for t in targets]
    return out


def grafana_substituted(expr: str) -> str:
    for name, value in _VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (not functions, keywords or label names)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end() :].lstrip().startswith("(") or m.group(0) in _KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for _, expr in dashboard_queries(dashboard):
        names |= metric_names(grafana_substituted(expr))
    return names
