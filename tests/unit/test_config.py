from __future__ import annotations

import json
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


def qubit(**over):
    section = {"sites": {"default": {"tracking_id": "t-secret-1"}}, "options": {}}
    section.update(over)
    return minimal(vendors={"qubit": section})


@pytest.mark.parametrize("url", [
    "https://offline-conversions.example.com", "http://127.0.0.1:8088/qubit", "http://127.9.9.9/q",
    "http://[::1]:8088/qubit", "http://localhost:8088/qubit",
])
def test_https_or_loopback_urls_load(url):
    assert parse_config(qubit(base_url=url)).vendors["qubit"].base_url == url


@pytest.mark.parametrize(("over", "field"), [
    ({"base_url": "http://qubit.example.com"}, "vendors.qubit.base_url"),
    ({"base_url": "http://10.0.0.1:8080"}, "vendors.qubit.base_url"),
    ({"base_url": "ftp://qubit.example.com"}, "vendors.qubit.base_url"),
    ({"base_url": "qubit.example.com/events"}, "vendors.qubit.base_url"),
    ({"sites": {"default": {"tracking_id": "t", "endpoint": "http://eu.qubit.example.com"}}},
     "vendors.qubit.sites.default.endpoint"),
])
def test_insecure_vendor_urls_refuse_to_start_naming_the_vendor_and_field(over, field):
    with pytest.raises(ConfigError) as info:
        parse_config(qubit(**over))
    assert str(info.value).startswith(f"{field}: ")


def test_allow_insecure_is_per_vendor_and_disabled_vendors_are_not_checked():
    cfg = parse_config(qubit(base_url="http://qubit.internal", allow_insecure=True))
    assert cfg.vendors["qubit"].allow_insecure
    parse_config(qubit(base_url="http://qubit.internal", enabled=False))
    tracardi = {"sites": {"default": {"source_id": "s", "base_url": "http://tracardi.internal:8686"}},
                "options": {}}
    with pytest.raises(ConfigError, match=r"^vendors\.tracardi\.sites\.default\.base_url: "):
        parse_config(minimal(vendors={"tracardi": tracardi}))
    parse_config(minimal(vendors={"tracardi": {**tracardi, "allow_insecure": True}}))
    ql = {"sites": {"a": {"client_key": "k", "endpoint": "http://sdk-events.example.com/events"}}, "options": {}}
    with pytest.raises(ConfigError, match=r"^vendors\.quicklizard\.sites\.a\.endpoint: "):
        parse_config(minimal(vendors={"quicklizard": ql}))


def test_every_adapters_default_url_passes_the_check():
    from processor.vendors import REGISTRY

    for name in REGISTRY:  # the defaults are https, or loopback (Tracardi is self-hosted)
        from processor.config import check_vendor_urls
        from processor.vendors import adapter_class

        model = adapter_class(name).settings_model()
        check_vendor_urls(name, model.model_construct(sites={}, allow_insecure=False, base_url=None))


SECRETS = ("t-secret-1", "ql-secret-2", "cv-secret-3", "tr-secret-4", "ca-secret-5", "sasl-secret-6",
           "sr-secret-7", "sr-pass-8")


def all_secrets_config(**vendor_over):
    return minimal(
        kafka={"bootstrap_servers": "k:9092", "topics": ["t"],
               "client": {"sasl.username": "u", "sasl.password": "sasl-secret-6"}},
        schema_registry={"url": "https://sr-user:sr-pass-8@registry.example.com",
                         "client": {"basic.auth.user.info": "sr-user:sr-secret-7"}},
        vendors={
            "qubit": {"sites": {"default": {"tracking_id": "t-secret-1"}}, "options": {}},
            "quicklizard": {"sites": {"default": {"client_key": "ql-secret-2"}}, "options": {}},
            "convert": {"sites": {"default": {"account_id": "1", "project_id": "2", "api": "v1",
                                              "secret": "cv-secret-3"}}, "options": {}},
            "tracardi": {"sites": {"default": {"source_id": "tr-secret-4"}}, "options": {}},
            "convead": {"sites": {"default": {"app_key": "ca-secret-5"}}, "options": {}},
            **vendor_over,
        })


