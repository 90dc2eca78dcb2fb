"""docker-compose.yml against the compose-spec schema, and against the example config."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from service.config import load_config
from tests.deploy.conftest import (
    ADAPTERS_IMAGE,
    COMPOSE_FILE,
    DEPLOY,
    EXAMPLE_CONFIG,
    PROMETHEUS_CONFIG,
    ROOT,
    VLLM_IMAGE,
    VLLM_PORT,
    Server,
    check_members_served,
)


def _vllm_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith(VLLM_IMAGE + ":")}


def _gpu_ids(service: dict[str, Any]) -> list[str]:
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    return [i for d in devices if d["driver"] == "nvidia" and "gpu" in d["capabilities"] for i in d["device_ids"]]


def test_compose_spec_schema() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_member_is_served(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLAMA_EMBEDS_URL", raising=False)
    monkeypatch.delenv("ADAPTERS_DIR", raising=False)
    config = load_config(EXAMPLE_CONFIG)
    member_servers = {
        **_vllm_services(compose),
        **{n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith(ADAPTERS_IMAGE + ":")},
    }
    servers = {
        name: Server(name, VLLM_PORT, s["image"], [str(a) for a in s["command"]], s.get("environment", {}))
        for name, s in member_servers.items()
    }
    kinds = check_members_served(config, servers)
    assert set(kinds) == set(servers), f"servers no member uses: {set(servers) - set(kinds)}"
    # One server carries the base model with its LoRA and soft-prompt variants; the adapter server, a
    # bottleneck adapter, built here (deploy/Dockerfile.adapters).
    assert any({"model", "lora", "soft_prompt"} <= k for k in kinds.values())
    assert {"bottleneck"} in kinds.values()
    adapters = next(s for s in member_servers.values() if str(s["image"]).startswith(ADAPTERS_IMAGE + ":"))
    assert (ROOT / adapters["build"]["context"] / adapters["build"]["dockerfile"]).is_file()


def test_gpus_one_each(compose: dict[str, Any]) -> None:
    vllm = _vllm_services(compose)
    assert len(vllm) >= 3
    ids = {name: _gpu_ids(s) for name, s in [*vllm.items(), ("gateway", compose["services"]["gateway"])]}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == len(ids), f"two containers share a GPU by default: {ids}"


def test_health_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, s in services.items():
        assert "healthcheck" in s, f"{name} has no healthcheck"
    gateway = services["gateway"]
    for name in _vllm_services(compose):
        assert gateway["depends_on"][name]["condition"] == "service_healthy", name
        assert any("/health" in str(part) for part in services[name]["healthcheck"]["test"])
    assert "/ready" in " ".join(gateway["healthcheck"]["test"])


def test_gateway_is_built_here_and_mounts_its_config(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert (ROOT / gateway["build"]["context"] / gateway["build"]["dockerfile"]).is_file()
    config_arg = gateway["command"][gateway["command"].index("--config") + 1]
    container_dir, file_name = config_arg.rsplit("/", 1)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    assert (ROOT / mounts[container_dir] / file_name).resolve() == EXAMPLE_CONFIG.resolve()


def test_model_cache_volume(compose: dict[str, Any]) -> None:
    assert "model-cache" in compose["volumes"]
    for name, s in _vllm_services(compose).items():
        assert any(v.startswith("model-cache:") for v in s["volumes"]), name


def test_prometheus_scrapes_gateway_and_every_vllm_server(compose: dict[str, Any]) -> None:
    import yaml

    prom = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    wanted = {f"{name}:{VLLM_PORT}" for name in _vllm_services(compose)} | {"gateway:8000"}
    assert wanted <= targets, f"not scraped: {sorted(wanted - targets)}"
    mounted = [v for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./")]
    assert any((ROOT / v.split(":")[0]).resolve() == PROMETHEUS_CONFIG.resolve() for v in mounted)


def test_grafana_provisioning_paths(compose: dict[str, Any]) -> None:
    import yaml

    grafana = compose["services"]["grafana"]
    mounts = {v.split(":")[1]: ROOT / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provisioning = mounts["/etc/grafana/provisioning"]
    providers = yaml.safe_load((provisioning / "dashboards" / "ensemble-gateway.yml").read_text())["providers"]
    for provider in providers:
        host = mounts[provider["options"]["path"]]
        assert (host / "ensemble-gateway.json").is_file()
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert [d["url"] for d in datasources] == ["http://prometheus:9090"]
    assert provisioning.resolve() == (DEPLOY / "grafana" / "provisioning").resolve()
