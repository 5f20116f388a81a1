"""deploy/k8s: the base and the overlays render with kustomize, every object validates offline against the
Kubernetes schemas (strict: unknown fields are errors), and the pieces agree with each other and with the
relay's example config."""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from processor.config import Config, interpolate, load_config, parse_config
from processor.topics import CreateOptions, needed_topics, topic_settings
from processor.vendors import REGISTRY
from tests.deploy.tools import DEPLOY, EXAMPLE_CONFIG, kustomize, load_rules

K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests are meant for
K8S_VERSIONS = (K8S_VERSION, kubernetes_validate.latest_version())
# CRDs: no schema in kubernetes-validate
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}


def job_overlay(base: str, jobs: str) -> list[dict[str, Any]]:
    """overlays/<jobs> (example-topics, example-dlq-replay) rendered on top of overlays/<base>, as an operator
    makes it for their own overlay (README, step 4: copy the folder, point `resources` at theirs)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / jobs
        shutil.copytree(K8S / "overlays" / jobs, work)
        text = (work / "kustomization.yaml").read_text()
        relative = lambda path: os.path.relpath(K8S / path, work)  # noqa: E731 (kustomize takes no absolute paths)
        text = text.replace("  - ../example\n", f"  - {relative('overlays/' + base)}\n")
        text = text.replace("  - ../../components/", f"  - {relative('components')}/")
        (work / "kustomization.yaml").write_text(text)
        return kustomize(work)


RENDERED = {name: kustomize(K8S / name) for name in ("base", "overlays/example", "overlays/example-dlq-replay",
                                                      "overlays/example-topics", "overlays/example-sasl-ssl")}
RENDERED |= {f"overlays/example-sasl-ssl+{jobs}": job_overlay("example-sasl-ssl", jobs)
             for jobs in ("example-topics", "example-dlq-replay")}
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
                            "PrometheusRule", "ScaledObject", "TriggerAuthentication"])
    sasl = sorted(o["kind"] for o in RENDERED["overlays/example-sasl-ssl"])
    assert sasl == kinds
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


SASL_SECRET_EXAMPLE = K8S / "overlays" / "example-sasl-ssl" / "secret.example.yaml"
KEDA_KEYS = {"KEDA_KAFKA_SASL", "KEDA_KAFKA_TLS"}  # what KEDA's TriggerAuthentication reads besides the relay's


@pytest.mark.parametrize(("path", "overlay"), [(SECRET_EXAMPLE, "overlays/example"),
                                               (SASL_SECRET_EXAMPLE, "overlays/example-sasl-ssl")])
def test_secret_example_holds_every_variable_the_config_requires_as_placeholders(path, overlay):
    secret = yaml.safe_load(path.read_text())
    required = required_vars(yaml.safe_dump(yaml.safe_load(EXAMPLE_CONFIG.read_text())))  # comments left out
    assert required | KEDA_KEYS <= set(secret["stringData"])
    assert {secret["stringData"][k] for k in required} == {"replace-me"}
    container = pod_spec(RENDERED[overlay])["containers"][0]
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


@pytest.mark.parametrize("name", OVERLAYS)
def test_egress_allow_list_reaches_dns_kafka_the_registry_the_proxy_and_the_vendors(name):
    """Every port a pod is given an address for (Kafka's listener, the schema registry, an egress proxy, the
    vendors) is open in the allow-list, for the Deployment and each Job alike."""
    objs = RENDERED[name]
    policy = named(objs, "NetworkPolicy", "event-relay-egress")["spec"]
    assert policy["policyTypes"] == ["Egress"]
    ports = {(p["port"], p["protocol"]) for rule in policy["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP"), (443, "TCP")} <= ports
    for container in kafka_clients(objs):
        config = effective_config(objs, container)
        env = container_env(objs, container)
        kafka_ports = {int(a.rsplit(":", 1)[1]) for a in config["kafka"]["bootstrap_servers"].split(",")}
        urls = [v["base_url"] for v in config["vendors"].values() if v.get("base_url")]
        urls += [config["schema_registry"]["url"]] if config["schema_registry"].get("url") else []
        urls += [env[k] for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy") if env.get(k)]
        url_ports = {urlsplit(u).port or {"https": 443, "http": 80}[urlsplit(u).scheme] for u in urls}
        assert {(p, "TCP") for p in kafka_ports | url_ports} <= ports, (container["name"], ports)
    # it selects the Jobs' pods too (they reach Kafka as the relay does)
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "event-relay"}


def test_the_sasl_ssl_example_opens_its_listener_and_registry_not_the_plaintext_port():
    objs = RENDERED["overlays/example-sasl-ssl"]
    policy = named(objs, "NetworkPolicy", "event-relay-egress")["spec"]
    ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert {9096, 8081} <= ports and 9092 not in ports


def test_prometheus_rule_in_the_overlay_is_the_rules_file():
    rule = by_kind(RENDERED["overlays/example"], "PrometheusRule")
    assert rule["spec"]["groups"] == load_rules()["groups"]


@pytest.mark.parametrize(("overlay", "base", "component", "command"), [
    ("overlays/example-dlq-replay", "overlays/example", "dlq-replay", "dlq"),
    ("overlays/example-topics", "overlays/example", "topics", "topics"),
    ("overlays/example-sasl-ssl+example-dlq-replay", "overlays/example-sasl-ssl", "dlq-replay", "dlq"),
    ("overlays/example-sasl-ssl+example-topics", "overlays/example-sasl-ssl", "topics", "topics")])
def test_jobs_reach_the_same_kafka_with_the_same_config(overlay, base, component, command):
    objs = RENDERED[overlay]
    job, relay = pod_spec(objs, "Job"), pod_spec(objs)
    (r,) = relay["containers"]
    for c in [*job.get("initContainers", []), *job["containers"]]:
        assert c["args"][0] == command and c["args"][2:4] == ["--config", "/etc/relay/relay.yaml"]
        assert c["image"] == r["image"] and c["envFrom"] == r["envFrom"] and c.get("env") == r.get("env")
        assert c["volumeMounts"] == r["volumeMounts"]
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
    assert [o for o in objs if o["kind"] != "Job"] == RENDERED[base]
    assert job["volumes"] == relay["volumes"]


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


# -- a secured cluster: every Kafka client from the one Secret ---------------------------------------------

def kafka_clients(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every container that talks to Kafka: the relay's, and the Jobs' (init containers included)."""
    out = []
    for obj in objs:
        if obj["kind"] in ("Deployment", "Job"):
            spec = obj["spec"]["template"]["spec"]
            out += [*spec.get("initContainers", []), *spec["containers"]]
    return out


