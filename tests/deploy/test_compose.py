"""docker-compose.yml against the compose-spec schema, and against the example config."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from service.config import load_config
from tests.deploy.conftest import (
    ADAPTERS_IMAGE,
    COMPOSE_FILE,
    DEPLOY,
    EXAMPLE_CONFIG,
    POSTGRES_IMAGE,
    POSTGRES_PORT,
    PROMETHEUS_CONFIG,
    ROOT,
    VLLM_IMAGE,
    VLLM_PORT,
    Server,
    check_members_served,
)

COMPOSE_ENV_EXAMPLE = DEPLOY / "compose.env.example"


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
    monkeypatch.setenv("STORE_PASSWORD", "from-deploy-env")
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


def _env_var(value: str) -> str:
    """The variable a compose value interpolates: `${NAME}`, `${NAME:-x}`, `${NAME:?msg}`."""
    m = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}", value)
    assert m, f"not a single variable: {value!r}"
    return m.group(1)


def test_postgres_service(compose: dict[str, Any]) -> None:
    """The store's PostgreSQL: the official image at a pinned version, its data on a named volume,
    healthy when pg_isready answers over TCP, not published on the host."""
    postgres = compose["services"]["postgres"]
    image, _, tag = postgres["image"].partition(":")
    assert image == POSTGRES_IMAGE and tag.startswith("16.") and tag.count(".") == 1, postgres["image"]
    test = postgres["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready" and "-h" in test, test
    assert "ports" not in postgres, "the database is for the gateway only"
    volume, _, path = next(v for v in postgres["volumes"] if v.endswith(":/var/lib/postgresql/data")).partition(":")
    assert volume in compose["volumes"], f"volume {volume} is not declared"
    assert path == "/var/lib/postgresql/data"


def test_gateway_waits_for_postgres_and_shares_its_password(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gateway, postgres = services["gateway"], services["postgres"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    password = _env_var(postgres["environment"]["POSTGRES_PASSWORD"])
    assert _env_var(gateway["environment"]["STORE_PASSWORD"]) == password
    # Required, like the API keys: compose refuses to start without it.
    assert ":?" in postgres["environment"]["POSTGRES_PASSWORD"]
    assert ":?" in gateway["environment"]["STORE_PASSWORD"]
    example = {
        line.split("=", 1)[0] for line in COMPOSE_ENV_EXAMPLE.read_text().splitlines() if line and line[0] != "#"
    }
    assert password in example, f"{password} is missing from deploy/compose.env.example"


def test_store_url_points_at_the_postgres_service(compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The config the gateway mounts reaches the postgres service, as the user and database it
    creates, with the password compose hands the gateway as STORE_PASSWORD."""
    monkeypatch.setenv("STORE_PASSWORD", "from-deploy-env")
    monkeypatch.delenv("ADAPTERS_DIR", raising=False)
    config = load_config(EXAMPLE_CONFIG)
    assert config.store is not None and config.store.url is not None
    url = make_url(config.store.url)
    postgres = compose["services"]["postgres"]
    assert url.get_backend_name() == "postgresql"
    assert url.host == "postgres" and url.host in compose["services"]
    assert url.port == POSTGRES_PORT
    assert url.username == postgres["environment"]["POSTGRES_USER"]
    assert url.database == postgres["environment"]["POSTGRES_DB"]
    assert url.password == "from-deploy-env"


def test_traces_reach_jaeger_from_the_gateway_and_every_vllm_server(compose: dict[str, Any]) -> None:
    services = compose["services"]
    jaeger = services["jaeger"]
    env = services["gateway"]["environment"]
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]  # ${OTEL_EXPORTER_OTLP_ENDPOINT-http://jaeger:4318}
    assert endpoint.endswith("-http://jaeger:4318}") and "4318" in jaeger["expose"]
    assert services["gateway"]["depends_on"]["jaeger"]
    for name, server in _vllm_services(compose).items():
        assert "--otlp-traces-endpoint=grpc://jaeger:4317" in server["command"], name
        assert server["environment"]["OTEL_EXPORTER_OTLP_TRACES_INSECURE"] == "true", name
    assert "4317" in jaeger["expose"]


def test_deploy_doc_counts_the_gpus_compose_reserves(compose: dict[str, Any]) -> None:
    """DEPLOY.md once said four GPUs where compose reserved five."""
    ids = {i for s in compose["services"].values() if "deploy" in s for i in _gpu_ids(s)}
    words = {4: "four", 5: "five", 6: "six"}
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    section = doc[doc.index("## Docker Compose") :]
    assert f"{words[len(ids)]}\nGPUs" in section or f"{words[len(ids)]} GPUs" in section, sorted(ids)
