"""Shared helpers of the deploy/ tests: the tools they run, rendering, and the relay's metric names."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from processor.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "relay-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "relay-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "event-relay.json"
EXAMPLE_CONFIG = DEPLOY / "config" / "relay.example.yaml"

# series suffixes each exposition type produces
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created")}
# the relay's own families, prometheus_client's process and platform collectors', and `up`
METRIC_NAME = re.compile(r"\b(processor_[a-z0-9_]+|process_[a-z0-9_]+|python_info|up)\b(?!\s*\()")


def tool(name: str) -> str:
    """A binary from the virtualenv (the dev extras ship kubectl, hadolint) or PATH (Debian's prometheus and
    promtool, which `make test` installs as root); missing is a failure, never a skip."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: `make install` brings kubectl and hadolint, "
                             f"`apt-get install prometheus` brings prometheus and promtool (`make test` does, as root)")
    return found


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = run(tool("kubectl"), "kustomize", str(path))
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def load_rules() -> dict[str, Any]:
    return yaml.safe_load(RULES.read_text())  # type: ignore[no-any-return]


def alerts() -> list[dict[str, Any]]:
    return [r for g in load_rules()["groups"] for r in g["rules"] if "alert" in r]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries (rows carry none), including those collapsed inside rows."""
    out = []
    for p in dashboard["panels"]:
        out.extend(p.get("panels", []) if p.get("type") == "row" else [p])
    return out


def exposition_families() -> dict[str, str]:
    """Family name -> type of everything the relay's /metrics exposes (declared in processor/metrics.py)."""
    text = generate_latest(Metrics().registry).decode()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    # the text format writes an unlabelled counter's creation time as a gauge family of its own
    return {n: t for n, t in families.items() if not (n.endswith("_created") and n[:-len("_created")] in families)}


def exposition_series_names() -> dict[str, str]:
    """Series name a query may use (``processor_x_total``, ``processor_h_bucket``...) -> its family."""
    return {family + suffix: family for family, kind in exposition_families().items() for suffix in _SUFFIXES[kind]}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (``up``, ``processor_*``, ``process_*``, ``python_info``;
    function names excluded)."""
    return set(METRIC_NAME.findall(re.sub(r"\{[^}]*\}", "{}", expr)))


def dashboard_targets(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]


def concrete(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard expression as Grafana sends it with every variable on "All" (its allValue, ``.*``)."""
    for var in ("$namespace", "$pod", "$vendor"):
        expr = expr.replace(var, ".*")
    return expr.replace("$__rate_interval", rate_interval)


def load_script(path: Path) -> ModuleType:
    """A generator script under deploy/ (not a package) as a module."""
    name = f"deploy_{path.parent.name}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module
