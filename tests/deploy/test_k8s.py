"""deploy/k8s rendered by kustomize, every resource validated against Kubernetes' schemas
(kubernetes-validate, strict: unknown fields fail), and checked against the example config."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from sqlalchemy.engine import make_url

from service.config import expand_env, parse_config
from tests.deploy.conftest import (
    DEPLOY,
    EXAMPLE_CONFIG,
    K8S_SECRET_EXAMPLES,
    POSTGRES_IMAGE,
    POSTGRES_PORT,
    VLLM_PORT,
    Server,
    check_members_served,
)

K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "Deployment")["ensemble-gateway"]


def _postgres(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "StatefulSet")["postgres"]


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Everything that runs pods: Deployments and StatefulSets, by name."""
    return {**_by_kind(docs, "Deployment"), **_by_kind(docs, "StatefulSet")}


def _generated(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """A generated ConfigMap or Secret by its name without kustomize's hash suffix."""
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].rsplit("-", 1)[0] == name]
    return found


def _secret_refs(workload: dict[str, Any]) -> set[str]:
    """Every Secret a workload's pods can read: env, envFrom and volumes, init containers too."""
    pod = workload["spec"]["template"]["spec"]
    names = set()
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        for e in c.get("env", []):
            if "secretKeyRef" in e.get("valueFrom", {}):
                names.add(e["valueFrom"]["secretKeyRef"]["name"])
        names |= {src["secretRef"]["name"] for src in c.get("envFrom", []) if "secretRef" in src}
    for v in pod.get("volumes", []):
        if "secret" in v:
            names.add(v["secret"]["secretName"])
        for src in v.get("projected", {}).get("sources", []):
            if "secret" in src:
                names.add(src["secret"]["name"])
    return names


def _network_policies_for(docs: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    return [
        p for p in _by_kind(docs, "NetworkPolicy").values() if _selects(p["spec"]["podSelector"]["matchLabels"], labels)
    ]


def _members(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        n: d
        for n, d in _by_kind(docs, "Deployment").items()
        if _pod_labels(d).get("app.kubernetes.io/component") == "member"
    }


@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.utils.latest_version()])
def test_every_resource_is_valid(rendered_k8s: list[dict[str, Any]], version: str) -> None:
    errors = []
    for doc in rendered_k8s:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")
    assert not errors, "\n".join(errors)


def test_the_expected_resources(rendered_k8s: list[dict[str, Any]]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in rendered_k8s}
    for wanted in [
        ("Deployment", "ensemble-gateway"),
        ("Service", "ensemble-gateway"),
        ("HorizontalPodAutoscaler", "ensemble-gateway"),
        ("PodDisruptionBudget", "ensemble-gateway"),
        ("NetworkPolicy", "members-from-gateway-only"),
        ("StatefulSet", "postgres"),
        ("Service", "postgres"),
        ("NetworkPolicy", "postgres-from-gateway-only"),
    ]:
        assert wanted in names, wanted
    generated = sorted(n for k, n in names if k in ("ConfigMap", "Secret"))
    assert [n.rsplit("-", 1)[0] for n in generated] == [
        "ensemble-gateway-config",
        "gateway-secrets",
        "postgres-secrets",
    ], generated
    assert {d["metadata"].get("namespace") for d in rendered_k8s if d["kind"] != "Namespace"} == {"ensemble"}


def test_config_map_is_the_example_config(rendered_k8s: list[dict[str, Any]]) -> None:
    """One copy: the ConfigMap holds deploy/config/ensemble.yaml as is, under a content-hashed
    name that the gateway's pod template refers to (so a change rolls the gateway out)."""
    (cm,) = [d for d in rendered_k8s if d["kind"] == "ConfigMap"]
    assert cm["data"] == {"ensemble.yaml": EXAMPLE_CONFIG.read_text()}
    gateway = _gateway(rendered_k8s)
    volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    assert cm["metadata"]["name"].startswith("ensemble-gateway-config-"), "the name must carry the content hash"
    container = _container(gateway)
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert config_arg == f"{mount['mountPath']}/ensemble.yaml"
    assert "subPath" not in mount


