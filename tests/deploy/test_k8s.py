"""deploy/k8s: the base and the overlays render with kustomize, every object validates offline against the
Kubernetes schemas (strict: unknown fields are errors), and the pieces agree with each other and with the
relay's example config."""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from processor.config import interpolate, parse_config
from processor.topics import CreateOptions, needed_topics, topic_settings
from processor.vendors import REGISTRY
from tests.deploy.tools import DEPLOY, EXAMPLE_CONFIG, kustomize, load_rules

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
K8S_VERSIONS = (K8S_VERSION, kubernetes_validate.latest_version())
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}  # CRDs: no schema in kubernetes-validate
RENDERED = {name: kustomize(K8S / name) for name in ("base", "overlays/example", "overlays/example-dlq-replay",
                                                      "overlays/example-topics")}
OVERLAYS = sorted(n for n in RENDERED if n.startswith("overlays/"))
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")


def by_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, (kind, [o["metadata"]["name"] for o in found])
    return found[0]


def pod_spec(objs: list[dict[str, Any]], kind: str = "Deployment") -> dict[str, Any]:
    return by_kind(objs, kind)["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def named(objs: list[dict[str, Any]], kind: str, prefix: str) -> dict[str, Any]:
    """The one object of ``kind`` whose name is ``prefix`` (or ``prefix-<kustomize hash>``)."""
    hashed = re.compile(rf"{prefix}(-[a-z0-9]{{10}})?")
    found = [o for o in objs if o["kind"] == kind and hashed.fullmatch(o["metadata"]["name"])]
    assert len(found) == 1, (kind, prefix, [o["metadata"]["name"] for o in objs if o["kind"] == kind])
    return found[0]


def relay_config(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(named(objs, "ConfigMap", "event-relay-config")["data"]["relay.yaml"])  # type: ignore[no-any-return]


def container_env(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets from its ConfigMaps (envFrom) and its own env, as Kubernetes resolves
    them (later entries win); Secrets are left out (the operator creates them)."""
    maps = {o["metadata"]["name"]: o.get("data", {}) for o in objs if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def effective_config(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """The relay config a container runs with: the mounted file, ${VAR}s from its environment (secrets
    as placeholders)."""
    data = relay_config(objs)
    env = {**dict.fromkeys(required_vars(yaml.safe_dump(data)), "1"), **container_env(objs, container)}
    return interpolate(data, "", env)  # type: ignore[no-any-return]


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
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "ConfigMap", "Service", "Deployment",
                            "PodDisruptionBudget", "NetworkPolicy", "NetworkPolicy", "ServiceMonitor",
                            "PrometheusRule", "ScaledObject"])
    assert {o["metadata"].get("namespace") for o in RENDERED["overlays/example"] if o["kind"] != "Namespace"} == {
        "event-relay"}


def test_configmap_is_the_example_config_and_a_valid_one():
    cm = named(RENDERED["base"], "ConfigMap", "event-relay-config")
    assert cm["data"]["relay.yaml"] == EXAMPLE_CONFIG.read_text()
    volumes = {v["name"]: v for v in pod_spec(RENDERED["base"])["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]  # the hashed name is referenced
    data = relay_config(RENDERED["base"])
    parse_config(interpolate(data, "", dict.fromkeys(required_vars(yaml.safe_dump(data)), "1")))


def required_vars(text: str) -> set[str]:
    return {m.group(1) for m in _VAR.finditer(text) if m.group(2) is None}


SECRET_EXAMPLE = K8S / "overlays" / "example" / "secret.example.yaml"


def test_secret_example_holds_every_variable_the_config_requires_as_placeholders():
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    required = required_vars(yaml.safe_dump(yaml.safe_load(EXAMPLE_CONFIG.read_text())))  # comments left out
    assert set(secret["stringData"]) == required
    assert set(secret["stringData"].values()) == {"replace-me"}
    container = pod_spec(RENDERED["overlays/example"])["containers"][0]
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in container["envFrom"]


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_no_secret_is_applied(name):
    """An apply must never overwrite the operator's real credentials with placeholders."""
    assert [o["metadata"]["name"] for o in RENDERED[name] if o["kind"] == "Secret"] == []


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
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        assert selects(policy["spec"]["podSelector"]["matchLabels"])
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


@pytest.mark.parametrize("name", OVERLAYS)
def test_keda_asks_the_brokers_the_deployment_uses(name):
    """KEDA reads the lag from the brokers, group and topic the relay consumes (a different address makes
    autoscaling fail quietly)."""
    objs = RENDERED[name]
    (trigger,) = by_kind(objs, "ScaledObject")["spec"]["triggers"]
    meta = trigger["metadata"]
    (relay,) = pod_spec(objs)["containers"]
    config = effective_config(objs, relay)
    brokers = container_env(objs, relay)[meta["bootstrapServersFromEnv"]] if "bootstrapServersFromEnv" in meta \
        else meta["bootstrapServers"]
    assert brokers == config["kafka"]["bootstrap_servers"]
    assert brokers != "kafka:9092"  # the example overlay's address, not the config's fallback
    assert meta["consumerGroup"] == config["kafka"]["group_id"]
    assert meta["topic"] == config["kafka"]["topics"][0]


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_no_replicas_on_a_deployment_keda_scales(name):
    objs = RENDERED[name]
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] == "ScaledObject"}
    for deployment in (o for o in objs if o["kind"] == "Deployment"):
        if deployment["metadata"]["name"] in scaled or name == "base":
            assert "replicas" not in deployment["spec"], name


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_pdb_lets_unready_pods_be_evicted(name):
    assert by_kind(RENDERED[name], "PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_egress_allow_list_reaches_dns_kafka_and_the_vendors():
    objs = RENDERED["overlays/example"]
    policy = named(objs, "NetworkPolicy", "event-relay-egress")["spec"]
    assert policy["policyTypes"] == ["Egress"]
    ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    (relay,) = pod_spec(objs)["containers"]
    config = effective_config(objs, relay)
    kafka_ports = {int(a.rsplit(":", 1)[1]) for a in config["kafka"]["bootstrap_servers"].split(",")}
    vendor_ports = {urlsplit(v["base_url"]).port or 443 for v in config["vendors"].values() if v.get("base_url")}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= ports
    assert {(p, "TCP") for p in kafka_ports | vendor_ports} <= ports
    # it selects the Jobs' pods too (they reach Kafka as the relay does)
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "event-relay"}


def test_prometheus_rule_in_the_overlay_is_the_rules_file():
    rule = by_kind(RENDERED["overlays/example"], "PrometheusRule")
    assert rule["spec"]["groups"] == load_rules()["groups"]


@pytest.mark.parametrize(("overlay", "component", "command"), [
    ("overlays/example-dlq-replay", "dlq-replay", "dlq"), ("overlays/example-topics", "topics", "topics")])
def test_jobs_reach_the_same_kafka_with_the_same_config(overlay, component, command):
    objs = RENDERED[overlay]
    job, relay = pod_spec(objs, "Job"), pod_spec(objs)
    (r,) = relay["containers"]
    for c in [*job.get("initContainers", []), *job["containers"]]:
        assert c["args"][0] == command and c["args"][2:4] == ["--config", "/etc/relay/relay.yaml"]
        assert c["image"] == r["image"] and c["envFrom"] == r["envFrom"]
        assert effective_config(objs, c) == effective_config(objs, r)  # same brokers, group, topics, vendors
        assert c["securityContext"] == r["securityContext"]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in job["volumes"]}
        assert volumes[next(n for n, p in mounts.items() if p == "/etc/relay")] == \
            {v["name"]: v for v in relay["volumes"]}["config"]
    assert job["restartPolicy"] == "Never"
    assert by_kind(objs, "Job")["metadata"]["namespace"] == by_kind(objs, "Deployment")["metadata"]["namespace"]
    # the Job is applied on its own (kubectl apply -l app.kubernetes.io/component=...)
    marked = [o["kind"] for o in objs
              if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    assert marked == ["Job"]
    # built on the operator's overlay: everything else is that overlay, unchanged
    assert [o for o in objs if o["kind"] != "Job"] == RENDERED["overlays/example"]


def test_dlq_replay_job_names_a_vendor():
    (c,) = pod_spec(RENDERED["overlays/example-dlq-replay"], "Job")["containers"]
    assert c["args"][c["args"].index("--vendor") + 1] in REGISTRY


def test_topics_job_creates_then_checks():
    job = pod_spec(RENDERED["overlays/example-topics"], "Job")
    (create,) = job["initContainers"]
    (check,) = job["containers"]
    assert create["args"][:2] == ["topics", "create"] and check["args"][:2] == ["topics", "check"]


STRIMZI = K8S / "strimzi-topics"


def test_strimzi_topics_are_what_topics_create_makes_for_the_example():
    """One KafkaTopic per topic the example config writes, with the settings `processor topics create`
    gives it by default (retry topics outlive retry.max_elapsed_s)."""
    objs = kustomize(STRIMZI)
    (relay,) = pod_spec(RENDERED["overlays/example"])["containers"]
    config = parse_config(effective_config(RENDERED["overlays/example"], relay))
    needs = {n.name: n for n in needed_topics(config) if n.written}
    assert {o["kind"] for o in objs} == {"KafkaTopic"}
    topics = {o["spec"]["topicName"]: o for o in objs}
    assert set(topics) == set(needs)
    for name, obj in topics.items():
        assert obj["metadata"]["labels"]["strimzi.io/cluster"]
        assert {k: str(v) for k, v in obj["spec"]["config"].items()} == topic_settings(needs[name], CreateOptions())
        if needs[name].min_retention_ms is not None:
            assert obj["spec"]["config"]["retention.ms"] >= needs[name].min_retention_ms
