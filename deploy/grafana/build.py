"""Generate the "Event relay" Grafana dashboard (event-relay.json) with grafana-foundation-sdk.

Dashboards as code: the panels are the PANELS table below; run ``make deploy-assets`` (or this script)
after changing it and commit the JSON. tests/deploy/test_dashboard.py fails while the committed JSON
differs from this script's output, checks that every expression parses and that every metric it names
is a family in the relay's /metrics; tests/integration/test_observe.py runs every query against a real
Prometheus scraping a real relay.

The data source is a variable (``datasource``), and every query filters on the namespace, pod and
vendor variables. Targets are expected with job="event-relay" and namespace and pod labels (what the
ServiceMonitor in deploy/k8s gives them), as in the alert rules.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, timeseries
from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

OUTPUT = Path(__file__).resolve().parent / "event-relay.json"
UID = "event-relay"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# every query's selector: the relay's targets in the chosen namespaces and pods
SEL = 'job="event-relay", namespace=~"$namespace", pod=~"$pod"'
VSEL = SEL + ', vendor=~"$vendor"'
ERRSEL = VSEL + ', status_class!="2xx"'
DLQSEL = SEL + ', vendor=~"$vendor|none"'  # records no vendor got (undecodable, unroutable) carry vendor "none"
RATE = "$__rate_interval"
# kube-state-metrics' restart counter of the relay's container (its own job; the pods' own labels)
KSM_RESTARTS = "kube_pod_container_status_restarts_total"
KSM_SEL = 'namespace=~"$namespace", pod=~"$pod", container="relay"'


def rate(series: str, selector: str = SEL) -> str:
    return f"rate({series}{{{selector}}}[{RATE}])"


def quantiles(series: str, by: str, qs: tuple[float, ...], legend: str) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by ({by}, le) ({rate(series, VSEL)}))",
             f"{legend} p{round(q * 100)}") for q in qs]


@dataclass(frozen=True)
class P:
    """One panel: title, what it shows (the panel's description), (expression, legend) targets."""

    title: str
    description: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries, stat or state (state timeline)
    mappings: dict[str, tuple[str, str]] = field(default_factory=dict)  # value -> (text, color)
    width: int = 8
    names_only: bool = False  # a stat panel showing its series' legends (labels such as a version), not values


PANELS: list[tuple[str, list[P]]] = [
    ("Flow", [
        P("Relays up", "Relay targets answering scrapes (up), per pod.",
          [(f"sum(up{{{SEL}}})", "relays up")], kind="stat", width=4),
        P("Events consumed", "Messages consumed from Kafka per second, per topic.",
          [(f"sum by (topic) ({rate('processor_events_consumed_total')})", "{{topic}}")], unit="ops", width=10),
        P("Events settled per vendor", "Events settled per second per vendor: delivered, filtered (the vendor "
          "does not take them) or dead-lettered.",
          [(f"sum by (vendor, outcome) ({rate('processor_vendor_events_total', VSEL)})", "{{vendor}} {{outcome}}")],
          unit="ops", width=10),
        P("Delivery latency per vendor (p50, p95, p99)", "Kafka timestamp to the vendor's acknowledgement, from "
          "the relay's histogram (batch window included).",
          quantiles("processor_delivery_latency_seconds_bucket", "vendor", (0.5, 0.95, 0.99), "{{vendor}}"),
          unit="s", width=12),
        P("Consumer lag per partition", "High watermark minus the committed position: what is left to settle.",
          [(f"max by (topic, partition) (processor_consumer_lag{{{SEL}}})", "{{topic}}[{{partition}}]")],
          width=12),
    ]),
    ("Vendors", [
        P("Vendor requests by status class", "HTTP requests per second per vendor and status class; 'error' is "
          "a request that got no answer (connect error, timeout).",
          [(f"sum by (vendor, status_class) ({rate('processor_vendor_requests_total', VSEL)})",
            "{{vendor}} {{status_class}}")], unit="reqps"),
        P("Vendor error ratio", "Share of requests without a 2xx answer, per vendor.",
          [(f"sum by (vendor) ({rate('processor_vendor_requests_total', ERRSEL)}) / "
            f"sum by (vendor) ({rate('processor_vendor_requests_total', VSEL)})", "{{vendor}}")],
          unit="percentunit"),
        P("Vendor request duration (p50, p99)", "Duration of one HTTP request to the vendor.",
          quantiles("processor_vendor_request_duration_seconds_bucket", "vendor", (0.5, 0.99), "{{vendor}}"),
          unit="s"),
        P("Retries", "Events scheduled for another attempt per second (retryable answers, throttling, "
          "no answer).",
          [(f"sum by (vendor) ({rate('processor_vendor_retries_total', VSEL)})", "{{vendor}}")], unit="ops"),
        P("Batch size (p50, p95)", "Events per closed batch.",
          quantiles("processor_batch_events_bucket", "vendor", (0.5, 0.95), "{{vendor}}")),
        P("Vendor notes", "Vendor-specific observations per second (Qubit warnings, Tracardi profile changes, "
          "Convert's non-200 answers...).",
          [(f"sum by (vendor, note) ({rate('processor_vendor_notes_total', VSEL)})", "{{vendor}} {{note}}")],
          unit="ops"),
        P("Vendor requests without an answer, by what happened", "Per second per vendor: connection refused, "
          "DNS failure, TLS verification failed (the relay's log names the host and why), connect, read or "
          "whole-request timeout, connection lost, protocol error, proxy error.",
          [(f"sum by (vendor, error) ({rate('processor_vendor_transport_errors_total', VSEL)})",
            "{{vendor}} {{error}}")], unit="reqps"),
        P("Unrecognised vendor answers", "Answers per second that are not the vendor's documented success (a "
          "page from a proxy, an empty or oversized body, JSON of another shape): retried, never counted as "
          "delivered. The relay's log shows one such answer a minute per vendor.",
          [(f"sum by (vendor) ({rate('processor_vendor_unrecognised_answers_total', VSEL)})", "{{vendor}}")],
          unit="reqps"),
        P("Sent once: memory hits and evictions", "Rows left out because the vendor's memory holds them as "
          "delivered (hit: Convert's repeated goals, orders, bucketings) and keys forgotten at its bound "
          "(eviction: raise options.memory_size if these climb with the hits), per second.",
          [(f"sum by (vendor, result) ({rate('processor_vendor_memory_total', VSEL)})", "{{vendor}} {{result}}")],
          unit="ops"),
        P("Sent once: keys remembered", "Keys in the vendor's memory of what was delivered, per pod.",
          [(f"sum by (vendor, pod) (processor_vendor_memory_keys{{{VSEL}}})", "{{vendor}} {{pod}}")]),
    ]),
    ("Dead letters and failures", [
        P("Dead letters by vendor and error class", "Dead-letter records acknowledged by Kafka per second, by "
          "vendor and error class (rejected, exhausted, undecodable, unroutable, internal; 'none' is the "
          "vendor of records no vendor got). Replay with `processor dlq replay`.",
          [(f"sum by (vendor, error_class) ({rate('processor_dlq_events_total', DLQSEL)})",
            "{{vendor}} {{error_class}}")], unit="ops"),
        P("Decode failures", "Messages that could not be decoded per second, by topic and reason.",
          [(f"sum by (topic, reason) ({rate('processor_decode_failures_total')})", "{{topic}} {{reason}}")],
          unit="ops"),
        P("Commit, dead-letter and parking write failures", "Failed offset commits, and dead-letter and "
          "retry-topic writes Kafka did not acknowledge (retried), per second.",
          [(f"sum({rate('processor_commit_failures_total')})", "offset commits"),
           (f"sum({rate('processor_dlq_produce_failures_total')})", "dead-letter writes"),
           (f"sum({rate('processor_park_produce_failures_total')})", "retry-topic writes")], unit="ops"),
    ]),
    ("Back-pressure", [
        P("In-flight events per vendor", "Events batched or being delivered per vendor, and consumed messages "
          "not yet settled by every vendor.",
          [(f"sum by (vendor) (processor_inflight_events{{{VSEL}}})", "{{vendor}}"),
           (f"sum(processor_inflight_messages{{{SEL}}})", "unsettled messages")]),
        P("Source paused", "1 while a relay pauses fetching because every vendor is at its in-flight budget.",
          [(f"max by (pod) (processor_source_paused{{{SEL}}})", "{{pod}}")], kind="state",
          mappings={"0": ("fetching", "green"), "1": ("paused", "orange")}),
        P("Oldest unsettled message age", "Age of the oldest consumed message not yet settled, per partition: "
          "commits cannot pass it.",
          [(f"max by (topic, partition) (processor_oldest_unsettled_seconds{{{SEL}}})",
            "{{topic}}[{{partition}}]")], unit="s"),
        P("Committed offsets per second", "How fast the committed offsets advance, per topic.",
          [(f"sum by (topic) (deriv(processor_committed_offset{{{SEL}}}[{RATE}]))", "{{topic}}")], unit="ops"),
        P("Rebalances", "Partition assignment changes (assign, revoke, lost).",
          [(f"sum by (kind) (increase(processor_rebalances_total{{{SEL}}}[{RATE}]))", "{{kind}}")]),
        P("Schema registry reachable", "1 while the schema registry answers (or none is configured).",
          [(f"min by (pod) (processor_schema_registry_up{{{SEL}}})", "{{pod}}")], kind="state",
          mappings={"0": ("down", "red"), "1": ("up", "green")}),
    ]),
    ("Vendor isolation", [
        P("Circuit breaker state", "Per vendor: closed (sending), half-open (probing), open (parking).",
          [(f"max by (vendor) (processor_vendor_breaker_state{{{VSEL}}})", "{{vendor}}")], kind="state",
          mappings={"0": ("closed", "green"), "1": ("half-open", "yellow"), "2": ("open", "red")}, width=12),
        P("Breaker transitions", "Circuit breaker state changes per vendor and new state.",
          [(f"sum by (vendor, state) (increase(processor_vendor_breaker_transitions_total{{{VSEL}}}[{RATE}]))",
            "{{vendor}} {{state}}")], width=12),
        P("Concurrency limit per vendor", "Current adaptive limit of concurrent requests per vendor.",
          [(f"sum by (vendor) (processor_vendor_concurrency_limit{{{VSEL}}})", "{{vendor}}")]),
        P("Parked backlog per vendor", "Events parked on the vendor's retry topic not yet redriven.",
          [(f"sum by (vendor) (processor_parked_events{{{VSEL}}})", "{{vendor}}")]),
        P("Parked and redriven events", "Events parked on the vendor's retry topic, and parked events redriven "
          "and settled, per second.",
          [(f"sum by (vendor, reason) ({rate('processor_parked_total', VSEL)})", "parked {{vendor}} {{reason}}"),
           (f"sum by (vendor, outcome) ({rate('processor_redriven_events_total', VSEL)})",
            "redriven {{vendor}} {{outcome}}")], unit="ops"),
        P("Setup errors per vendor", "Answers saying the relay's setup is wrong (3xx, 401, 403, 404, 407) per "
          "vendor and status class, and the sites held for one (their events wait; the ERROR log names the "
          "site, status and Location).",
          [(f"sum by (vendor, status_class) ({rate('processor_vendor_setup_errors_total', VSEL)})",
            "{{vendor}} {{status_class}}"),
           (f"max by (vendor) (processor_vendor_setup_held_sites{{{VSEL}}})", "{{vendor}} sites held")]),
    ]),
    ("Process", [
        P("Memory per pod", "Resident memory (RSS: what the container's memory limit counts) and virtual "
          "memory of each relay process.",
          [(f"max by (pod) (process_resident_memory_bytes{{{SEL}}})", "{{pod}} resident"),
           (f"max by (pod) (process_virtual_memory_bytes{{{SEL}}})", "{{pod}} virtual")], unit="bytes"),
        P("CPU per pod", "CPU time used per second (cores) by each relay process, librdkafka's threads included.",
          [(f"sum by (pod) ({rate('process_cpu_seconds_total')})", "{{pod}}")], unit="short"),
        P("Restarts", "Relay processes started in the last hour per pod, as Prometheus saw them (changes of "
          "the start time), and container restarts from kube-state-metrics.",
          [(f"sum by (pod) (changes(process_start_time_seconds{{{SEL}}}[1h]))", "{{pod}} starts seen"),
           (f"sum by (pod) (increase({KSM_RESTARTS}{{{KSM_SEL}}}[1h]))", "{{pod}} container restarts")]),
        P("Open file descriptors", "Open file descriptors per relay process (sockets to Kafka and the vendors) "
          "and its limit.",
          [(f"max by (pod) (process_open_fds{{{SEL}}})", "{{pod}} open"),
           (f"min by (pod) (process_max_fds{{{SEL}}})", "{{pod}} limit")]),
        P("Build info", "The relay's version and Python's, per pod (two versions at once: a rollout).",
          [(f"max by (pod, version) (processor_build_info{{{SEL}}})", "{{pod}} relay {{version}}"),
           (f"max by (pod, version) (python_info{{{SEL}}})", "{{pod}} python {{version}}")],
          kind="stat", names_only=True),
    ]),
]


def _target(ref: str, expr: str, legend: str) -> prometheus.Dataquery:
    return prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend).range().datasource(DATASOURCE)


