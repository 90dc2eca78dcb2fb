"""deploy/k8s rendered by kustomize, every resource validated against Kubernetes' schemas
(kubernetes-validate, strict: unknown fields fail), and checked against the configurations it
mounts (deploy/config/cluster.yaml for the gateways, tier.yaml for the model tier), the metrics the
components export, and the GPU table in docs/DEPLOY.md."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest
from sqlalchemy.engine import make_url

from service.cli import build_parser, main
from service.config import expand_env, load_tier_config, parse_config
from tests.deploy.conftest import (
    CLUSTER_CONFIG,
    DEPLOY,
    EXAMPLE_CONFIG,
    K8S_SECRET_EXAMPLES,
    MODELS_IMAGE,
    POSTGRES_IMAGE,
    POSTGRES_PORT,
    ROOT,
    TIER_CONFIG,
    VLLM_PORT,
    Server,
    check_members_served,
    flag_value,
    promtool,
    require_tool,
    runtime_lora,
)

K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests are meant for
GPU = "nvidia.com/gpu"
MODEL_VOLUME = "model-cache"  # the shared Hugging Face cache that job/model-download fills
MODELS_DIR = "/models"  # where every pod mounts it (HF_HOME)
OPS_PORT = 9000  # the gateway's operators' port (serve --ops-port)
ADAPTER_RULES = DEPLOY / "k8s" / "autoscaling" / "prometheus-adapter-values.yaml"
STORAGE_CLASS = DEPLOY / "k8s" / "storage-class.yaml"
DEPLOY_MD = ROOT / "docs" / "DEPLOY.md"
# Prometheus, as networkpolicy.yaml admits it: its pods in the namespace `monitoring`.
MONITORING_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
}


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = _pod(workload)["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _all_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    pod = _pod(workload)
    return [*pod.get("initContainers", []), *pod["containers"]]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _gateway(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "Deployment")["ensemble-gateway"]


def _tier(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "Deployment")["ensemble-models"]


def _download(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "Job")["model-download"]


def _postgres(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _by_kind(docs, "StatefulSet")["postgres"]


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Everything that runs pods: Deployments, StatefulSets and Jobs, by name."""
    return {**_by_kind(docs, "Deployment"), **_by_kind(docs, "StatefulSet"), **_by_kind(docs, "Job")}


def _generated(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """A generated ConfigMap or Secret by its name without kustomize's hash suffix."""
    (found,) = [d for d in docs if d["kind"] == kind and _unhashed(d["metadata"]["name"]) == name]
    return found


def _unhashed(name: str) -> str:
    return name.rsplit("-", 1)[0]


def _secret_refs(workload: dict[str, Any]) -> set[str]:
    """Every Secret a workload's pods can read: env, envFrom and volumes, init containers too."""
    pod = _pod(workload)
    names = set()
    for c in _all_containers(workload):
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


def _secret_env(container: dict[str, Any], var: str) -> tuple[str, str]:
    """(Secret without its hash, key) that env var ``var`` of ``container`` comes from; required."""
    env = _env(container)
    assert var in env, f"{container['name']}: no {var}"
    ref = env[var].get("valueFrom", {}).get("secretKeyRef")
    assert ref is not None, f"{container['name']}: {var} does not come from a Secret"
    assert not ref.get("optional", False), f"{var}: a Secret key that must be there"
    return _unhashed(ref["name"]), ref["key"]


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


def _vllm_members(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: d for n, d in _members(docs).items() if _container(d)["image"].startswith("vllm/")}


def _gpus(workload: dict[str, Any]) -> int:
    """GPUs one pod of ``workload`` requests (every container, init containers too)."""
    requested = [int(c.get("resources", {}).get("requests", {}).get(GPU, 0)) for c in _all_containers(workload)]
    limited = [int(c.get("resources", {}).get("limits", {}).get(GPU, 0)) for c in _all_containers(workload)]
    assert requested == limited, "a GPU is requested as much as it is limited"
    return sum(requested)


def _hpa_for(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any] | None:
    hpas = [
        h
        for h in _by_kind(docs, "HorizontalPodAutoscaler").values()
        if h["spec"]["scaleTargetRef"]["name"] == deployment
    ]
    assert len(hpas) <= 1, deployment
    return hpas[0] if hpas else None


def _replicas(docs: list[dict[str, Any]], workload: dict[str, Any]) -> tuple[int, int]:
    """(fewest, most) pods outside rollouts: the HPA's bounds, else spec.replicas."""
    hpa = _hpa_for(docs, workload["metadata"]["name"])
    if hpa is not None:
        assert "replicas" not in workload["spec"], "the HPA owns replicas"
        return int(hpa["spec"].get("minReplicas", 1)), int(hpa["spec"]["maxReplicas"])
    n = int(workload["spec"].get("replicas", 1))
    return n, n


def _pods_metric(hpa: dict[str, Any]) -> tuple[str, float]:
    """The one Pods metric an HPA scales on: (name, averageValue)."""
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods", metric
    assert metric["pods"]["target"]["type"] == "AverageValue", metric
    return metric["pods"]["metric"]["name"], float(metric["pods"]["target"]["averageValue"])


def _families(exposition: str) -> dict[str, str]:
    """Metric family name -> type, from a text exposition's `# TYPE` lines."""
    return {line.split()[2]: line.split()[3] for line in exposition.splitlines() if line.startswith("# TYPE ")}


def _loaded_models(workload: dict[str, Any]) -> set[str]:
    """The hub repos a pod loads: a vLLM server's model, the adapter server's --model, the tier's
    checkpoints."""
    c = _container(workload)
    args = [str(a) for a in c.get("args", [])]
    if c["image"].startswith("vllm/"):
        return {args[0]}
    if args and args[0] == "serve-models":
        tier = load_tier_config(TIER_CONFIG)
        return {r.checkpoint for r in tier.rankers.values()} | {f.checkpoint for f in tier.fusers.values()}
    model = flag_value(args, "--model")
    assert model is not None, workload["metadata"]["name"]
    return {model}


def _model_volume_users(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        n: d
        for n, d in _workloads(docs).items()
        if any(v.get("persistentVolumeClaim", {}).get("claimName") == MODEL_VOLUME for v in _pod(d).get("volumes", []))
    }


# --- the whole -----------------------------------------------------------------------------------


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
        ("NetworkPolicy", "gateway-ops-from-monitoring-only"),
        ("Deployment", "ensemble-models"),
        ("Service", "ensemble-models"),
        ("HorizontalPodAutoscaler", "ensemble-models"),
        ("PodDisruptionBudget", "ensemble-models"),
        ("NetworkPolicy", "models-from-gateway-only"),
        ("Job", "model-download"),
        ("PersistentVolumeClaim", MODEL_VOLUME),
        ("PodDisruptionBudget", "members"),
        ("NetworkPolicy", "members-from-gateway-only"),
        ("StatefulSet", "postgres"),
        ("Service", "postgres"),
        ("NetworkPolicy", "postgres-from-gateway-only"),
    ]:
        assert wanted in names, wanted
    # The soft prompt's server is gone with the soft prompt (cluster.yaml).
    assert ("Deployment", "vllm-llama-embeds") not in names
    generated = sorted(n for k, n in names if k in ("ConfigMap", "Secret"))
    assert sorted(_unhashed(n) for n in generated) == sorted(
        ["ensemble-gateway-config", "model-tier-config", *K8S_SECRET_EXAMPLES]
    ), generated
    assert {d["metadata"].get("namespace") for d in rendered_k8s if d["kind"] != "Namespace"} == {"ensemble"}