def test_no_secret_in_check_config_output_nor_in_reprs(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(all_secrets_config()))
    result = CliRunner().invoke(main, ["check-config", str(f)])
    assert result.exit_code == 0, result.output
    cfg = load_config(f, {})
    shown = result.output + repr(cfg) + str(cfg) + repr(redacted(cfg))
    assert [s for s in SECRETS if s in shown] == []
    assert "https://***@registry.example.com" in result.output


@pytest.mark.parametrize("bad", [
    {"qubit": {"sites": {"default": {"tracking_id": "t-secret-1/../x"}}, "options": {}}},
    {"convert": {"sites": {"default": {"account_id": "cv-secret-3", "project_id": "2"}}, "options": {}}},
    {"quicklizard": {"sites": {"default": {"client_key": ["ql-secret-2"]}}, "options": {}}},
    {"convert": {"sites": {"default": {"account_id": "1", "project_id": "2", "secret": "cv-secret-3"}},
                 "options": {}}},
])
def test_config_errors_never_carry_a_value(bad, tmp_path):
    """The message, and every exception chained to it (what a traceback would print), name fields only."""
    with pytest.raises(ConfigError) as info:
        parse_config(all_secrets_config(**bad))
    exc: BaseException | None = info.value
    texts = []
    while exc is not None:
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert [s for s in SECRETS if any(s in t for t in texts)] == []
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(all_secrets_config(**bad)))
    result = CliRunner().invoke(main, ["check-config", str(f)])
    assert result.exit_code != 0 and [s for s in SECRETS if s in result.output] == []


@pytest.mark.parametrize(("args", "warned"), [([], False), (["--host", "::1"], False),
                                              (["--host", "0.0.0.0"], True), (["--host", "192.0.2.7"], True)])
def test_sandbox_binds_to_loopback_unless_told_and_says_so(monkeypatch, args, warned):
    import processor.sandbox.server as server

    bound = []

    async def fake_serve(host, port, vendors, keep):
        bound.append(host)

    monkeypatch.setattr(server, "serve_forever", fake_serve)
    result = CliRunner().invoke(main, ["sandbox", *args])
    assert result.exit_code == 0, result.output
    assert bound == [args[1] if args else "127.0.0.1"]
    assert ("not loopback" in result.output) is warned


def test_secret_values_are_every_credential_of_the_config():
    from processor.config import secret_values

    found = secret_values(parse_config(all_secrets_config()))
    assert set(SECRETS) <= set(found)
    assert "k:9092" not in found and "t.dlq" not in found


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_logs_mask_secrets_a_library_or_an_exception_would_carry(fmt, capsys):
    import logging

    from processor.config import secret_values
    from processor.logs import setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging("INFO", fmt, secret_values(parse_config(all_secrets_config())))
        log = logging.getLogger("some.library")
        log.warning("POST https://offline-conversions.qubit.com/events/%s failed", "t-secret-1")
        try:
            raise ValueError("Authorization: Bearer cv-secret-3 refused; sasl-secret-6")
        except ValueError:
            log.exception("boom")
        err = capsys.readouterr().err
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    assert "events/***" in err and "Bearer ***" in err and "Traceback" in err
    assert [s for s in SECRETS if s in err] == []


