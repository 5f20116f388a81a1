"""deploy/grafana: the committed dashboard is the generator's output, its data source and filters are
variables, every expression parses, and every metric the dashboard and the alert rules name is a family in
the relay's /metrics exposition (and every family has a panel)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.deploy.tools import (
    DEPLOY,
    alerts,
    concrete,
    dashboard_targets,
    exposition_families,
    exposition_series_names,
    load_dashboard,
    load_script,
    metric_names,
    panels,
    run,
    tool,
)

DS = {"type": "prometheus", "uid": "${datasource}"}


def load_build():  # type: ignore[no-untyped-def]
    return load_script(DEPLOY / "grafana" / "build.py")


def test_committed_json_is_the_generators_output():
    build = load_build()
    assert build.OUTPUT.read_text() == build.render(), "deploy/grafana/event-relay.json is stale: make deploy-assets"


def test_datasource_and_filters_are_variables():
    d = load_dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod", "vendor"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == DS
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    for p in panels(d):
        assert p["datasource"] == DS, p["title"]
        assert p["targets"] and all(t["datasource"] == DS for t in p["targets"]), p["title"]
    for title, expr in dashboard_targets(d):
        if re.search(r"\b(processor|process|python|kube)_", expr):
            assert 'namespace=~"$namespace"' in expr and 'pod=~"$pod"' in expr, title
        if "vendor" in expr and "processor_" in expr:
            assert "$vendor" in expr, title
    ids = [p["id"] for p in d["panels"]]
    titles = [p["title"] for p in panels(d)]
    assert len(set(ids)) == len(ids) and len(set(titles)) == len(titles)


def test_every_expression_parses(tmp_path: Path):
    """promtool parses each dashboard expression (variables as Grafana fills them) as a recording rule."""
    targets = dashboard_targets(load_dashboard())
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": concrete(expr)} for i, (_, expr) in enumerate(targets)]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = run(tool("promtool"), "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(targets)} rules found" in out.stdout


def test_quantiles_are_over_the_relays_buckets():
    for title, expr in dashboard_targets(load_dashboard()) + [(a["alert"], a["expr"]) for a in alerts()]:
        for by, series in re.findall(r"histogram_quantile\(\s*[\d.]+,\s*sum by \(([^)]*)\)\s*\(rate\((\w+)", expr):
            assert "le" in [b.strip() for b in by.split(",")], title
            assert series.endswith("_bucket") and series[:-len("_bucket")] in exposition_families(), title


def test_every_metric_named_is_a_family_the_relay_exports():
    series = exposition_series_names()
    used = {(where, name) for where, expr in dashboard_targets(load_dashboard()) for name in metric_names(expr)}
    used |= {(a["alert"], name) for a in alerts() for name in metric_names(a["expr"])}
    assert {name for _, name in used} >= {"up", "processor_events_consumed_total"}  # the extraction works
    unknown = sorted((where, name) for where, name in used if name != "up" and name not in series)
    assert not unknown


def test_every_family_has_a_panel():
    series = exposition_series_names()
    shown = {series[name] for _, expr in dashboard_targets(load_dashboard()) for name in metric_names(expr)
             if name in series}
    assert set(exposition_families()) - shown == set()


def test_pod_variable_lists_idle_pods_too():
    """From `up`, which every scraped relay has: a relay without partitions has consumed nothing and has no
    processor_events_consumed_total series."""
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    for name in ("namespace", "pod"):
        query = variables[name]["query"]
        query = query["query"] if isinstance(query, dict) else query
        assert query.startswith('label_values(up{job="event-relay"'), query
