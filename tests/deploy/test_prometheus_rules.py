"""deploy/prometheus: the rules pass `promtool check rules`, the promtool unit tests make every alert fire on
a synthetic series and stay silent on a healthy one, every alert carries its runbook, and the
PrometheusRule is the rules file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from tests.deploy.tools import DEPLOY, RULE_TESTS, RULES, alerts, load_dashboard, load_script, panels, run, tool

RUNBOOK = ("summary", "description", "dashboard", "action", "runbook_url")


def load_build():  # type: ignore[no-untyped-def]
    return load_script(DEPLOY / "prometheus" / "build.py")


def test_promtool_check_rules():
    out = run(tool("promtool"), "check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


def test_promtool_unit_tests_pass(tmp_path: Path):
    data = yaml.safe_load(RULES.read_text())
    for group in data["groups"]:
        for rule in group["rules"]:
            assert rule.pop("annotations")  # checked by test_every_alert_carries_its_runbook
    (tmp_path / "relay-rules.yaml").write_text(yaml.safe_dump(data))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    out = run(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_has_a_firing_and_a_silent_unit_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for t in tests:
        for case in t["alert_rule_test"]:
            (fires if case["exp_alerts"] else silent).add(case["alertname"])
        # a firing case sits beside a healthy series: more input series than alerts expected
        for case in t["alert_rule_test"]:
            if case["exp_alerts"] and case["alertname"] != "RelayAbsent":
                assert len(t["input_series"]) > len(case["exp_alerts"]), t["name"]
    names = {a["alert"] for a in alerts()}
    assert fires == names
    assert silent == names


def test_every_alert_carries_its_runbook():
    titles = {p["title"] for p in panels(load_dashboard())}
    for alert in alerts():
        annotations = alert["annotations"]
        assert set(RUNBOOK) <= set(annotations), alert["alert"]
        assert annotations["dashboard"] in titles, (alert["alert"], annotations["dashboard"])
        assert alert["labels"]["severity"] in {"warning", "critical"}
        if "kube_" in alert["expr"]:  # kube-state-metrics: the relay's container or Deployment
            assert 'container="relay"' in alert["expr"] or 'deployment="event-relay"' in alert["expr"], alert["alert"]
        else:
            assert 'job="event-relay"' in alert["expr"], alert["alert"]
    replay = [a["alert"] for a in alerts() if "processor dlq replay" in a["annotations"]["action"]]
    assert "RelayDeadLetterRateHigh" in replay


def test_prometheusrule_is_generated_from_the_rules_file():
    build = load_build()
    committed = build.OUTPUT.read_text()
    assert committed == build.render(), "deploy/prometheus/prometheusrule.yaml is stale: run `make deploy-assets`"
    rule = yaml.safe_load(committed)
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


RUNBOOK_FILE = DEPLOY / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/yourco/event-relay/blob/main/deploy/RUNBOOK.md#"


def runbook_sections() -> dict[str, str]:
    """GitHub's anchor of each `## ` heading of deploy/RUNBOOK.md -> the section's text."""
    sections: dict[str, str] = {}
    for chunk in RUNBOOK_FILE.read_text().split("\n## ")[1:]:
        heading, _, body = chunk.partition("\n")
        sections[re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")] = body
    return sections


def test_every_alert_links_its_runbook_section():
    """runbook_url opens a section of deploy/RUNBOOK.md that says what it means, what to check, what to do,
    and gives the commands."""
    sections = runbook_sections()
    linked = set()
    for alert in alerts():
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL), alert["alert"]
        anchor = url[len(RUNBOOK_URL):]
        assert anchor in sections, (alert["alert"], anchor)
        body = sections[anchor]
        for part in ("**What it means.**", "**What to check.**", "**What to do.**", "```sh\n"):
            assert part in body, (alert["alert"], part)
        linked.add(anchor)
    assert linked == set(sections)  # no section for an alert that is gone
