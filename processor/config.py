"""Configuration: a YAML file, ``${VAR}`` secrets from the environment, and
``PROCESSOR__SECTION__KEY=value`` environment overrides (typed by the model: a string setting takes the
value as written, lists and sections take JSON), validated into
frozen models that forbid unknown keys. Everything is validated before the
relay connects to anything; an error names the field (``vendors.qubit.sites.default.tracking_id``).

Overrides, and why they are spelled as they are. A shell, a systemd unit or a CI job can only export
names of letters, digits and ``_``; Kubernetes takes dotted names too. So every setting has a name of the
first kind: sections and fields are joined by ``__`` (``PROCESSOR__KAFKA__GROUP_ID``), and in a section
that passes a client library's own settings through (a ``dict[str, Any]``: ``kafka.client`` and
``deadletter.producer`` for librdkafka, ``schema_registry.client`` for the registry client) the rest of the
name is one key, upper-cased, ``_`` standing for ``.`` and ``__`` for ``_``:
``PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD`` is ``sasl.password``, ``PROCESSOR__KAFKA__CLIENT__LOG__LEVEL``
is ``log_level``. librdkafka's keys are lower-case letters, digits, dots and a few underscores, never two
of ``._`` in a row, so the spelling maps every key to one name and back. The dotted name
(``PROCESSOR__KAFKA__CLIENT__SASL.PASSWORD``) keeps working; both spellings of one key at once are an
error naming both variables. A typed ``kafka.sasl`` section was the alternative; it would cover only
the settings it names (OAUTHBEARER, Kerberos and ``ssl.*`` would need more fields with every librdkafka
release) and a second way to say what ``kafka.client`` says. pydantic-settings was not adopted: its
nested delimiter has the same gap for dotted keys, and the loader would still need this module's YAML
interpolation, typing by the model and error naming.

An override's value is taken as written, never ``${VAR}``-interpolated (a password ``k9${HOSTNAME}q``
stays that); only the YAML file is interpolated, after the overrides replaced what they set, so a
``${VAR}`` an override replaces need not be set.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator

from processor.codec import DEFAULT_SCHEMAS_DIR
from processor.egress import Egress
from processor.errors import ConfigError
from processor.vendors import REGISTRY, adapter_class
from processor.vendors.base import Frozen, VendorSettings

ENV_PREFIX = "PROCESSOR__"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")
# kafka.client keys that apply to every Kafka client of the relay (connection and auth), not only the consumer
SHARED_CLIENT_PREFIXES = ("security.", "sasl.", "ssl.", "client.id", "socket.", "broker.", "api.version")
_SECRET_KEY = re.compile(r"(password|secret|sasl\.|token|key|credentials|user\.info)", re.I)


class KafkaConfig(Frozen):
    bootstrap_servers: str
    group_id: str = "event-relay"
    topics: list[str] = Field(min_length=1)
    consume_batch: int = Field(1000, ge=1, le=100_000, description="messages per consume() call")
    client: dict[str, Any] = Field(  # repr=False here and below: these may hold passwords (sasl.password ...)
        default_factory=dict, repr=False,
        description="passed through to librdkafka (security.protocol, sasl.*, ssl.* ...)",
    )

    @field_validator("client")
    @classmethod
    def _no_managed_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        managed = {"bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store"}
        bad = managed & set(v)
        if bad:
            raise ValueError(f"{', '.join(sorted(bad))} is managed by the relay; set it in its own field")
        return v


class SchemaRegistryConfig(Frozen):
    url: str | None = Field(None, repr=False, description="Confluent-compatible registry; None = local id map only")
    client: dict[str, Any] = Field(default_factory=dict, repr=False, description="passed to SchemaRegistryClient")
    timeout_s: float = Field(5.0, gt=0, le=60, description="connect and read timeout of each registry request")
    local_ids: dict[int, str] | None = Field(
        None, description="schema id -> Avro full name or .avsc path (default: the embedded map)"
    )
    schemas_dir: Path = DEFAULT_SCHEMAS_DIR


class DeadLetterConfig(Frozen):
    topic: str
    producer: dict[str, Any] = Field(default_factory=dict, repr=False,
                                     description="extra librdkafka producer settings")
    retry_delay_s: float = Field(1.0, gt=0, description="wait before re-producing an unacknowledged record")


class ParkingConfig(Frozen):
    """Each vendor with ``on_outage: park`` parks what it cannot deliver now on its own retry topic,
    ``<topic_prefix>.<vendor>``, and the relay redrives it from there (its own consumer group)."""

    enabled: bool = Field(True, description="false: every vendor blocks (on_outage: block)")
    topic_prefix: str | None = Field(None, description="default: the first input topic + '.retry'")
    group_id: str | None = Field(None, description="redrive consumer group (default: kafka.group_id + '.redrive')")


class RelayConfig(Frozen):
    max_inflight_events: int = Field(20_000, ge=1, description="pause fetching above this many unsettled")
    stall_after_s: float = Field(
        900.0, gt=0, description="not ready while a message stays unsettled longer than this; not healthy only "
        "when nothing in the relay still works on it")
    loop_stall_s: float = Field(30.0, gt=0, description="not healthy when the event loop has not turned for this long")
    resume_ratio: float = Field(0.5, gt=0, lt=1, description="resume when in-flight falls below limit x this")
    shutdown_grace_s: float = Field(20.0, ge=0, description="on SIGTERM/rebalance, wait this long for in-flight")
    commit_interval_s: float = Field(1.0, gt=0)
    http_transport: str = Field("aiohttp", pattern="^(aiohttp|httpx)$", description="httpx transport")
    proxy: str | None = Field(
        None, repr=False, description="egress proxy of every vendor request, http://host:port (credentials "
        "from the environment: http://${PROXY_USER}:${PROXY_PASSWORD}@host:port); default: HTTPS_PROXY, "
        "HTTP_PROXY and NO_PROXY from the environment (processor.egress)")
    no_proxy: str | None = Field(None, description="with relay.proxy: hosts that go direct, NO_PROXY's syntax "
                                 "(default: the NO_PROXY environment variable)")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL naming the proxy's host (and port)")
        return v

    def egress(self) -> Egress:
        """Which proxy each vendor request goes through (processor.egress)."""
        return Egress(self.proxy, self.no_proxy)


class MetricsConfig(Frozen):
    host: str = "0.0.0.0"
    port: int = Field(9400, ge=0, le=65535)


class LoggingConfig(Frozen):
    level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    format: str = Field("auto", pattern="^(auto|json|text)$")


class Config(Frozen):
    kafka: KafkaConfig
    schema_registry: SchemaRegistryConfig = SchemaRegistryConfig()
    deadletter: DeadLetterConfig
    parking: ParkingConfig = ParkingConfig()
    relay: RelayConfig = RelayConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    vendors: dict[str, VendorSettings[Any, Any]] = Field(default_factory=dict)

    @field_validator("vendors", mode="before")
    @classmethod
    def _vendor_models(cls, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            return raw
        out: dict[str, Any] = {}
        for name, section in raw.items():
            if name not in REGISTRY:
                raise ValueError(f"unknown vendor {name!r}; known: {', '.join(sorted(REGISTRY))}")
            model = adapter_class(name).settings_model()
            out[name] = section if isinstance(section, model) else model.model_validate(section)
        return out

    def enabled_vendors(self) -> dict[str, VendorSettings[Any, Any]]:
        return {n: v for n, v in self.vendors.items() if v.enabled}

    def retry_topic_prefix(self) -> str | None:
        """None when parking is off."""
        if not self.parking.enabled:
            return None
        return self.parking.topic_prefix or f"{self.kafka.topics[0]}.retry"

    def retry_topics(self) -> dict[str, str]:
        """vendor -> its retry topic, for the enabled vendors that park."""
        prefix = self.retry_topic_prefix()
        if prefix is None:
            return {}
        return {n: f"{prefix}.{n}" for n, v in self.enabled_vendors().items() if v.on_outage == "park"}

    def client_settings(self) -> dict[str, Any]:
        """The ``kafka.client`` settings every Kafka client of the relay shares (connection and auth:
        security.*, sasl.*, ssl.* ...) with the bootstrap servers: for the producers and the admin client."""
        shared = {k: v for k, v in self.kafka.client.items() if k.startswith(SHARED_CLIENT_PREFIXES)}
        return {**shared, "bootstrap.servers": self.kafka.bootstrap_servers}

    def producer_settings(self) -> dict[str, Any]:
        """The dead-letter and parking producer's settings: the shared ones and ``deadletter.producer``."""
        return {**self.client_settings(), **self.deadletter.producer,
                "bootstrap.servers": self.kafka.bootstrap_servers}

    def vendor_budget(self, name: str) -> int:
        """Unsettled events vendor ``name`` may hold: its own setting, or an equal share of the relay's."""
        own = self.vendors[name].max_inflight_events
        return own or max(1, self.relay.max_inflight_events // max(1, len(self.enabled_vendors())))


def interpolate(node: Any, path: str, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set")
        return _VAR.sub(sub, node)
    if isinstance(node, dict):
        return {k: interpolate(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, f"{path}[{i}]", env) for i, v in enumerate(node)]
    return node


def _field_type(keys: list[str]) -> Any:
    """The annotation of the setting at ``keys`` (lower-cased path from the top), None where the model
    does not say (a key under ``kafka.client``, a vendor not in the registry)."""
    tp: Any = Config
    for depth, key in enumerate(keys):
        if depth == 1 and keys[0] == "vendors":
            if key not in REGISTRY:
                return None
            tp = adapter_class(key).settings_model()
            continue
        tp = _without_none(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(key)
            if field is None:
                return None
            tp = field.annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def _without_none(tp: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_structured(tp: Any) -> bool:
    """A list, mapping or model: what an environment variable can only give as JSON."""
    tp = _without_none(tp)
    origin = typing.get_origin(tp) or tp
    return origin in (list, dict, set, frozenset, tuple) or (isinstance(tp, type) and issubclass(tp, BaseModel))


@dataclass(frozen=True)
class _Literal:
    """An override's value inside the raw config: ``interpolate`` leaves it as it is."""

    value: Any


def _literal(value: Any) -> Any:
    """``value`` with every leaf marked literal (the structure stays, so overrides below it can merge)."""
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return _Literal(value)


def _unwrap(node: Any) -> Any:
    if isinstance(node, _Literal):
        return node.value
    if isinstance(node, dict):
        return {k: _unwrap(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unwrap(v) for v in node]
    return node


def _is_passthrough(tp: Any) -> bool:
    """A ``dict[str, Any]`` setting: a client library's own settings, passed through (``kafka.client``)."""
    tp = _without_none(tp)
    return typing.get_origin(tp) is dict and typing.get_args(tp) == (str, Any)


def env_key(parts: list[str]) -> str:
    """The library setting a name's remaining ``__``-separated parts spell: ``['SASL_PASSWORD']`` ->
    ``sasl.password``, ``['LOG', 'LEVEL']`` -> ``log_level``; a dotted part is taken as written."""
    return "_".join(p.lower() if "." in p else p.lower().replace("_", ".") for p in parts)


def shell_name(key: str) -> str:
    """The shell-safe spelling of a library setting (``sasl.password`` -> ``SASL_PASSWORD``): the inverse
    of ``env_key``."""
    return key.replace("_", "__").replace(".", "_").upper()


def _override_path(var: str) -> list[str] | None:
    """The setting path a ``PROCESSOR__...`` name sets, lower-cased; a client library's key is one part
    (None: the name sets nothing)."""
    parts = var[len(ENV_PREFIX):].split("__")
    keys: list[str] = []
    for i, part in enumerate(parts):
        if not part:
            return None
        if _is_passthrough(_field_type(keys)):
            return [*keys, env_key(parts[i:])]
        keys.append(part.lower())
    return keys or None


def _apply_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """PROCESSOR__KAFKA__BOOTSTRAP_SERVERS=host:9092 -> data['kafka']['bootstrap_servers'];
    PROCESSOR__KAFKA__CLIENT__SASL_PASSWORD=... -> data['kafka']['client']['sasl.password'].

    The value is typed by the config model, as pydantic-settings does: it stays the string as written (a
    string setting takes ``0123`` or ``yes`` as such; pydantic makes a number or a boolean of it where the
    field is one), and a list, mapping or section takes JSON. It is marked literal (``interpolate`` leaves
    it alone). Returns setting path -> variable name, so an error can name the variable; no error carries
    the value."""
    applied: dict[str, str] = {}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX):
            continue
        keys = _override_path(var)
        if keys is None:
            continue
        path = ".".join(keys)
        if path in applied:
            raise ConfigError(f"{path}: set twice by the environment, as {applied[path]} and {var}; keep one")
        value: Any = env[var]
        if _is_structured(_field_type(keys)):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"{path}: {var} is not valid JSON (this setting takes a JSON list or "
                                  f"object from the environment)") from None
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if isinstance(child, _Literal) and isinstance(child.value, dict):
                child = _literal(child.value)
            if not isinstance(child, dict):
                child = {}
            node[k] = child
            node = child
        node[keys[-1]] = _literal(value)
        applied[path] = var
    return applied


def _format_error(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        loc = prefix + (".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "<root>")
        lines.append(f"{loc}: {err['msg']}")
    return "; ".join(lines)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    env = os.environ if env is None else env
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    applied = _apply_overrides(raw, env)
    data = _unwrap(interpolate(raw, "", env))  # the file's ${VAR}s; the overrides' values as written
    try:
        return parse_config(data)
    except ConfigError as exc:
        named = sorted(var for path, var in applied.items() if path in str(exc))
        if not named:
            raise
        raise ConfigError(f"{exc} (set by the environment: {', '.join(named)})") from exc


_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if host.lower() in _LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8, ::1
    except ValueError:
        return False


def check_url(url: str, field: str, allow_insecure: bool) -> None:
    """ConfigError naming ``field`` unless ``url`` is https, or http to loopback, or http with
    ``allow_insecure``. The message shows scheme and host, never the whole URL (it may carry a secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ConfigError(f"{field}: not a URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{field}: must be an https:// URL (got scheme {parts.scheme or 'none'!r})")
    if parts.scheme == "http" and not allow_insecure and not is_loopback(host):
        vendor = field.split(".")[1]
        raise ConfigError(f"{field}: http:// to {host} would send {vendor}'s credentials and events unencrypted; "
                          f"use https, or set vendors.{vendor}.allow_insecure: true")


def check_vendor_urls(name: str, settings: VendorSettings[Any, Any]) -> None:
    """Every URL an enabled vendor's requests can go to: base_url (or the adapter's default) and the
    per-site overrides the adapter has (``site_url_fields``)."""
    cls = adapter_class(name)
    prefix = f"vendors.{name}"
    insecure = settings.allow_insecure
    check_url(settings.base_url or cls.default_base_url, f"{prefix}.base_url", insecure)
    for site_id, site in settings.sites.items():
        for field in cls.site_url_fields:
            url = getattr(site, field)
            if url:
                check_url(url, f"{prefix}.sites.{site_id}.{field}", insecure)


def parse_config(data: Mapping[str, Any]) -> Config:
    data = dict(data)
    vendors = data.get("vendors")
    if isinstance(vendors, Mapping):  # validated one by one so errors carry the vendor's name
        models = {}
        for name, section in vendors.items():
            if name not in REGISTRY:
                raise ConfigError(f"vendors.{name}: unknown vendor {name!r}; known: {', '.join(sorted(REGISTRY))}")
            try:
                models[name] = adapter_class(name).settings_model().model_validate(section)
            except ValidationError as exc:
                raise ConfigError(_format_error(exc, f"vendors.{name}.")) from exc
            if models[name].enabled:
                check_vendor_urls(name, models[name])
        data["vendors"] = models
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from exc
    except ValueError as exc:  # raised by our validators outside pydantic's wrapping
        raise ConfigError(str(exc)) from exc


def secret_values(config: Config) -> list[str]:
    """Every credential value in the config: SecretStr fields, client settings whose key names a secret
    (sasl.password, basic.auth.user.info ...) and passwords in URLs. For masking (processor.logs)."""
    out: set[str] = set()

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, SecretStr):
            out.add(node.get_secret_value())
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list | tuple | set | frozenset):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            if key and _SECRET_KEY.search(key) and key != "sasl.mechanism":
                out.add(node)
                out.update(node.split(":")[1:])  # user:password: the password alone too
            if "://" in node and "@" in node:
                with contextlib.suppress(ValueError):
                    if urlsplit(node).password:
                        out.add(urlsplit(node).password)  # type: ignore[arg-type]

    walk(config.model_dump(mode="python", round_trip=False))
    return sorted(s for s in out if s)


def redacted(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets replaced by '***'."""

    def walk(node: Any, key: str = "") -> Any:
        if isinstance(node, SecretStr):
            return "***"
        if isinstance(node, dict):
            return {k: walk(v, str(k)) for k, v in node.items()}
        if isinstance(node, list | tuple | set | frozenset):
            return [walk(v) for v in sorted(node, key=str)] if isinstance(node, set | frozenset) else [
                walk(v) for v in node
            ]
        if isinstance(node, Path):
            return str(node)
        if isinstance(node, str) and key and _SECRET_KEY.search(key) and key not in {"sasl.mechanism"}:
            return "***"
        if isinstance(node, str) and "://" in node and "@" in node:
            return _USERINFO.sub(r"\1***@", node)  # https://user:password@host -> https://***@host
        return node

    return walk(config.model_dump(mode="python", round_trip=False))  # type: ignore[no-any-return]
