"""Command line: ``processor run``, ``processor check-config``, ``processor topics create|check``,
``processor dlq inspect|replay``, ``processor sandbox``, ``processor demo``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import yaml

from processor.config import is_loopback, load_config, redacted
from processor.errors import ERROR_CLASSES, ConfigError, RelayError


@click.group()
@click.version_option(package_name="event-relay")
def main() -> None:
    """Relay order and product-view events from Kafka to vendor HTTP APIs."""


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML config file (PROCESSOR__SECTION__KEY env vars override it).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Consumer processes in the same group (worker i serves metrics on port + i).")
def run(config_path: str, workers: int) -> None:
    """Consume, batch, deliver and dead-letter until SIGTERM; exits 0 after a clean drain."""
    from processor.config import secret_values
    from processor.logs import log_uncaught, setup_logging

    config = _load(config_path)
    setup_logging(config.logging.level, config.logging.format, secret_values(config))
    log_uncaught()
    if workers > 1:
        from processor.workers import run_workers

        sys.exit(run_workers(config_path, workers, config.metrics.port))
    from processor.app import Relay

    relay = Relay(config)
    try:
        code = asyncio.run(relay.run())
    except Exception as exc:  # the last words, masked like every log line; the restart cures it
        logging.getLogger("processor").critical("the relay failed: %s", type(exc).__name__, exc_info=exc)
        logging.shutdown()
        os._exit(1)  # nothing settled is lost; no client thread may hold the exit
    if relay.unclean_exit:  # everything settled is committed; a stuck librdkafka thread must not hold the exit
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--connect", is_flag=True,
              help="Also connect to Kafka and the schema registry with the config's settings (SASL, TLS, CA, "
                   "credentials); exit 1 naming what refuses them.")
@click.option("--timeout", "timeout_s", default=15.0, show_default=True, type=float,
              help="Seconds to wait for Kafka and the registry to answer (with --connect).")
def check_config(config_path: str, connect: bool, timeout_s: float) -> None:
    """Validate a config file and print the effective config with secrets redacted."""
    config = _load(config_path)
    click.echo(yaml.safe_dump(redacted(config), sort_keys=False))
    click.echo(f"# {config_path}: OK ({', '.join(config.enabled_vendors()) or 'no vendors enabled'})", err=True)
    from processor.topics import needed_topics

    click.echo("# topics it needs (`processor topics create|check`):", err=True)
    for need in needed_topics(config):
        click.echo(f"#   {need.name}  ({need.role})", err=True)
    for vendor, origin, route in _vendor_routes(config):  # relay.proxy, else HTTPS_PROXY/HTTP_PROXY/NO_PROXY
        click.echo(f"# egress of {vendor}: {origin} -> {route}", err=True)
    if connect:
        _check_connections(config, timeout_s)


def _check_connections(config: Any, timeout_s: float) -> None:
    """``check-config --connect``: Kafka (the admin client, as ``topics`` connects) and the registry answer."""
    from confluent_kafka import KafkaException

    from processor.codec import fetch_registry_schema
    from processor.errors import DecodeError, RegistryUnavailable
    from processor.kafka_access import AccessWatch, reach
    from processor.topics import admin_client

    access = AccessWatch("check-config")
    try:
        md = reach(admin_client(config, access), access, timeout_s)
    except KafkaException as exc:
        raise click.ClickException(f"Kafka at {config.kafka.bootstrap_servers}: "
                                   f"{exc.args[0].str() if exc.args else exc}") from exc
    click.echo(f"# kafka: {config.kafka.bootstrap_servers} answered ({len(md.brokers)} brokers, "
               f"{len(md.topics)} topics visible)", err=True)
    if not config.schema_registry.url:
        return
    from confluent_kafka.schema_registry import SchemaRegistryClient

    registry = SchemaRegistryClient({"url": config.schema_registry.url, "timeout": timeout_s,
                                     **config.schema_registry.client})
    try:
        fetch_registry_schema(registry, 1)  # any answer about an id says the registry lets the relay in
    except RegistryUnavailable as exc:
        raise click.ClickException(f"schema registry: {exc}") from exc
    except (DecodeError, ValueError):
        pass
    click.echo("# schema registry: answered", err=True)


def _vendor_routes(config: Any) -> list[tuple[str, str, str]]:
    """(vendor, origin, the route shown) for each enabled vendor's endpoint and per-site URL overrides."""
    from urllib.parse import urlsplit

    from processor.vendors import adapter_class

    egress = config.relay.egress()
    out = []
    for name, settings in config.enabled_vendors().items():
        cls = adapter_class(name)
        urls = [settings.base_url or cls.default_base_url]
        urls += [getattr(site, f) for site in settings.sites.values() for f in cls.site_url_fields
                 if getattr(site, f, None)]
        origins = dict.fromkeys(f"{p.scheme}://{p.netloc.rsplit('@', 1)[-1]}" for p in map(urlsplit, map(str, urls)))
        out += [(name, origin, egress.route(origin + "/").shown) for origin in origins]
    return out