def secret_names(objs: list[dict[str, Any]], container: dict[str, Any]) -> list[str]:
    return [s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s]


def loaded_config(objs: list[dict[str, Any]], container: dict[str, Any], secret: dict[str, str],
                  tmp_path: Path) -> Config:
    """The config the container's relay loads (processor.config.load_config): the mounted file, and the
    environment from its ConfigMaps, its own env and the Secret (its example's values)."""
    path = tmp_path / f"{container['name']}.yaml"
    text = named(objs, "ConfigMap", "event-relay-config")["data"]["relay.yaml"]
    path.write_text(text)
    vendors = required_vars(yaml.safe_dump(yaml.safe_load(text)))  # their placeholders, as valid ids
    env = {k: "1" if k in vendors else v for k, v in secret.items() if k.isidentifier()}
    env.update(container_env(objs, container))
    return load_config(path, env)


def mounted_secret_file(objs: list[dict[str, Any]], container: dict[str, Any], obj_kind: str,
                        path: str) -> tuple[str, str] | None:
    """(Secret, key) mounted at ``path`` in the container, or None."""
    spec = next(o for o in objs if o["kind"] == obj_kind and container in [
        *o["spec"]["template"]["spec"].get("initContainers", []),
        *o["spec"]["template"]["spec"]["containers"]])["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("secret")
        if source is None:
            continue
        for item in source.get("items", []):
            if f"{mount['mountPath'].rstrip('/')}/{item['path']}" == path:
                return source["secretName"], item["key"]
    return None


KEDA_SASL = {"SCRAM-SHA-512": "scram_sha512", "SCRAM-SHA-256": "scram_sha256", "PLAIN": "plaintext"}
SASL_SSL_RENDERS = ["overlays/example-sasl-ssl", "overlays/example-sasl-ssl+example-topics",
                    "overlays/example-sasl-ssl+example-dlq-replay"]


@pytest.mark.parametrize("name", SASL_SSL_RENDERS)
def test_sasl_ssl_every_kafka_client_takes_mechanism_credentials_tls_and_ca_from_the_one_secret(name, tmp_path):
    objs = RENDERED[name]
    example = yaml.safe_load(SASL_SECRET_EXAMPLE.read_text())
    secret = {k: str(v) for k, v in example["stringData"].items()}
    clients = kafka_clients(objs)
    # the relay; the topics Job's create and check; the replay Job
    assert len(clients) == {SASL_SSL_RENDERS[0]: 1, SASL_SSL_RENDERS[1]: 3, SASL_SSL_RENDERS[2]: 2}[name]
    for container in clients:
        kind = next(o["kind"] for o in objs if o["kind"] in ("Deployment", "Job") and container in [
            *o["spec"]["template"]["spec"].get("initContainers", []), *o["spec"]["template"]["spec"]["containers"]])
        assert secret_names(objs, container) == [example["metadata"]["name"]], container["name"]
        config = loaded_config(objs, container, secret, tmp_path)
        client = config.kafka.client
        assert client["security.protocol"] == "SASL_SSL"
        assert client["sasl.mechanism"] == secret["PROCESSOR__KAFKA__CLIENT__SASL_MECHANISM"] == "SCRAM-SHA-512"
        assert client["sasl.username"] == secret["PROCESSOR__KAFKA__CLIENT__SASL_USERNAME"]
        assert client["sasl.password"] == secret["PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD"]
        # every Kafka client of the process shares them (producers, admin), and the CA is the Secret's
        assert {k: config.client_settings()[k] for k in client if k.startswith(("sasl.", "ssl.", "security."))} \
            == {k: v for k, v in client.items() if k.startswith(("sasl.", "ssl.", "security."))}
        assert mounted_secret_file(objs, container, kind, client["ssl.ca.location"]) == \
            (example["metadata"]["name"], "kafka-ca.crt"), container["name"]
        registry = config.schema_registry
        assert registry.url and registry.url.startswith("https://")
        assert mounted_secret_file(objs, container, kind, registry.client["ssl.ca.location"]) == \
            (example["metadata"]["name"], "kafka-ca.crt")
        assert registry.client["basic.auth.user.info"] == \
            secret["PROCESSOR__SCHEMA_REGISTRY__CLIENT__BASIC_AUTH_USER_INFO"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_keda_authenticates_from_the_relays_secret(name):
    """The ScaledObject's trigger uses the TriggerAuthentication, whose every parameter comes from the
    Secret the relay's containers read, under the keys the relay reads (user, password) or mounts (CA)."""
    objs = RENDERED[name]
    (trigger,) = by_kind(objs, "ScaledObject")["spec"]["triggers"]
    auth = by_kind(objs, "TriggerAuthentication")
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert auth["metadata"]["namespace"] == by_kind(objs, "Deployment")["metadata"]["namespace"]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"sasl", "tls", "username", "password", "ca"}
    (relay,) = pod_spec(objs)["containers"]
    assert {r["name"] for r in refs.values()} == set(secret_names(objs, relay))
    assert refs["username"]["key"] == "PROCESSOR__KAFKA__CLIENT__SASL_USERNAME"
    assert refs["password"]["key"] == "PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD"
    assert {refs["sasl"]["key"], refs["tls"]["key"]} == KEDA_KEYS
    assert refs["ca"]["key"] == "kafka-ca.crt"


@pytest.mark.parametrize(("path", "protocol"), [(SECRET_EXAMPLE, "PLAINTEXT"), (SASL_SECRET_EXAMPLE, None)])
def test_kedas_mechanism_and_tls_say_what_the_relays_do(path, protocol):
    secret = yaml.safe_load(path.read_text())["stringData"]
    protocol = secret.get("PROCESSOR__KAFKA__CLIENT__SECURITY_PROTOCOL", protocol)
    mechanism = secret.get("PROCESSOR__KAFKA__CLIENT__SASL_MECHANISM")
    assert secret["KEDA_KAFKA_SASL"] == (KEDA_SASL[mechanism] if protocol.startswith("SASL_") else "none")
    assert secret["KEDA_KAFKA_TLS"] == ("enable" if protocol in ("SSL", "SASL_SSL") else "disable")
    if protocol in ("SSL", "SASL_SSL"):
        assert "BEGIN CERTIFICATE" in secret["kafka-ca.crt"]


SECRET_WORDS = re.compile(r"PASSWORD|SECRET|TOKEN|USER_INFO|USERNAME|_KEY$|CLIENT_KEY|APP_KEY|TRACKING_ID|"
                          r"SOURCE_ID|KEDA_KAFKA|\.crt$|\.key$", re.I)


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_no_secret_value_in_a_configmap(name):
    """What the Secret examples hold never sits in a ConfigMap: no key of theirs, no value of theirs, no name
    that says secret; the config file reads every secret as ${VAR}."""
    secret_keys: set[str] = set()
    for path in (SECRET_EXAMPLE, SASL_SECRET_EXAMPLE):
        secret_keys |= set(yaml.safe_load(path.read_text())["stringData"])
    for cm in (o for o in RENDERED[name] if o["kind"] == "ConfigMap"):
        data = cm.get("data", {})
        assert not secret_keys & set(data), cm["metadata"]["name"]
        assert [k for k in data if SECRET_WORDS.search(k)] == [], cm["metadata"]["name"]
        assert not any("replace-me" in v or "BEGIN CERTIFICATE" in v or "PRIVATE KEY" in v for v in data.values())
