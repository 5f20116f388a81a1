from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from processor.cli import main
from processor.config import load_config, parse_config, redacted
from processor.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "config").glob("*.yaml"))
ENV = {"QUICKLIZARD_CLIENT_KEY": "ql-key", "QUBIT_TRACKING_ID": "t", "CONVERT_ACCOUNT_ID": "1",
       "CONVERT_PROJECT_ID": "2", "TRACARDI_SOURCE_ID": "s", "CONVEAD_APP_KEY": "a", "CONVERT_SECRET": "x"}


def minimal(**over):
    cfg = {"kafka": {"bootstrap_servers": "k:9092", "topics": ["t"]}, "deadletter": {"topic": "t.dlq"}}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path, ENV)
    assert cfg.kafka.topics


def test_env_interpolation_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(minimal(vendors={"quicklizard": {
        "sites": {"default": {"client_key": "${QL_KEY}"}}, "options": {}}})))
    cfg = load_config(f, {"QL_KEY": "sekret", "PROCESSOR__KAFKA__CONSUME_BATCH": "77",
                          "PROCESSOR__KAFKA__CLIENT__SASL.MECHANISM": "PLAIN"})
    assert cfg.kafka.consume_batch == 77
    assert cfg.kafka.client == {"sasl.mechanism": "PLAIN"}
    assert cfg.vendors["quicklizard"].sites["default"].client_key.get_secret_value() == "sekret"
    shown = redacted(cfg)
    assert shown["vendors"]["quicklizard"]["sites"]["default"]["client_key"] == "***"
    assert "sekret" not in yaml.safe_dump(shown)


def test_missing_env_var_names_the_field(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(minimal(vendors={"quicklizard": {
        "sites": {"default": {"client_key": "${NOPE}"}}, "options": {}}})))
    with pytest.raises(ConfigError, match=r"vendors.quicklizard.sites.default.client_key: .*NOPE"):
        load_config(f, {})


@pytest.mark.parametrize(("over", "field"), [
    ({"kafka": {"bootstrap_servers": "k", "topics": []}}, "kafka.topics"),
    ({"kafka": {"bootstrap_servers": "k", "topics": ["t"], "typo": 1}}, "kafka.typo"),
    ({"relay": {"max_inflight_events": 0}}, "relay.max_inflight_events"),
    ({"vendors": {"quicklizard": {"sites": {"default": {}}, "options": {}}}},
     "vendors.quicklizard.sites.default.client_key"),
    ({"vendors": {"quicklizard": {"sites": {"default": {"client_key": "k"}}, "options": {},
                                  "batch": {"max_events": 0}}}}, "vendors.quicklizard.batch.max_events"),
    ({"vendors": {"nosuch": {}}}, "unknown vendor 'nosuch'"),
    ({"kafka": {"bootstrap_servers": "k", "topics": ["t"], "client": {"group.id": "x"}}}, "kafka.client"),
])
def test_bad_config_names_the_field(over, field):
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(**over))
    assert field in str(info.value)


def test_check_config_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(minimal(kafka={"bootstrap_servers": "k", "topics": ["t"],
                                               "client": {"sasl.password": "hunter2"}})))
    result = CliRunner().invoke(main, ["check-config", str(f)])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output and "sasl.password: '***'" in result.output

    f.write_text(yaml.safe_dump(minimal(relay={"commit_interval_s": -1})))
    result = CliRunner().invoke(main, ["check-config", str(f)])
    assert result.exit_code != 0
    assert "relay.commit_interval_s" in result.output


def test_vendor_limits_default_to_the_adapters_and_config_overrides_them(tmp_path):
    from processor.vendors.convead import ConveadAdapter

    site = {"sites": {"default": {"app_key": "${CV_KEY}"}}, "options": {}}
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(minimal(vendors={"convead": site})))
    v = load_config(f, {"CV_KEY": "k"}).vendors["convead"]
    assert v.batch == ConveadAdapter.default_batch and v.concurrency == ConveadAdapter.default_concurrency == 32
    shown = CliRunner().invoke(main, ["check-config", str(f)], env={"CV_KEY": "k"}).output
    assert "concurrency: 32" in shown and "max_events: 100" in shown  # the limits that really apply
    f.write_text(yaml.safe_dump(minimal(vendors={"convead": {**site, "concurrency": 3,
                                                             "batch": {"max_events": 7}}})))
    v = load_config(f, {"CV_KEY": "k"}).vendors["convead"]
    assert (v.concurrency, v.batch.max_events) == (3, 7)