@main.group()
def topics() -> None:
    """Create and verify the topics a config needs: the dead-letter topic and each parking vendor's retry
    topic (input topics are the producers': checked, never created)."""


_config_option = click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                              help="The relay's YAML config file.")
_timeout_option = click.option("--timeout", "timeout_s", default=30.0, show_default=True, type=float,
                               help="Seconds to wait for Kafka to answer.")


@topics.command("create")
@_config_option
@click.option("--partitions", type=click.IntRange(1),
              help="Partitions of each new topic [default: as many as the first input topic has].")
@click.option("--replication-factor", default=-1, show_default=True, type=int,
              help="Replicas of each new topic (-1: the broker's default.replication.factor).")
@click.option("--retry-retention-margin-hours", default=24.0, show_default=True, type=click.FloatRange(24),
              help="A retry topic keeps records its vendor's retry.max_elapsed_s plus this long (at least the "
                   "24 h `topics check` requires).")
@click.option("--deadletter-retention-days", default=14.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="retention.ms of the dead-letter topic (time to inspect and replay).")
@_timeout_option
def topics_create(config_path: str, partitions: int | None, replication_factor: int,
                  retry_retention_margin_hours: float, deadletter_retention_days: float, timeout_s: float) -> None:
    """Create the dead-letter and retry topics that do not exist yet; existing ones are left alone (run
    `topics check` to verify them). Safe to run on every deploy."""
    from confluent_kafka import KafkaException

    from processor.topics import DAY_MS, HOUR_MS, CreateOptions, create

    config = _load(config_path)
    options = CreateOptions(partitions, replication_factor, int(retry_retention_margin_hours * HOUR_MS),
                            int(deadletter_retention_days * DAY_MS))
    try:
        result = create(config, options, timeout_s=timeout_s)
    except KafkaException as exc:
        raise click.ClickException(str(exc.args[0] if exc.args else exc)) from exc
    for topic, what in result.items():
        click.echo(f"{topic}: {what}")


@topics.command("check")
@_config_option
@_timeout_option
def topics_check(config_path: str, timeout_s: float) -> None:
    """Verify every topic the config needs exists with a leader per partition, is writable, keeps parked
    records at least retry.max_elapsed_s and takes the largest record the relay writes. Exits 1 naming
    each topic that does not fit."""
    from confluent_kafka import KafkaException

    from processor.topics import check, needed_topics

    config = _load(config_path)
    try:
        problems = check(config, timeout_s=timeout_s)
    except KafkaException as exc:
        raise click.ClickException(str(exc.args[0] if exc.args else exc)) from exc
    if problems:
        for line in problems:
            click.echo(line, err=True)
        raise click.ClickException(f"{len(problems)} problem(s) with the topics of {config_path}")
    for need in needed_topics(config):
        click.echo(f"{need.name}: ok ({need.role})")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; loopback unless told otherwise (the twins have no authentication).")
@click.option("--port", default=8088, show_default=True, type=int)
@click.option("--vendor", "vendors", multiple=True, help="Serve only these twins (default: all).")
@click.option("--keep", default=200_000, show_default=True, type=int,
              help="Accepted items kept per vendor for /_sandbox/received (0: count only, for benchmarks).")
def sandbox(host: str, port: int, vendors: tuple[str, ...], keep: int) -> None:
    """Serve the local vendor twins (for trying a config before pointing it at the real vendors)."""
    from processor.logs import setup_logging
    from processor.sandbox.server import serve_forever

    setup_logging()
    if not is_loopback(host):
        click.echo(f"warning: the sandbox binds to {host}, not loopback: other machines can reach it, and it has "
                   "no authentication and keeps what it receives", err=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_forever(host, port, list(vendors) or None, keep))


@main.command()
@click.option("--rate", default=50.0, show_default=True, help="Sample events produced per second.")
@click.option("--metrics-port", default=9400, show_default=True, type=int)
@click.option("--sandbox-port", default=8088, show_default=True, type=int)
def demo(rate: float, metrics_port: int, sandbox_port: int) -> None:
    """The local stack: broker, topics, vendor sandbox, sample producer and the relay, until Ctrl-C."""
    from processor.devstack.demo import run_demo

    sys.exit(run_demo(rate=rate, metrics_port=metrics_port, sandbox_port=sandbox_port))


