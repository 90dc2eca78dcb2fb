"""deploy/k8s rendered by kustomize, every resource validated against Kubernetes' schemas
(kubernetes-validate, strict: unknown fields fail), and checked against the example config."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import expand_env, parse_config
from tests.deploy.conftest import DEPLOY, EXAMPLE_CONFIG, VLLM_PORT, Server, check_members_served

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
    ]:
        assert wanted in names, wanted
    generated = sorted(n for k, n in names if k in ("ConfigMap", "Secret"))
    assert [n.rsplit("-", 1)[0] for n in generated] == ["ensemble-gateway-config", "gateway-secrets"], generated
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
    (secret,) = [d for d in rendered_k8s if d["kind"] == "Secret"]
    env = {e["name"]: e for e in _container(_gateway(rendered_k8s))["env"]}
    config = load_config_with_env(rendered_k8s)
    for var in (config.auth.api_keys_env, config.auth.admin_key_env):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"], var


def load_config_with_env(docs: list[dict[str, Any]]) -> Any:
    """The example config as the gateway pod reads it: with the Deployment's plain env values."""
    env = {e["name"]: e["value"] for e in _container(_gateway(docs))["env"] if "value" in e}
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
    assert _container(_gateway(rendered_k8s))["readinessProbe"]["httpGet"]["path"] == "/ready"


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
    (policy,) = _by_kind(rendered_k8s, "NetworkPolicy").values()
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
    example = {
        line.split("=", 1)[0]
        for line in (DEPLOY / "k8s" / "secrets.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    used = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for d in _by_kind(rendered_k8s, "Deployment").values()
        for e in _container(d).get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert used <= example, f"missing from secrets.env.example: {used - example}"


def test_kustomization_files_exist() -> None:
    for kustomization in (DEPLOY / "k8s" / "kustomization.yaml", DEPLOY / "config" / "kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        for resource in data.get("resources", []):
            assert (kustomization.parent / resource).exists(), resource
        for gen in data.get("configMapGenerator", []):
            for f in gen.get("files", []):
                assert (kustomization.parent / f.split("=")[-1]).is_file(), f