def test_gateway_keys_come_from_the_secret(rendered_k8s: list[dict[str, Any]]) -> None:
    secret = _generated(rendered_k8s, "Secret", "gateway-secrets")
    env = {e["name"]: e for e in _container(_gateway(rendered_k8s))["env"]}
    config = load_config_with_env(rendered_k8s)
    for var in (config.auth.api_keys_env, config.auth.admin_key_env):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"], var


SECRET_PLACEHOLDER = "from-the-secret"


def load_config_with_env(docs: list[dict[str, Any]]) -> Any:
    """The example config as the gateway pod reads it: with the Deployment's plain env values, and
    a placeholder for each one that a Secret supplies (no other variable is set in the pod)."""
    env = {}
    for e in _container(_gateway(docs))["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = SECRET_PLACEHOLDER
    return parse_config(expand_env(EXAMPLE_CONFIG.read_text(), env), str(EXAMPLE_CONFIG))


def test_every_member_is_served(rendered_k8s: list[dict[str, Any]]) -> None:
    config = load_config_with_env(rendered_k8s)
    deployments = _members(rendered_k8s)
    servers = {}
    for name, svc in _by_kind(rendered_k8s, "Service").items():
        backing = [d for d in deployments.values() if _selects(svc["spec"]["selector"], _pod_labels(d))]
        if not backing:
            continue
        (deployment,) = backing
        c = _container(deployment)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        (port,) = svc["spec"]["ports"]
        assert ports[port["targetPort"]] == VLLM_PORT
        env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
        servers[name] = Server(name, port["port"], c["image"], [str(a) for a in c["args"]], env)
    kinds = check_members_served(config, servers)
    assert set(kinds) == set(servers), f"servers no member uses: {set(servers) - set(kinds)}"
    hpa = _by_kind(rendered_k8s, "HorizontalPodAutoscaler")["ensemble-gateway"]
    if hpa["spec"]["maxReplicas"] > 1:
        # The prompt-embeds gate is per gateway process (vllm#51122): with several replicas no
        # server may carry both LoRA and soft-prompt members.
        mixed = [s for s, k in kinds.items() if {"lora", "soft_prompt"} <= k]
        assert not mixed, f"servers with LoRA and soft-prompt members behind several gateways: {mixed}"


def test_members_have_a_gpu_and_health_readiness(rendered_k8s: list[dict[str, Any]]) -> None:
    members = _members(rendered_k8s)
    assert len(members) >= 3
    for name, d in [*members.items(), ("ensemble-gateway", _gateway(rendered_k8s))]:
        c = _container(d)
        assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1", name
        assert str(c["resources"]["requests"]["nvidia.com/gpu"]) == "1", name
        assert c["livenessProbe"]["httpGet"]["path"] == "/health", name
        assert c["startupProbe"]["httpGet"]["path"] == "/health", name
    for name, d in members.items():
        assert _container(d)["readinessProbe"]["httpGet"]["path"] == "/health", name
        assert d["spec"]["strategy"]["type"] == "Recreate", f"{name}: a rolling update would need a second GPU"
    # Readiness that does not depend on the members (a member outage must not empty the Service).
    assert _container(_gateway(rendered_k8s))["readinessProbe"]["httpGet"]["path"] == "/ready?scope=gateway"


def test_gateway_is_non_root_and_scaled(rendered_k8s: list[dict[str, Any]]) -> None:
    gateway = _gateway(rendered_k8s)
    pod = gateway["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert _container(gateway)["securityContext"]["readOnlyRootFilesystem"] is True
    assert "replicas" not in gateway["spec"], "the HPA owns replicas"
    hpa = _by_kind(rendered_k8s, "HorizontalPodAutoscaler")["ensemble-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ensemble-gateway"}
    pdb = _by_kind(rendered_k8s, "PodDisruptionBudget")["ensemble-gateway"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(gateway))
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every eviction"


def test_only_the_gateway_reaches_the_members(rendered_k8s: list[dict[str, Any]]) -> None:
    policy = _by_kind(rendered_k8s, "NetworkPolicy")["members-from-gateway-only"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    members = _members(rendered_k8s)
    assert all(_selects(selector, _pod_labels(d)) for d in members.values()), "a member pod is not covered"
    assert not _selects(selector, _pod_labels(_gateway(rendered_k8s)))
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    gateway_labels = _pod_labels(_gateway(rendered_k8s))
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            if "namespaceSelector" in peer:
                # Prometheus, to scrape /metrics: one namespace, one app.
                assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
                assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
            else:
                assert _selects(peer["podSelector"]["matchLabels"], gateway_labels)
        assert [p["port"] for p in rule["ports"]] == [VLLM_PORT]


def test_secrets_example_lists_every_key_the_manifests_use(rendered_k8s: list[dict[str, Any]]) -> None:
    """Each generated Secret's example file lists every key the pods read from that Secret."""
    used: dict[str, set[str]] = {}
    for d in _workloads(rendered_k8s).values():
        for e in _container(d).get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                used.setdefault(ref["name"].rsplit("-", 1)[0], set()).add(ref["key"])
    assert set(used) <= set(K8S_SECRET_EXAMPLES), f"Secrets without an example: {set(used) - set(K8S_SECRET_EXAMPLES)}"
    for secret, keys in used.items():
        example_file = K8S_SECRET_EXAMPLES[secret]
        example = {
            line.split("=", 1)[0]
            for line in (DEPLOY / "k8s" / example_file).read_text().splitlines()
            if line and not line.startswith("#")
        }
        assert keys <= example, f"missing from {example_file}: {keys - example}"
        # The generator reads the example's name without `.example`.
        generator = next(
            g
            for g in yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["secretGenerator"]
            if g["name"] == secret
        )
        assert generator["envs"] == [example_file.removesuffix(".example")], secret


def test_kustomization_files_exist() -> None:
    for kustomization in (DEPLOY / "k8s" / "kustomization.yaml", DEPLOY / "config" / "kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        for resource in data.get("resources", []):
            assert (kustomization.parent / resource).exists(), resource
        for gen in data.get("configMapGenerator", []):
            for f in gen.get("files", []):
                assert (kustomization.parent / f.split("=")[-1]).is_file(), f


# --- the store: PostgreSQL ------------------------------------------------------------------------


def test_postgres_statefulset(rendered_k8s: list[dict[str, Any]]) -> None:
    """One PostgreSQL on the official image (a pinned version), its data on a claim of its own
    (no storage class named: the cluster's default), ready when pg_isready answers over TCP."""
    postgres = _postgres(rendered_k8s)
    spec = postgres["spec"]
    assert spec["replicas"] == 1
    c = _container(postgres)
    image, _, tag = c["image"].partition(":")
    assert image == POSTGRES_IMAGE and tag.startswith("16.") and tag.count(".") == 1, c["image"]
    assert {p["containerPort"] for p in c["ports"]} == {POSTGRES_PORT}
    assert "limits" in c["resources"] and "memory" in c["resources"]["limits"]
    assert {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    probe = c["readinessProbe"]["exec"]["command"]
    assert probe[0] == "pg_isready" and "-h" in probe, probe
    # Its data: a volumeClaimTemplate mounted where PGDATA lives.
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert "storage" in claim["spec"]["resources"]["requests"]
    assert "storageClassName" not in claim["spec"], "like storage.yaml: the operator's class, none hard-coded"
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    env = {e["name"]: e for e in c["env"]}
    assert env["PGDATA"]["value"].startswith(mount["mountPath"].rstrip("/") + "/")
    # Non-root, like the gateway.
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # Its governing Service selects it and serves PostgreSQL's port.
    service = _by_kind(rendered_k8s, "Service")[spec["serviceName"]]
    assert _selects(service["spec"]["selector"], _pod_labels(postgres))
    assert [p["port"] for p in service["spec"]["ports"]] == [POSTGRES_PORT]


def test_gateway_store_url_reaches_postgres(rendered_k8s: list[dict[str, Any]]) -> None:
    """The example's store URL names the postgres Service, its port, and the user and database the
    StatefulSet creates; its password is the gateway's STORE_PASSWORD, from the Secret."""
    config = load_config_with_env(rendered_k8s)
    assert config.store is not None and config.store.url is not None
    url = make_url(config.store.url)
    assert url.get_backend_name() == "postgresql"
    services = _by_kind(rendered_k8s, "Service")
    assert url.host in services, f"no Service {url.host!r}"
    service = services[url.host]
    postgres = _postgres(rendered_k8s)
    assert _selects(service["spec"]["selector"], _pod_labels(postgres))
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    pg_env = {e["name"]: e for e in _container(postgres)["env"]}
    assert url.username == pg_env["POSTGRES_USER"]["value"]
    assert url.database == pg_env["POSTGRES_DB"]["value"]
    assert url.password == SECRET_PLACEHOLDER, "the password must come from a Secret-backed variable"
    assert "${STORE_PASSWORD}" in EXAMPLE_CONFIG.read_text()


def test_store_password_comes_from_its_own_secret(rendered_k8s: list[dict[str, Any]]) -> None:
    """The gateway's STORE_PASSWORD and PostgreSQL's POSTGRES_PASSWORD are one key of one Secret,
    which is not the Secret that holds the client keys."""
    gateway_env = {e["name"]: e for e in _container(_gateway(rendered_k8s))["env"]}
    gw_ref = gateway_env["STORE_PASSWORD"]["valueFrom"]["secretKeyRef"]
    pg_env = {e["name"]: e for e in _container(_postgres(rendered_k8s))["env"]}
    pg_ref = pg_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert gw_ref["name"] == pg_ref["name"] and gw_ref["key"] == pg_ref["key"]
    assert not gw_ref.get("optional", False) and not pg_ref.get("optional", False)
    keys_secret = gateway_env["GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"]
    assert gw_ref["name"] != keys_secret, "the store's password must not share the client keys' Secret"
    secret = _generated(rendered_k8s, "Secret", "postgres-secrets")
    assert secret["metadata"]["name"] == gw_ref["name"]
    assert set(secret["data"]) == {gw_ref["key"]}, "the store's Secret holds its password only"
    assert "GATEWAY_API_KEYS" not in secret["data"]


def test_store_password_reaches_only_gateway_and_postgres(rendered_k8s: list[dict[str, Any]]) -> None:
    secret = _generated(rendered_k8s, "Secret", "postgres-secrets")["metadata"]["name"]
    readers = {name for name, d in _workloads(rendered_k8s).items() if secret in _secret_refs(d)}
    assert readers == {"ensemble-gateway", "postgres"}, readers
    for name, d in _members(rendered_k8s).items():
        assert secret not in _secret_refs(d), f"member {name} can read the store's password"


def test_only_the_gateway_reaches_postgres(rendered_k8s: list[dict[str, Any]]) -> None:
    """Every policy on the postgres pod admits the gateway's pods on 5432, and nothing else; the
    members' policy does not cover it (nor the postgres one the members)."""
    postgres_labels = _pod_labels(_postgres(rendered_k8s))
    gateway_labels = _pod_labels(_gateway(rendered_k8s))
    policies = _network_policies_for(rendered_k8s, postgres_labels)
    assert [p["metadata"]["name"] for p in policies] == ["postgres-from-gateway-only"]
    (policy,) = policies
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"], "an empty rule list would deny the gateway too"
    admitted = False
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every source"
        assert rule.get("ports"), "a rule without `ports` admits every port"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"only pods of this namespace, selected: {peer}"
            assert _selects(peer["podSelector"]["matchLabels"], gateway_labels)
            assert peer["podSelector"]["matchLabels"], "an empty selector admits every pod"
        assert [(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]] == [("TCP", POSTGRES_PORT)]
        admitted = True
    assert admitted
    for member in _members(rendered_k8s).values():
        assert policy not in _network_policies_for(rendered_k8s, _pod_labels(member))
        peers = [peer["podSelector"]["matchLabels"] for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        assert not any(_selects(p, _pod_labels(member)) for p in peers), "a member pod may connect to postgres"


def test_same_postgres_image_in_compose(rendered_k8s: list[dict[str, Any]], compose: dict[str, Any]) -> None:
    assert _container(_postgres(rendered_k8s))["image"] == compose["services"]["postgres"]["image"]


def test_secret_files_are_git_ignored() -> None:
    """Every env file a Secret is generated from is ignored by deploy/.gitignore (its example is not)."""
    import fnmatch

    patterns = [
        line.strip()
        for line in (DEPLOY / ".gitignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for example in K8S_SECRET_EXAMPLES.values():
        path = "/k8s/" + example.removesuffix(".example")
        ignored = any(fnmatch.fnmatch(path, p if p.startswith("/") else "*/" + p) for p in patterns)
        assert ignored, f"deploy/.gitignore does not ignore deploy{path}: a password could be committed"


def test_postgres_takes_every_gateway_pool(rendered_k8s: list[dict[str, Any]]) -> None:
    """Each replica's pool (SQLAlchemy's default: 5 + 10 overflow) fits PostgreSQL's
    max_connections at the HPA's ceiling plus the rollout's surge, with the superuser's 3 reserved."""
    pool = 5 + 10
    args = [str(a) for a in _container(_postgres(rendered_k8s)).get("args", [])]
    settings = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "-c")
    max_connections = int(settings.get("max_connections", "100"))
    hpa = _by_kind(rendered_k8s, "HorizontalPodAutoscaler")["ensemble-gateway"]
    surge = int(_gateway(rendered_k8s)["spec"]["strategy"]["rollingUpdate"]["maxSurge"])
    assert (hpa["spec"]["maxReplicas"] + surge) * pool <= max_connections - 3, max_connections


def _service_for(docs: list[dict[str, Any]], url: str) -> tuple[dict[str, Any], int]:
    """The Service an in-cluster URL names (``scheme://service:port...``), and the port."""
    parts = urlsplit(url)
    services = _by_kind(docs, "Service")
    assert parts.hostname in services, f"no Service {parts.hostname!r} for {url}"
    service = services[parts.hostname]
    assert parts.port in [p["port"] for p in service["spec"]["ports"]], url
    return service, int(parts.port or 0)


def test_limits_are_shared_through_the_redis_service(rendered_k8s: list[dict[str, Any]]) -> None:
    """The gateway's replicas count per-key limits in the `redis` Service, which selects the Redis
    Deployment; only the gateway may reach it."""
    config = load_config_with_env(rendered_k8s)
    assert config.limits.store is not None and config.limits.per_key is not None
    service, port = _service_for(rendered_k8s, config.limits.store)
    redis = _by_kind(rendered_k8s, "Deployment")["redis"]
    assert _selects(service["spec"]["selector"], _pod_labels(redis))
    assert port in [p["containerPort"] for p in _container(redis)["ports"]]
    policies = _network_policies_for(rendered_k8s, _pod_labels(redis))
    assert [p["metadata"]["name"] for p in policies] == ["redis-from-gateway-only"]
    sources = [f for p in policies for rule in p["spec"]["ingress"] for f in rule["from"]]
    assert all(_selects(f["podSelector"]["matchLabels"], _pod_labels(_gateway(rendered_k8s))) for f in sources)


def test_traces_reach_jaeger_from_the_gateway_and_every_vllm_member(rendered_k8s: list[dict[str, Any]]) -> None:
    env = {e["name"]: e.get("value") for e in _container(_gateway(rendered_k8s))["env"]}
    service, port = _service_for(rendered_k8s, env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    jaeger = _by_kind(rendered_k8s, "Deployment")["jaeger"]
    assert _selects(service["spec"]["selector"], _pod_labels(jaeger)) and port == 4318  # OTLP/HTTP
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1
    vllm = {n: d for n, d in _members(rendered_k8s).items() if _container(d)["image"].startswith("vllm/")}
    assert vllm
    for name, member in vllm.items():
        container = _container(member)
        endpoint = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--otlp-traces-endpoint=")]
        assert len(endpoint) == 1, name
        assert _service_for(rendered_k8s, endpoint[0]) == (service, 4317), name  # OTLP/gRPC
        member_env = {e["name"]: e.get("value") for e in container["env"]}
        assert member_env["OTEL_EXPORTER_OTLP_TRACES_INSECURE"] == "true", name