def _filter_options(with_vendor: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The record filters ``dlq inspect`` and ``dlq replay`` share."""
    options = [
        click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
                     help="The relay's YAML config file."),
    ]
    if with_vendor:
        options.append(click.option("--vendor", "vendors", multiple=True,
                                    help="Only records for this vendor (repeatable; 'none': undecodable/unroutable)."))
    options += [
        click.option("--error-class", "error_classes", multiple=True, type=click.Choice(ERROR_CLASSES),
                     help="Only this error class (repeatable)."),
        click.option("--status", type=int, help="Only records whose last HTTP status is this."),
        click.option("--since", help="Failed at or after: ISO 8601 time (UTC unless it says) or 30m, 2h, 1d ago."),
        click.option("--until", help="Failed before: ISO 8601 time or relative, as --since."),
        click.option("--topic", help="Original topic."),
        click.option("--partition", type=int, help="Original partition."),
        click.option("--offsets", help="Original offsets A-B (inclusive)."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document (scripts, tests)."),
        click.option("--timeout", "timeout_s", default=15.0, show_default=True, type=float,
                     help="Seconds to wait for Kafka to answer."),
    ]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):  # the first listed is shown first
            fn = option(fn)
        return fn

    return wrap


def _filters(vendors: tuple[str, ...], error_classes: tuple[str, ...], status: int | None, since: str | None,
             until: str | None, topic: str | None, partition: int | None, offsets: str | None):  # type: ignore[no-untyped-def]
    import time

    from processor.dlq import parse_offsets, parse_when
    from processor.redrive import Filters

    now_ms = int(time.time() * 1000)
    try:
        return Filters(frozenset(vendors), frozenset(error_classes), status,
                       parse_when(since, now_ms) if since else None, parse_when(until, now_ms) if until else None,
                       topic, partition, parse_offsets(offsets) if offsets else None)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@main.group()
def dlq() -> None:
    """Inspect the dead-letter topic and replay it to one vendor."""


@dlq.command("inspect")
@_filter_options(with_vendor=True)
@click.option("--show", default=0, type=click.IntRange(0), help="Print N matching records, decoded, PII masked.")
def dlq_inspect(config_path: str, vendors: tuple[str, ...], error_classes: tuple[str, ...], status: int | None,
                since: str | None, until: str | None, topic: str | None, partition: int | None,
                offsets: str | None, as_json: bool, timeout_s: float, show: int) -> None:
    """Summarise the dead-letter topic (start to end as of now; commits nothing): counts by vendor, error
    class and status, failure times, top reasons, and per vendor what is pending versus replayed."""
    from processor.config import secret_values
    from processor.dlq import inspect, replay_group
    from processor.dlq.view import inspection_doc, inspection_text
    from processor.logs import setup_logging

    config = _load(config_path)
    setup_logging(config.logging.level, config.logging.format, secret_values(config))
    filters = _filters(vendors, error_classes, status, since, until, topic, partition, offsets)
    try:
        found = inspect(config, filters, show, timeout_s)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    doc = inspection_doc(found, found.decoder, lambda v: replay_group(config, v))
    click.echo(json.dumps(doc) if as_json else inspection_text(doc))


@dlq.command("replay")
@_filter_options(with_vendor=False)
@click.option("--vendor", required=True, help="Re-deliver to this vendor only, from its own replay position.")
@click.option("--dry-run", is_flag=True, help="Plan the requests and print samples; send and commit nothing.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), help="At most N events a second.")
@click.option("--max-replays", default=3, show_default=True, type=click.IntRange(1),
              help="Records replayed this many times already are reported and skipped.")
@click.option("--from-start", is_flag=True,
              help="Read from the start of the topic, not the vendor's position (what an earlier filtered run "
                   "skipped); use with filters: what matches is sent again.")
def dlq_replay(config_path: str, vendor: str, error_classes: tuple[str, ...], status: int | None,
               since: str | None, until: str | None, topic: str | None, partition: int | None, offsets: str | None,
               as_json: bool, timeout_s: float, dry_run: bool, rate: float | None, max_replays: int,
               from_start: bool) -> None:
    """Re-deliver dead-lettered records to one vendor through the relay's own delivery path, from the
    vendor's replay group position to the end as of the start; resumable; what fails again is written
    back with relay.replay_count + 1. Exits 0 once every record settled, 3 if stopped before."""
    from processor.config import secret_values
    from processor.dlq import ReplayOptions, run_replay
    from processor.dlq.view import ProgressReporter, replay_doc, replay_text
    from processor.logs import setup_logging

    config = _load(config_path)
    setup_logging(config.logging.level, config.logging.format, secret_values(config))
    filters = _filters((), error_classes, status, since, until, topic, partition, offsets)
    progress = ProgressReporter(vendor)
    try:
        options = ReplayOptions(vendor, filters, dry_run, rate, max_replays, timeout_s, from_start=from_start)
        result = run_replay(config, options, progress)
    except RelayError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        progress.close()
    doc = replay_doc(result)
    click.echo(json.dumps(doc) if as_json else replay_text(doc))
    if not result.complete:
        sys.exit(3)


def _load(path: str):  # type: ignore[no-untyped-def]
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(f"invalid config: {exc}") from exc


if __name__ == "__main__":
    main()