def test_parking_defaults_budgets_and_retry_topics():
    from processor.vendors import adapter_class

    vendors = {n: {**adapter_class(n).example_settings("http://127.0.0.1:1")} for n in ("qubit", "convead")}
    vendors["convead"]["on_outage"] = "block"
    cfg = load_config_from(minimal(kafka={"bootstrap_servers": "k:9092", "topics": ["shop", "other"],
                                          "group_id": "g"}, relay={"max_inflight_events": 1000},
                                   vendors=vendors))
    assert cfg.retry_topics() == {"qubit": "shop.retry.qubit"}  # a blocking vendor parks nothing
    assert cfg.vendor_budget("qubit") == 500 and cfg.vendor_budget("convead") == 500  # an equal share
    vendors["qubit"]["max_inflight_events"] = 50
    cfg = load_config_from(minimal(parking={"topic_prefix": "r", "enabled": True}, vendors=vendors))
    assert cfg.retry_topics() == {"qubit": "r.qubit"} and cfg.vendor_budget("qubit") == 50
    off = load_config_from(minimal(parking={"enabled": False}, vendors=vendors))
    assert off.retry_topics() == {} and off.retry_topic_prefix() is None
    with pytest.raises(ConfigError, match="on_outage"):
        load_config_from(minimal(vendors={"qubit": {**vendors["qubit"], "on_outage": "wait"}}))


def load_config_from(data):
    from processor.config import interpolate

    return parse_config(interpolate(data, "", {**ENV, "QUBIT_TRACKING_ID": "t", "CONVEAD_APP_KEY": "a"}))


# environment overrides are typed by the config model: a string field takes the value as written


def _with_env(tmp_path, env, **over):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(minimal(**over)))
    return load_config(f, env)


@pytest.mark.parametrize("value", ["0123", "yes", "no", "1e3", "null", "~", "[abc", "0x1F", "true"])
def test_override_of_a_string_setting_stays_the_string(tmp_path, value):
    cfg = _with_env(tmp_path, {"PROCESSOR__KAFKA__CLIENT__SASL.PASSWORD": value,
                               "PROCESSOR__DEADLETTER__TOPIC": value})
    assert cfg.kafka.client["sasl.password"] == value
    assert cfg.deadletter.topic == value


def test_override_numbers_and_booleans_typed_by_the_model(tmp_path):
    cfg = _with_env(tmp_path, {"PROCESSOR__KAFKA__CONSUME_BATCH": "0123", "PROCESSOR__PARKING__ENABLED": "no",
                               "PROCESSOR__RELAY__STALL_AFTER_S": "1e3", "PROCESSOR__METRICS__PORT": "9401"})
    assert cfg.kafka.consume_batch == 123
    assert cfg.parking.enabled is False
    assert cfg.relay.stall_after_s == 1000.0
    assert cfg.metrics.port == 9401


def test_override_of_a_list_takes_json(tmp_path):
    cfg = _with_env(tmp_path, {"PROCESSOR__KAFKA__TOPICS": '["a", "b"]'})
    assert cfg.kafka.topics == ["a", "b"]


def test_override_of_a_vendor_setting_typed_by_the_vendor_model(tmp_path):
    cfg = _with_env(tmp_path, {"PROCESSOR__VENDORS__QUICKLIZARD__SITES__DEFAULT__CLIENT_KEY": "0123",
                               "PROCESSOR__VENDORS__QUICKLIZARD__BATCH__MAX_EVENTS": "50"},
                    vendors={"quicklizard": {"sites": {"default": {"client_key": "k"}}, "options": {}}})
    assert cfg.vendors["quicklizard"].sites["default"].client_key.get_secret_value() == "0123"
    assert cfg.vendors["quicklizard"].batch.max_events == 50