def test_images_are_the_kustomization_s(rendered_k8s: list[dict[str, Any]]) -> None:
    """The project's three images (gateway, model tier, adapter server; each its Dockerfile) are named
    in `images:`, and every pod runs a pinned image: one of those, or an upstream one with a tag."""
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    ours = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization["images"]}
    dockerfiles = {
        "ensemble-gateway": "Dockerfile",
        MODELS_IMAGE: "Dockerfile.models",
        "ensemble-gateway-adapters": "Dockerfile.adapters",
    }
    assert set(ours) == set(dockerfiles)
    assert all((DEPLOY / f).is_file() for f in dockerfiles.values())
    assert _container(_gateway(rendered_k8s))["image"] == ours["ensemble-gateway"]
    assert _container(_tier(rendered_k8s))["image"] == ours[MODELS_IMAGE]
    assert _container(_download(rendered_k8s))["image"] == ours[MODELS_IMAGE]
    for name, d in _workloads(rendered_k8s).items():
        for c in _all_containers(d):
            assert ":" in c["image"].rsplit("/", 1)[-1], f"{name}: {c['image']} has no tag"


def test_config_maps_are_the_config_files(rendered_k8s: list[dict[str, Any]]) -> None:
    """One copy each: the gateway's ConfigMap holds deploy/config/cluster.yaml, the tier's tier.yaml,
    as they are, under content-hashed names that their pod templates refer to (so a change rolls
    that Deployment out), mounted where `--config` points."""
    for workload, name, path in [
        (_gateway(rendered_k8s), "ensemble-gateway-config", CLUSTER_CONFIG),
        (_tier(rendered_k8s), "model-tier-config", TIER_CONFIG),
    ]:
        cm = _generated(rendered_k8s, "ConfigMap", name)
        assert cm["data"] == {path.name: path.read_text()}
        assert cm["metadata"]["name"] != name, "the name must carry the content hash"
        volumes = {v["name"]: v for v in _pod(workload)["volumes"]}
        assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
        container = _container(workload)
        mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
        assert flag_value(container["args"], "--config") == f"{mount['mountPath']}/{path.name}"
        assert "subPath" not in mount


# --- the configurations: cluster.yaml and tier.yaml ------------------------------------------------


SECRET_PLACEHOLDER = "from-the-secret"


