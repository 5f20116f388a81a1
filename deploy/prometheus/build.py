"""Write prometheusrule.yaml (the Prometheus Operator's PrometheusRule) from relay-rules.yaml.

relay-rules.yaml is the source: a plain Prometheus rules file. Run ``make deploy-assets`` (or this
script) after changing it; tests/deploy/test_prometheus_rules.py fails while the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "relay-rules.yaml"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = "# Generated from relay-rules.yaml by deploy/prometheus/build.py (make deploy-assets): do not edit.\n"


class _Literal(str):
    """A string written as a YAML block (|), so multi-line expressions stay readable."""


def _literal(dumper: yaml.SafeDumper, value: _Literal) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Literal, _literal)


def prometheus_rule(rules: dict[str, Any]) -> dict[str, Any]:
    groups = [{**g, "rules": [{**r, "expr": _Literal(r["expr"]) if "\n" in r["expr"] else r["expr"]}
                              for r in g["rules"]]} for g in rules["groups"]]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "event-relay",
            # match your Prometheus' ruleSelector
            "labels": {"app.kubernetes.io/name": "event-relay", "release": "prometheus"},
        },
        "spec": {"groups": groups},
    }


def render() -> str:
    rules = yaml.safe_load(RULES.read_text())
    return HEADER + yaml.dump(prometheus_rule(rules), Dumper=_Dumper, sort_keys=False, width=120)


def main() -> int:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(HERE.parent.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