@pytest.mark.parametrize(("var", "value", "field"), [
    ("PROCESSOR__KAFKA__CONSUME_BATCH", "s3cr3t-not-a-number", "kafka.consume_batch"),
    ("PROCESSOR__PARKING__ENABLED", "s3cr3t-maybe", "parking.enabled"),
    ("PROCESSOR__KAFKA__TOPICS", "[s3cr3t-abc", "kafka.topics"),
    ("PROCESSOR__KAFKA__CLIENT", "{s3cr3t", "kafka.client"),
    ("PROCESSOR__VENDORS__QUICKLIZARD__BATCH__MAX_EVENTS", "s3cr3t", "vendors.quicklizard.batch.max_events"),
])
def test_malformed_override_names_the_field_never_the_value(tmp_path, var, value, field):
    with pytest.raises(ConfigError) as err:
        _with_env(tmp_path, {var: value},
                  vendors={"quicklizard": {"sites": {"default": {"client_key": "k"}}, "options": {}}})
    text = str(err.value)
    assert field in text and var in text
    assert "s3cr3t" not in text
    assert "s3cr3t" not in repr(err.value.__cause__) and "s3cr3t" not in str(err.value.__cause__)


def test_check_config_lists_the_topics_the_config_needs(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(minimal(vendors={
        "quicklizard": {"sites": {"default": {"client_key": "k"}}, "options": {}},
        "tracardi": {"sites": {"default": {"source_id": "s"}}, "options": {}, "on_outage": "block",
                     "base_url": "https://tracardi.example"}})))
    result = CliRunner().invoke(main, ["check-config", str(f)])
    assert result.exit_code == 0, result.output
    listed = [line.split()[1:] for line in result.stderr.splitlines() if line.startswith("#   ")]
    assert listed == [["t", "(input)"], ["t.dlq", "(dead-letter)"], ["t.retry.quicklizard", "(retry:quicklizard)"]]


# shell-safe names for a library's dotted settings (kafka.client, deadletter.producer, schema_registry.client)


@pytest.mark.parametrize(("var", "section", "key"), [
    ("PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD", "client", "sasl.password"),
    ("PROCESSOR__KAFKA__CLIENT__SECURITY_PROTOCOL", "client", "security.protocol"),
    ("PROCESSOR__KAFKA__CLIENT__SSL_CA_LOCATION", "client", "ssl.ca.location"),
    ("PROCESSOR__KAFKA__CLIENT__ENABLE_SSL_CERTIFICATE_VERIFICATION", "client", "enable.ssl.certificate.verification"),
    ("PROCESSOR__KAFKA__CLIENT__LOG__LEVEL", "client", "log_level"),  # librdkafka's own underscore: doubled
    ("PROCESSOR__KAFKA__CLIENT__SASL.PASSWORD", "client", "sasl.password"),  # the dotted name still works
])
def test_shell_safe_name_of_a_librdkafka_setting(tmp_path, var, section, key):
    assert var.replace(".", "_").isidentifier() or "." in var
    cfg = _with_env(tmp_path, {var: "v"})
    assert cfg.kafka.client == {key: "v"}


def test_shell_safe_names_in_every_library_section(tmp_path):
    cfg = _with_env(tmp_path, {"PROCESSOR__DEADLETTER__PRODUCER__MESSAGE_MAX_BYTES": "2000000",
                               "PROCESSOR__SCHEMA_REGISTRY__CLIENT__BASIC_AUTH_USER_INFO": "u:p"})
    assert cfg.deadletter.producer == {"message.max.bytes": "2000000"}
    assert cfg.schema_registry.client == {"basic.auth.user.info": "u:p"}


def test_shell_safe_names_are_unambiguous_for_librdkafkas_keys():
    """Every librdkafka key is lower-case letters, digits, '.' and '_', never two of '._' in a row: the
    spelling (upper-case, '_' for '.', '__' for '_') is a bijection on them."""
    from processor.config import env_key, shell_name
    keys = ["sasl.password", "sasl.oauthbearer.client.id", "log_level", "ssl.certificate.verify_cb",
            "enable.ssl.certificate.verification", "topic.metadata.refresh.fast.interval.ms", "enabled_events"]
    names = [shell_name(k) for k in keys]
    assert all(n.isidentifier() and n.isupper() for n in names)
    assert [env_key(n.split("__")) for n in names] == keys