def _panel(p: P, panel_id: int) -> db.Panel:
    builder = {"timeseries": timeseries.Panel, "stat": stat.Panel, "state": statetimeline.Panel}[p.kind]()
    builder = builder.id(panel_id).title(p.title).description(p.description).datasource(DATASOURCE).unit(p.unit)
    builder = builder.height(8).span(p.width)
    for i, (expr, legend) in enumerate(p.targets):
        builder = builder.with_target(_target(chr(ord("A") + i), expr, legend))
    if p.mappings:
        builder = builder.mappings([ValueMap({v: ValueMappingResult(text=t, color=c, index=i)
                                              for i, (v, (t, c)) in enumerate(p.mappings.items())})])
    if p.names_only:
        builder = builder.text_mode(common.BigValueTextMode.NAME)
    if p.kind == "timeseries":
        builder = builder.legend(VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                                 .placement(common.LegendPlacement.BOTTOM).show_legend(True)
                                 .calcs(["lastNotNull", "max"]))
    return builder  # type: ignore[no-any-return]


def _variable(name: str, label: str, query: str) -> db.QueryVariable:
    return (db.QueryVariable(name).label(label).datasource(DATASOURCE).query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def dashboard() -> db.Dashboard:
    d = (db.Dashboard("Event relay").uid(UID).tags(["event-relay", "kafka"]).editable()
         .description("The event relay: Kafka to vendor HTTP APIs. Alert runbooks point at these panels.")
         .tooltip(DashboardCursorSync.CROSSHAIR).time("now-3h", "now").refresh("30s").timezone("browser")
         .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
         # from `up`: every relay target, idle ones too (a relay without partitions has consumed nothing)
         .with_variable(_variable("namespace", "Namespace", 'label_values(up{job="event-relay"}, namespace)'))
         .with_variable(_variable("pod", "Pod", 'label_values(up{job="event-relay", namespace=~"$namespace"}, pod)'))
         .with_variable(_variable("vendor", "Vendor", 'label_values(processor_vendor_requests_total'
                                  '{job="event-relay", namespace=~"$namespace"}, vendor)')))
    panel_id = 0
    for row, row_panels in PANELS:
        panel_id += 1
        d = d.with_row(db.Row(row).id(panel_id))
        for p in row_panels:
            panel_id += 1
            d = d.with_panel(_panel(p, panel_id))
    return d


def render() -> str:
    return json.dumps(dashboard().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