def load_config_with_env(docs: list[dict[str, Any]]) -> Any:
    """cluster.yaml as the gateway pod reads it: with the Deployment's plain env values, and a
    placeholder for each one that a Secret supplies (no other variable is set in the pod)."""
    env = {}
    for e in _container(_gateway(docs))["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif "secretKeyRef" in e.get("valueFrom", {}):
            env[e["name"]] = SECRET_PLACEHOLDER
    return parse_config(expand_env(CLUSTER_CONFIG.read_text(), env), str(CLUSTER_CONFIG))


def _compose_config() -> Any:
    """ensemble.yaml as compose's gateway reads it (the store's password from the environment)."""
    return parse_config(expand_env(EXAMPLE_CONFIG.read_text(), {"STORE_PASSWORD": "x"}), str(EXAMPLE_CONFIG))


def test_cluster_config_is_ensemble_yaml_without_the_soft_prompt(rendered_k8s: list[dict[str, Any]]) -> None:
    """The cluster's members are compose's, less the soft prompt (a gateway without torch cannot
    build prompt_embeds), with the members' key added; the ensembles the same, less that member.
    So the two files cannot drift apart."""
    cluster, compose = load_config_with_env(rendered_k8s), _compose_config()
    soft = {m.name for m in compose.members if m.kind == "soft_prompt"}
    assert soft, "ensemble.yaml has a soft-prompt member"
    assert not [m for m in cluster.members if m.kind == "soft_prompt"], "the torchless gateway serves no soft prompt"

    def dump(members: Any) -> list[dict[str, Any]]:
        return [m.model_dump(exclude={"api_key_env"}) for m in members]

    assert dump(cluster.members) == dump(m for m in compose.members if m.name not in soft)
    assert set(cluster.ensembles) == set(compose.ensembles)
    for name, ensemble in cluster.ensembles.items():
        expected = compose.ensembles[name].model_copy(
            update={"members": [m for m in compose.ensembles[name].members if m not in soft]}
        )
        assert ensemble.model_dump() == expected.model_dump(), name
    assert cluster.default == compose.default
    assert cluster.auth.model_dump() == compose.auth.model_dump()
    assert cluster.logging.model_dump() == compose.logging.model_dump()
    assert cluster.limits.per_key == compose.limits.per_key
    assert make_url(cluster.store.url).set(password="") == make_url(compose.store.url).set(password="")


def test_tier_serves_ensemble_yaml_models() -> None:
    """The tier's rankers and fusers are compose's in-process ones, setting for setting, and the
    cluster's gateway names each of them remotely (kind remote, by its name there)."""
    tier, compose = load_tier_config(TIER_CONFIG), _compose_config()
    assert {n: r.model_dump() for n, r in tier.rankers.items()} == {
        n: r.model_dump() for n, r in compose.rankers.items()
    }
    assert {n: f.model_dump() for n, f in tier.fusers.items()} == {n: f.model_dump() for n, f in compose.fusers.items()}
    assert all(r.device.startswith("cuda") for r in tier.rankers.values())
    assert all(f.device.startswith("cuda") for f in tier.fusers.values())
    cluster = parse_config(expand_env(CLUSTER_CONFIG.read_text(), {"STORE_PASSWORD": "x"}), str(CLUSTER_CONFIG))
    remote: list[tuple[str, Any, set[str]]] = [(n, m, set(tier.rankers)) for n, m in cluster.rankers.items()]
    remote += [(n, m, set(tier.fusers)) for n, m in cluster.fusers.items()]
    for name, model, served in remote:
        assert model.kind == "remote", f"{name}: the cluster's gateway loads no model"
        assert (model.model or name) in served, name


def test_cluster_check_config_passes(
    adapters_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real `ensemble-gateway check-config` on cluster.yaml, adapters included (stand-ins)."""
    monkeypatch.setenv("ADAPTERS_DIR", str(adapters_dir))
    monkeypatch.setenv("STORE_PASSWORD", "from-the-environment")
    assert main(["check-config", str(CLUSTER_CONFIG)]) == 0, capsys.readouterr().err
    assert "ok: 5 members" in capsys.readouterr().out


def test_commands_parse(rendered_k8s: list[dict[str, Any]]) -> None:
    """The gateway's and the tier's command lines, as the Deployments give them, parse with the CLI
    (the gateway's with its operators' port)."""
    gateway = build_parser().parse_args(_container(_gateway(rendered_k8s))["args"])
    assert (gateway.command, gateway.host, gateway.port, gateway.ops_port) == ("serve", "0.0.0.0", 8000, OPS_PORT)
    tier = build_parser().parse_args(_container(_tier(rendered_k8s))["args"])
    assert (tier.command, tier.host, tier.port) == ("serve-models", "0.0.0.0", 8001)


# --- the gateway ---------------------------------------------------------------------------------


def test_gateway_keys_come_from_the_secret(rendered_k8s: list[dict[str, Any]]) -> None:
    secret = _generated(rendered_k8s, "Secret", "gateway-secrets")
    env = _env(_container(_gateway(rendered_k8s)))
    config = load_config_with_env(rendered_k8s)
    for var in (config.auth.api_keys_env, config.auth.admin_key_env):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["data"], var


def test_gateway_has_no_gpu_no_model_and_no_hub_token(rendered_k8s: list[dict[str, Any]]) -> None:
    """The gateway loads no model: no GPU requested or tolerated, no model volume, no hub token."""
    gateway = _gateway(rendered_k8s)
    pod = _pod(gateway)
    assert _gpus(gateway) == 0
    for c in _all_containers(gateway):
        assert GPU not in c.get("resources", {}).get("limits", {}), c["name"]
        assert not {"HF_TOKEN", "HF_HOME", "HUGGING_FACE_HUB_TOKEN"} & set(_env(c)), c["name"]
    assert not [t for t in pod.get("tolerations", []) if t.get("key") == GPU], "a GPU node's taint is tolerated"
    assert MODEL_VOLUME not in {v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    hub = _generated(rendered_k8s, "Secret", "hub-token")["metadata"]["name"]
    assert hub not in _secret_refs(gateway)
    requests = _container(gateway)["resources"]["requests"]
    assert set(requests) == {"cpu", "memory"}


def test_gateway_readiness_ignores_members_and_tier(rendered_k8s: list[dict[str, Any]]) -> None:
    """Ready while the gateway itself can serve, whatever its members and the tier do: a member
    outage must not empty the Service (clients would get connection errors, not the JSON 503)."""
    c = _container(_gateway(rendered_k8s))
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready?scope=gateway"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"


def test_gateway_operators_port(rendered_k8s: list[dict[str, Any]]) -> None:
    """/metrics and the status are on the operators' port (--ops-port): Prometheus scrapes it, the
    clients' Service does not expose it, and only Prometheus in `monitoring` may reach it."""
    gateway = _gateway(rendered_k8s)
    c = _container(gateway)
    assert flag_value(c["args"], "--ops-port") == str(OPS_PORT)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": int(flag_value(c["args"], "--port") or 0), "ops": OPS_PORT}
    annotations = gateway["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(OPS_PORT) and annotations["prometheus.io/path"] == "/metrics"
    service = _by_kind(rendered_k8s, "Service")["ensemble-gateway"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8000, "http")]
    policies = _network_policies_for(rendered_k8s, _pod_labels(gateway))
    assert [p["metadata"]["name"] for p in policies] == ["gateway-ops-from-monitoring-only"]
    (policy,) = policies
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        ports_of_rule = [p["port"] for p in rule["ports"]]
        if OPS_PORT in ports_of_rule:
            assert ports_of_rule == [OPS_PORT] and rule["from"] == [MONITORING_PEER], rule
        else:
            assert ports_of_rule == [8000], rule  # the API: from anywhere


def test_gateway_is_non_root_and_scaled(rendered_k8s: list[dict[str, Any]]) -> None:
    gateway = _gateway(rendered_k8s)
    pod = _pod(gateway)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert _container(gateway)["securityContext"]["readOnlyRootFilesystem"] is True
    assert "replicas" not in gateway["spec"], "the HPA owns replicas"
    hpa = _by_kind(rendered_k8s, "HorizontalPodAutoscaler")["ensemble-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ensemble-gateway"}
    pdb = _by_kind(rendered_k8s, "PodDisruptionBudget")["ensemble-gateway"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(gateway))
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "the PDB would block every eviction"


# --- autoscaling ---------------------------------------------------------------------------------


def test_gateway_hpa_scales_on_requests_in_flight(rendered_k8s: list[dict[str, Any]]) -> None:
    """A Pods metric that the gateway really exports (its registry, rendered as /metrics renders it),
    a gauge, with a target below one replica's admission (scale out before requests queue)."""
    from service.telemetry.metrics import Metrics

    name, target = _pods_metric(_by_kind(rendered_k8s, "HorizontalPodAutoscaler")["ensemble-gateway"])
    families = _families(generate_latest(Metrics().registry).decode())
    assert families.get(name) == "gauge", f"the gateway exports no gauge {name!r}"
    assert name == "gateway_requests_in_flight"
    assert 0 < target < load_config_with_env(rendered_k8s).limits.max_in_flight


def test_tier_hpa_scales_on_its_queue(rendered_k8s: list[dict[str, Any]]) -> None:
    """The tier's HPA: a Pods metric the tier exports (its own registry), on the tier's Deployment,
    from one replica up."""
    from service.serving.tier import Models

    hpa = _by_kind(rendered_k8s, "HorizontalPodAutoscaler")["ensemble-models"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ensemble-models"}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    name, target = _pods_metric(hpa)
    families = _families(generate_latest(Models().registry).decode())
    assert families.get(name) == "gauge", f"the tier exports no gauge {name!r}"
    assert name == "tier_queue_depth" and target > 0


def test_prometheus_adapter_serves_each_hpa_metric(rendered_k8s: list[dict[str, Any]], tmp_path: Path) -> None:
    """deploy/k8s/autoscaling/prometheus-adapter-values.yaml has a rule per HPA metric: the series of
    that name, tied to its namespace and pod, exposed under the name the HPA asks for; its query,
    with the adapter's placeholders filled in, parses as PromQL (promtool)."""
    values = yaml.safe_load(ADAPTER_RULES.read_text())
    rules = values["rules"]["custom"]
    wanted = {_pods_metric(h)[0] for h in _by_kind(rendered_k8s, "HorizontalPodAutoscaler").values()}
    assert wanted == {"gateway_requests_in_flight", "tier_queue_depth"}
    queries = []
    for name in sorted(wanted):
        (rule,) = [r for r in rules if r["name"]["as"] == name]
        series = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", rule["seriesQuery"])
        assert series is not None and series.group(0) == name, rule["seriesQuery"]
        assert re.fullmatch(rule["name"]["matches"], name), rule["name"]
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        query = rule["metricsQuery"]
        assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(re.findall(r"<<\.\w+>>", query)), query
        filled = (
            query.replace("<<.Series>>", name)
            .replace("<<.LabelMatchers>>", 'namespace="ensemble",pod=~"a|b"')
            .replace("<<.GroupBy>>", "pod")
        )
        queries.append({"record": f"adapter:{name}", "expr": filled})
    path = tmp_path / "adapter-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": queries}]}))
    proc = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Not applied with deploy/k8s: the adapter is cluster-wide, installed with its Helm chart.
    resources = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    assert not [r for r in resources if r.startswith("autoscaling")]


