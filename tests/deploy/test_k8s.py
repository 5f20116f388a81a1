"""deploy/k8s: the base and the overlays render with kustomize, every object validates offline against the
Kubernetes schemas (strict: unknown fields are errors), and the pieces agree with each other and with the
relay's example config."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from processor.config import interpolate, parse_config
from processor.vendors import REGISTRY
from tests.deploy.tools import DEPLOY, EXAMPLE_CONFIG, kustomize, load_rules

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
K8S_VERSIONS = (K8S_VERSION, kubernetes_validate.latest_version())
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}  # CRDs: no schema in kubernetes-validate
RENDERED = {name: kustomize(K8S / name) for name in ("base", "overlays/example", "overlays/example-dlq-replay")}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, (kind, [o["metadata"]["name"] for o in found])
    return found[0]


def pod_spec(objs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    return by_kind(objs, kind)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def relay_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(by_kind(objs, "ConfigMap")["data"]["relay.yaml"])  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(RENDERED))
def test_every_rendered_object_validates_strictly(name, version):
    kinds = set()
    for obj in RENDERED[name]:
        kinds.add(obj["kind"])
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert obj["kind"] in CUSTOM_KINDS, f"no schema for {obj['kind']}: not a Kubernetes kind"
    assert {"Deployment", "ConfigMap", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= kinds


def test_strict_validation_rejects_an_unknown_field():
    bad = copy.deepcopy(by_kind(RENDERED["base"], "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"httpGet": {"path": "/healthz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_example_overlay_has_the_whole_set():
    kinds = sorted(o["kind"] for o in RENDERED["overlays/example"])
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "Secret", "Service", "Deployment",
                            "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule",
                            "ScaledObject"])
    assert {o["metadata"].get("namespace") for o in RENDERED["overlays/example"] if o["kind"] != "Namespace"} == {
        "event-relay"}


def test_configmap_is_the_example_config_and_a_valid_one():
    cm = by_kind(RENDERED["base"], "ConfigMap")
    assert cm["data"]["relay.yaml"] == EXAMPLE_CONFIG.read_text()
    volumes = {v["name"]: v for v in pod_spec(RENDERED["base"])["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]  # the hashed name is referenced
    data = relay_config(RENDERED["base"])
    parse_config(interpolate(data, "", dict.fromkeys(required_vars(yaml.safe_dump(data)), "1")))


def required_vars(text: str) -> set[str]:
    return {m.group(1) for m in _VAR.finditer(text) if m.group(2) is None}


def test_secret_example_holds_every_variable_the_config_requires_as_placeholders():
    secret = by_kind(RENDERED["overlays/example"], "Secret")
    required = required_vars(yaml.safe_dump(yaml.safe_load(EXAMPLE_CONFIG.read_text())))  # comments left out
    assert set(secret["stringData"]) == required
    assert set(secret["stringData"].values()) == {"replace-me"}
    container = pod_spec(RENDERED["overlays/example"])["containers"][0]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]


def test_deployment_probes_ports_and_security():
    spec = pod_spec(RENDERED["base"])
    config = relay_config(RENDERED["base"])
    (c,) = spec["containers"]
    assert c["args"] == ["run", "--config", "/etc/relay/relay.yaml"]
    assert "--workers" not in c["args"]  # one process per pod
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"metrics": config["metrics"]["port"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/etc/relay", "/tmp"}
    assert spec["topologySpreadConstraints"]
    assert set(c["resources"]["requests"]) == set(c["resources"]["limits"]) == {"cpu", "memory"}


def test_grace_period_outlasts_the_relays_drain():
    spec = pod_spec(RENDERED["base"])
    grace = relay_config(RENDERED["base"])["relay"]["shutdown_grace_s"]
    assert spec["terminationGracePeriodSeconds"] >= grace + 15  # drain, then commit and leave the group


def test_rollout_never_surges_past_the_partitions():
    strategy = by_kind(RENDERED["base"], "Deployment")["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxSurge"] == 0


def test_selectors_match_the_pods():
    objs = RENDERED["overlays/example"]
    labels = by_kind(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return selector.items() <= labels.items()

    assert selects(by_kind(objs, "Service")["spec"]["selector"])
    assert selects(by_kind(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    assert selects(by_kind(objs, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"])
    service = by_kind(objs, "Service")
    monitor = by_kind(objs, "ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    # the rules select job="event-relay": the ServiceMonitor takes the job from this Service label
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "event-relay"


def test_network_policy_admits_only_the_metrics_port():
    policy = by_kind(RENDERED["base"], "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == ["metrics"]


def test_scrape_annotations_point_at_the_metrics_port():
    deployment = by_kind(RENDERED["base"], "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == relay_config(RENDERED["base"])["metrics"]["port"]


def test_keda_scales_the_relay_on_its_group_and_never_past_the_partitions():
    objs = RENDERED["overlays/example"]
    scaled = by_kind(objs, "ScaledObject")["spec"]
    config = relay_config(objs)
    assert scaled["scaleTargetRef"]["name"] == by_kind(objs, "Deployment")["metadata"]["name"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == config["kafka"]["group_id"]
    assert meta["topic"] in config["kafka"]["topics"]
    assert meta["allowIdleConsumers"] == "false"
    assert by_kind(objs, "Deployment")["spec"]["replicas"] <= scaled["maxReplicaCount"]


def test_prometheus_rule_in_the_overlay_is_the_rules_file():
    rule = by_kind(RENDERED["overlays/example"], "PrometheusRule")
    assert rule["spec"]["groups"] == load_rules()["groups"]


def test_dlq_replay_job_uses_the_relays_image_config_and_secret():
    objs = RENDERED["overlays/example-dlq-replay"]
    job, relay = pod_spec(objs, "Job"), pod_spec(objs)
    (c,) = job["containers"]
    (r,) = relay["containers"]
    assert c["args"][:4] == ["dlq", "replay", "--config", "/etc/relay/relay.yaml"]
    assert c["args"][c["args"].index("--vendor") + 1] in REGISTRY
    assert c["image"] == r["image"] and c["envFrom"] == r["envFrom"]
    assert job["volumes"] == relay["volumes"]
    assert job["restartPolicy"] == "Never"
    assert by_kind(objs, "Job")["metadata"]["namespace"] == by_kind(objs, "Deployment")["metadata"]["namespace"]
    assert c["securityContext"] == r["securityContext"]
    # the Job is applied on its own (README: kubectl apply -l app.kubernetes.io/component=dlq-replay)
    marked = [o["kind"] for o in objs
              if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "dlq-replay"]
    assert marked == ["Job"]