def test_two_spellings_of_one_setting_are_an_error_naming_both(tmp_path):
    with pytest.raises(ConfigError) as err:
        _with_env(tmp_path, {"PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD": "s3cr3t-a",
                             "PROCESSOR__KAFKA__CLIENT__SASL.PASSWORD": "s3cr3t-b"})
    text = str(err.value)
    assert "PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD" in text and "PROCESSOR__KAFKA__CLIENT__SASL.PASSWORD" in text
    assert "kafka.client.sasl.password" in text and "s3cr3t" not in text


# override values are taken as written: never ${VAR}-interpolated (the YAML file is)


@pytest.mark.parametrize("value", ["k9${HOSTNAME}q", "z${NOT_SET}z", "${NOT_SET:-d}", "$${HOSTNAME}", "${"])
def test_override_values_are_never_interpolated(tmp_path, value):
    env = {"HOSTNAME": "pod-7", "PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD": value,
           "PROCESSOR__DEADLETTER__TOPIC": value, "PROCESSOR__KAFKA__TOPICS": json.dumps([value]),
           "PROCESSOR__VENDORS__QUICKLIZARD__SITES__DEFAULT__CLIENT_KEY": value}
    cfg = _with_env(tmp_path, env, vendors={"quicklizard": {"sites": {"default": {"client_key": "k"}},
                                                            "options": {}}})
    assert cfg.kafka.client["sasl.password"] == value
    assert cfg.deadletter.topic == value
    assert cfg.kafka.topics == [value]
    assert cfg.vendors["quicklizard"].sites["default"].client_key.get_secret_value() == value


def test_yaml_keeps_its_interpolation_and_an_override_replaces_an_unset_reference(tmp_path):
    """An override replaces the YAML value before interpolation, so a ${VAR} it replaces need not be set."""
    cfg = _with_env(tmp_path, {"PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD": "k9${HOSTNAME}q", "HOSTNAME": "pod-7",
                               "USER_FROM_ENV": "relay"},
                    kafka={"bootstrap_servers": "k:9092", "topics": ["t"],
                           "client": {"sasl.username": "${USER_FROM_ENV}", "sasl.password": "${KAFKA_PASSWORD}",
                                      "client.id": "relay-${HOSTNAME}"}})
    assert cfg.kafka.client == {"sasl.username": "relay", "sasl.password": "k9${HOSTNAME}q",
                                "client.id": "relay-pod-7"}


def test_an_override_merges_into_a_json_section_set_by_another(tmp_path):
    cfg = _with_env(tmp_path, {"PROCESSOR__KAFKA__CLIENT": '{"security.protocol": "SASL_SSL", "x.y": "${A}"}',
                               "PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD": "p${A}"})
    assert cfg.kafka.client == {"security.protocol": "SASL_SSL", "x.y": "${A}", "sasl.password": "p${A}"}


def test_a_literal_value_error_never_quotes_the_value(tmp_path):
    """An override the model refuses names the field and the variable, not the text (nor a ${...} in it)."""
    with pytest.raises(ConfigError) as err:
        _with_env(tmp_path, {"PROCESSOR__KAFKA__CONSUME_BATCH": "z${NOT_SET}z"})
    text = str(err.value)
    assert "kafka.consume_batch" in text and "PROCESSOR__KAFKA__CONSUME_BATCH" in text
    assert "NOT_SET" not in text and "z$" not in text


def test_a_secret_set_by_its_shell_safe_name_is_masked_everywhere(tmp_path):
    from processor.config import secret_values

    cfg = _with_env(tmp_path, {"PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD": "k9${HOSTNAME}q-s3cr3t",
                               "PROCESSOR__SCHEMA_REGISTRY__CLIENT__BASIC_AUTH_USER_INFO": "relay:r3g-s3cr3t"})
    assert {"k9${HOSTNAME}q-s3cr3t", "r3g-s3cr3t"} <= set(secret_values(cfg))
    shown = yaml.safe_dump(redacted(cfg))
    assert "s3cr3t" not in shown and "sasl.password: '***'" in shown