# --- the model tier ------------------------------------------------------------------------------


def test_remote_models_reach_the_tier_with_its_key(rendered_k8s: list[dict[str, Any]]) -> None:
    """Each remote ranker and fuser of cluster.yaml names the tier's Service, whose port leads to the
    tier's container port; the key the gateway sends is one the tier accepts (the same Secret)."""
    config = load_config_with_env(rendered_k8s)
    tier = _tier(rendered_k8s)
    container = _container(tier)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    gateway = _container(_gateway(rendered_k8s))
    tier_config = load_tier_config(TIER_CONFIG)
    assert tier_config.api_keys_env is not None
    accepted = _secret_env(container, tier_config.api_keys_env)
    for model in [*config.rankers.values(), *config.fusers.values()]:
        service, port = _service_for(rendered_k8s, model.endpoint)
        assert _selects(service["spec"]["selector"], _pod_labels(tier))
        (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
        assert ports[service_port["targetPort"]] == int(flag_value(container["args"], "--port") or 0)
        assert model.api_key_env is not None
        sent = _secret_env(gateway, model.api_key_env)
        assert sent[0] == accepted[0] == "model-tier-secrets", (sent, accepted)
        example = _example_keys("model-tier-secrets")
        assert {sent[1], accepted[1]} <= example


def test_tier_has_a_gpu_probes_and_a_pdb(rendered_k8s: list[dict[str, Any]]) -> None:
    tier = _tier(rendered_k8s)
    c = _container(tier)
    assert _gpus(tier) == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready", "ready once its models are loaded"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "loading takes minutes"
    pdb = _by_kind(rendered_k8s, "PodDisruptionBudget")["ensemble-models"]
    assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(tier))
    hpa = _by_kind(rendered_k8s, "HorizontalPodAutoscaler")["ensemble-models"]
    # A drain must not hang on the tier at its fewest replicas.
    assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_only_the_gateway_reaches_the_tier(rendered_k8s: list[dict[str, Any]]) -> None:
    tier = _tier(rendered_k8s)
    policies = _network_policies_for(rendered_k8s, _pod_labels(tier))
    assert [p["metadata"]["name"] for p in policies] == ["models-from-gateway-only"]
    gateway_labels = _pod_labels(_gateway(rendered_k8s))
    for rule in policies[0]["spec"]["ingress"]:
        for peer in rule["from"]:
            assert peer == MONITORING_PEER or set(peer) == {"podSelector"}, peer
            if peer != MONITORING_PEER:
                assert _selects(peer["podSelector"]["matchLabels"], gateway_labels)
        assert [p["port"] for p in rule["ports"]] == [8001]


# --- the members ---------------------------------------------------------------------------------


def _servers(docs: list[dict[str, Any]]) -> dict[str, Server]:
    """The member servers by Service name, as check_members_served takes them."""
    deployments = _members(docs)
    servers = {}
    for name, svc in _by_kind(docs, "Service").items():
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
    return servers


def _members_by_server(docs: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """cluster.yaml's members by the Service (== Deployment) name of their server."""
    out: dict[str, list[Any]] = {}
    for m in load_config_with_env(docs).members:
        out.setdefault(urlsplit(m.endpoint).hostname or "", []).append(m)
    return out


def test_every_member_is_served(rendered_k8s: list[dict[str, Any]]) -> None:
    servers = _servers(rendered_k8s)
    kinds = check_members_served(load_config_with_env(rendered_k8s), servers)
    assert set(kinds) == set(servers), f"servers no member uses: {set(servers) - set(kinds)}"
    assert set(servers) == set(_members(rendered_k8s)), "each member Deployment has its Service of the same name"


def test_members_have_a_gpu_and_health_readiness(rendered_k8s: list[dict[str, Any]]) -> None:
    members = _members(rendered_k8s)
    assert len(members) >= 3
    for name, d in members.items():
        c = _container(d)
        assert _gpus(d) == 1, name
        assert c["livenessProbe"]["httpGet"]["path"] == "/health", name
        assert c["startupProbe"]["httpGet"]["path"] == "/health", name
        assert c["readinessProbe"]["httpGet"]["path"] == "/health", name
        assert d["spec"]["strategy"]["type"] == "Recreate", f"{name}: a rolling update would need a second GPU"


def test_member_servers_require_the_key_the_gateway_sends(rendered_k8s: list[dict[str, Any]]) -> None:
    """Every member server (the vLLM ones and the adapter server, which reads VLLM_API_KEY as vLLM
    does) takes an API key from members-secrets (VLLM_API_KEY, or --api-key from it), and every member
    on it sends that key: its api_key_env is a gateway variable from the same key."""
    gateway = _container(_gateway(rendered_k8s))
    by_server = _members_by_server(rendered_k8s)
    servers = _members(rendered_k8s)
    assert len(servers) > len(_vllm_members(rendered_k8s))  # the adapter server too
    for name, d in servers.items():
        c = _container(d)
        api_key = flag_value([str(a) for a in c["args"]], "--api-key")
        var = api_key[2:-1] if api_key and api_key.startswith("$(") else "VLLM_API_KEY"
        assert api_key is None or api_key == f"$({var})", f"{name}: --api-key must come from the Secret"
        served_key = _secret_env(c, var)
        assert served_key[0] == "members-secrets", name
        assert by_server[name], name
        for m in by_server[name]:
            assert m.api_key_env is not None, f"member {m.name}: sends no key to {name}"
            assert _secret_env(gateway, m.api_key_env) == served_key, m.name


def test_runtime_lora_only_where_a_member_loads_one(rendered_k8s: list[dict[str, Any]]) -> None:
    """A server lets clients load LoRA adapters (VLLM_ALLOW_RUNTIME_LORA_UPDATING) exactly when a
    member of cluster.yaml on it is a LoRA with `load: runtime`."""
    servers = _servers(rendered_k8s)
    by_server = _members_by_server(rendered_k8s)
    for name in _vllm_members(rendered_k8s):
        needed = any(m.kind == "lora" and m.load == "runtime" for m in by_server.get(name, []))
        assert runtime_lora(servers[name]) == needed, name


def test_one_disruption_budget_over_all_members(rendered_k8s: list[dict[str, Any]]) -> None:
    """A node drain takes at most one member at a time (none while one is down), so the ensembles
    keep their quorum; the budget covers every member and nothing else, and no other budget covers a
    member."""
    budgets = _by_kind(rendered_k8s, "PodDisruptionBudget")
    pdb = budgets["members"]
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    selector = pdb["spec"]["selector"]["matchLabels"]
    members = _members(rendered_k8s)
    for name, d in _workloads(rendered_k8s).items():
        assert _selects(selector, _pod_labels(d)) == (name in members), name
    for other, budget in budgets.items():
        if other != "members":
            assert not any(
                _selects(budget["spec"]["selector"]["matchLabels"], _pod_labels(d)) for d in members.values()
            )
    # With one member down, the others of each ensemble still make its quorum.
    config = load_config_with_env(rendered_k8s)
    by_server = _members_by_server(rendered_k8s)
    for ensemble in config.ensembles.values():
        for server, on_it in by_server.items():
            left = [m for m in ensemble.members if m not in {x.name for x in on_it}]
            assert len(left) >= ensemble.min_candidates, f"{server} down: {left}"


def test_members_drain_before_they_stop(rendered_k8s: list[dict[str, Any]]) -> None:
    """Each member pod pauses in preStop (its Service drops it meanwhile), then finishes the calls
    it has: vLLM within --shutdown-timeout, at least the longest timeout_s of the members on it; the
    grace period covers both."""
    by_server = _members_by_server(rendered_k8s)
    for name, d in _members(rendered_k8s).items():
        c = _container(d)
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep", name
        pause = int(command[1])
        longest = max(m.timeout_s for m in by_server[name])
        if c["image"].startswith("vllm/"):
            drain = int(flag_value([str(a) for a in c["args"]], "--shutdown-timeout") or 0)
            assert drain >= longest, f"{name}: --shutdown-timeout {drain} < a member's timeout_s {longest}"
        else:
            drain = int(longest)  # uvicorn finishes what it has
        assert pause >= 5, name
        assert _pod(d)["terminationGracePeriodSeconds"] > pause + drain, name


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
                assert peer == MONITORING_PEER  # Prometheus, to scrape /metrics: one namespace, one app
            else:
                assert _selects(peer["podSelector"]["matchLabels"], gateway_labels)
        assert [p["port"] for p in rule["ports"]] == [VLLM_PORT]


# --- secrets -------------------------------------------------------------------------------------


def _example_keys(secret: str) -> set[str]:
    example = (DEPLOY / "k8s" / K8S_SECRET_EXAMPLES[secret]).read_text()
    return {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")}


def test_each_secret_reaches_only_its_readers(rendered_k8s: list[dict[str, Any]]) -> None:
    """One Secret per audience: the hub token only in the download Job; the members' key in the member
    servers (vLLM's and the adapter server) and the gateway; the tier's keys in the tier and the
    gateway; the store's password in PostgreSQL and the gateway; the client keys in the gateway alone."""
    workloads = _workloads(rendered_k8s)
    readers: dict[str, set[str]] = {}
    for name, d in workloads.items():
        for secret in _secret_refs(d):
            readers.setdefault(_unhashed(secret), set()).add(name)
    assert readers == {
        "hub-token": {"model-download"},
        "members-secrets": {"ensemble-gateway", *_members(rendered_k8s)},
        "model-tier-secrets": {"ensemble-gateway", "ensemble-models"},
        "postgres-secrets": {"ensemble-gateway", "postgres"},
        "gateway-secrets": {"ensemble-gateway"},
    }, readers
    # The hub token is nowhere else, under any name.
    for name, d in workloads.items():
        if name != "model-download":
            assert not [c for c in _all_containers(d) if {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & set(_env(c))], name
    assert set(_generated(rendered_k8s, "Secret", "hub-token")["data"]) == {"HF_TOKEN"}
    assert "HF_TOKEN" not in _generated(rendered_k8s, "Secret", "gateway-secrets")["data"]


def test_secrets_example_lists_every_key_the_manifests_use(rendered_k8s: list[dict[str, Any]]) -> None:
    """Each generated Secret's example file lists every key the pods read from that Secret, and
    the generator reads the example's name without `.example`."""
    used: dict[str, set[str]] = {}
    for d in _workloads(rendered_k8s).values():
        for c in _all_containers(d):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(_unhashed(ref["name"]), set()).add(ref["key"])
    assert set(used) == set(K8S_SECRET_EXAMPLES), (
        f"Secrets without an example, or unused: {set(used) ^ set(K8S_SECRET_EXAMPLES)}"
    )
    generators = {
        g["name"]: g for g in yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["secretGenerator"]
    }
    for secret, keys in used.items():
        example_file = K8S_SECRET_EXAMPLES[secret]
        assert keys <= _example_keys(secret), f"missing from {example_file}: {keys - _example_keys(secret)}"
        assert generators[secret]["envs"] == [example_file.removesuffix(".example")], secret


def test_kustomization_files_exist() -> None:
    for kustomization in (DEPLOY / "k8s" / "kustomization.yaml", DEPLOY / "config" / "kustomization.yaml"):
        data = yaml.safe_load(kustomization.read_text())
        for resource in data.get("resources", []):
            assert (kustomization.parent / resource).exists(), resource
        for gen in data.get("configMapGenerator", []):
            for f in gen.get("files", []):
                assert (kustomization.parent / f.split("=")[-1]).is_file(), f


# --- storage and the models' download ------------------------------------------------------------


def _storage_class() -> str:
    value = yaml.safe_load(STORAGE_CLASS.read_text())["data"]["storageClassName"]
    assert isinstance(value, str) and value
    return value


def test_every_claim_has_the_storage_class_parameter(rendered_k8s: list[dict[str, Any]], tmp_path: Path) -> None:
    """storage-class.yaml's value lands in every PersistentVolumeClaim (kustomize `replacements`),
    and a changed value in all of them; the parameter's ConfigMap itself is not applied."""
    claims = _by_kind(rendered_k8s, "PersistentVolumeClaim")
    assert claims
    assert {c["spec"]["storageClassName"] for c in claims.values()} == {_storage_class()}
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in claims.values())
    assert "storage-class" not in _by_kind(rendered_k8s, "ConfigMap")
    # Rendered again with another class.
    kubectl = require_tool("kubectl", "install kubectl to render deploy/k8s")
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("*.env"))
    k8s = tmp_path / "deploy" / "k8s"
    for example in K8S_SECRET_EXAMPLES.values():
        shutil.copy(k8s / example, k8s / example.removesuffix(".example"))
    param = k8s / STORAGE_CLASS.name
    param.write_text(param.read_text().replace(f"storageClassName: {_storage_class()}", "storageClassName: other-rwx"))
    proc = subprocess.run([kubectl, "kustomize", str(k8s)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    again = [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PersistentVolumeClaim"]
    assert len(again) == len(claims) and {c["spec"]["storageClassName"] for c in again} == {"other-rwx"}


def test_the_model_volume_is_read_only_but_for_the_download(rendered_k8s: list[dict[str, Any]]) -> None:
    """Only job/model-download writes the model volume; every other pod mounts it read-only (claim
    and mounts), as HF_HOME, offline."""
    users = _model_volume_users(rendered_k8s)
    assert {"model-download", "ensemble-models", *_members(rendered_k8s)} == set(users)
    for name, d in users.items():
        (volume,) = [
            v for v in _pod(d)["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == MODEL_VOLUME
        ]
        writer = name == "model-download"
        assert volume["persistentVolumeClaim"].get("readOnly", False) is not writer, name
        for c in _all_containers(d):
            for mount in c.get("volumeMounts", []):
                if mount["name"] == volume["name"]:
                    assert mount["mountPath"] == MODELS_DIR, (name, c["name"])
                    assert mount.get("readOnly", False) is not writer, (name, c["name"])
        env = {k: e.get("value") for k, e in _env(_container(d)).items()}
        assert env.get("HF_HOME") == MODELS_DIR, name
        assert env.get("HF_HUB_OFFLINE") == (None if writer else "1"), name


def _downloaded(docs: list[dict[str, Any]]) -> list[str]:
    """The repos job/model-download fetches: the `fetch REPO ...` lines of its script."""
    script = "\n".join(str(a) for a in _container(_download(docs))["args"])
    return re.findall(r"^\s*fetch ([\w.-]+/[\w.-]+)", script, flags=re.M)


def test_every_model_loaded_is_downloaded_and_awaited(rendered_k8s: list[dict[str, Any]]) -> None:
    """The Job fetches each model a pod loads (and no other), and each such pod first waits for the
    marks of exactly its own models."""
    downloaded = _downloaded(rendered_k8s)
    assert len(downloaded) == len(set(downloaded))
    loaded: set[str] = set()
    for name, d in _model_volume_users(rendered_k8s).items():
        if name == "model-download":
            continue
        models = _loaded_models(d)
        loaded |= models
        (wait,) = [c for c in _pod(d).get("initContainers", []) if c["name"] == "wait-for-models"]
        assert set(wait["args"]) == models, name
        assert wait["image"] == _container(d)["image"], f"{name}: waits with an image it pulls anyway"
        assert f"{MODELS_DIR}/downloaded/" in " ".join(wait["command"]), name
    assert set(downloaded) == loaded
    assert 'mkdir -p "/models/downloaded/$repo"' in _container(_download(rendered_k8s))["args"][0]


def test_the_download_job(rendered_k8s: list[dict[str, Any]]) -> None:
    """Without a GPU, with the hub token from its own Secret, on the models' image (its `hf`); gone
    some time after it finishes, so that the next apply runs it again instead of failing on a
    changed pod template (a Job's cannot change)."""
    job = _download(rendered_k8s)
    assert 0 < job["spec"]["ttlSecondsAfterFinished"] <= 3600
    assert _gpus(job) == 0
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    c = _container(job)
    assert c["command"][:2] == ["sh", "-c"] and "hf download" in c["args"][0]
    assert _secret_env(c, "HF_TOKEN") == ("hub-token", "HF_TOKEN")


def test_no_unbounded_empty_dir(rendered_k8s: list[dict[str, Any]]) -> None:
    for name, d in _workloads(rendered_k8s).items():
        for v in _pod(d).get("volumes", []):
            if "emptyDir" in v:
                assert "sizeLimit" in (v["emptyDir"] or {}), f"{name}: emptyDir {v['name']} has no sizeLimit"


# --- GPUs: the table in docs/DEPLOY.md -----------------------------------------------------------


def _gpu_table() -> dict[str, tuple[str, int, int]]:
    """docs/DEPLOY.md's `| component | replicas | GPUs min | GPUs max |` table: first cell's
    `name` (or `total`) -> (replicas as written, GPUs min, GPUs max)."""
    lines = DEPLOY_MD.read_text().splitlines()
    header = "| component | replicas | GPUs min | GPUs max |"
    assert header in lines, f"docs/DEPLOY.md has no table {header}"
    rows: dict[str, tuple[str, int, int]] = {}
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        named = re.search(r"`([^`]+)`", cells[0])
        key = named.group(1) if named else cells[0].strip("*").lower()
        rows[key] = (cells[1], int(cells[2].strip("*")), int(cells[3].strip("*")))
    return rows


def test_deploy_md_gpu_table_matches_the_manifests(rendered_k8s: list[dict[str, Any]]) -> None:
    """Every workload that takes a GPU, and the gateway, with its replicas (HPA bounds or fixed) and
    the GPUs those need at the fewest and the most; the total row sums them."""
    table = _gpu_table()
    expected: dict[str, tuple[str, int, int]] = {}
    for name, d in _workloads(rendered_k8s).items():
        gpus = _gpus(d)
        if gpus == 0 and name != "ensemble-gateway":
            continue
        low, high = _replicas(rendered_k8s, d)
        expected[name] = (str(low) if low == high else f"{low}–{high}", low * gpus, high * gpus)
    total = (sum(v[1] for v in expected.values()), sum(v[2] for v in expected.values()))
    assert "total" in table, "the table has no total row"
    assert table.pop("total")[1:] == total, f"total GPUs: the manifests need {total}"
    assert {k: (re.sub(r"\s*\(.*\)$", "", v[0]), v[1], v[2]) for k, v in table.items()} == expected


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
    assert "storageClassName" not in claim["spec"], "ReadWriteOnce: the cluster's default class, not the shared one"
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
    assert "${STORE_PASSWORD}" in CLUSTER_CONFIG.read_text()


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


def test_traces_reach_jaeger_from_the_gateway_the_tier_and_every_vllm_member(
    rendered_k8s: list[dict[str, Any]],
) -> None:
    env = {e["name"]: e.get("value") for e in _container(_gateway(rendered_k8s))["env"]}
    service, port = _service_for(rendered_k8s, env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    jaeger = _by_kind(rendered_k8s, "Deployment")["jaeger"]
    assert _selects(service["spec"]["selector"], _pod_labels(jaeger)) and port == 4318  # OTLP/HTTP
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio" and 0 < float(env["OTEL_TRACES_SAMPLER_ARG"]) <= 1
    tier_env = {e["name"]: e.get("value") for e in _container(_tier(rendered_k8s))["env"]}
    assert _service_for(rendered_k8s, tier_env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == (service, 4318)
    vllm = {n: d for n, d in _members(rendered_k8s).items() if _container(d)["image"].startswith("vllm/")}
    assert vllm
    for name, member in vllm.items():
        container = _container(member)
        endpoint = [a.split("=", 1)[1] for a in container["args"] if a.startswith("--otlp-traces-endpoint=")]
        assert len(endpoint) == 1, name
        assert _service_for(rendered_k8s, endpoint[0]) == (service, 4317), name  # OTLP/gRPC
        member_env = {e["name"]: e.get("value") for e in container["env"]}
        assert member_env["OTEL_EXPORTER_OTLP_TRACES_INSECURE"] == "true", name
