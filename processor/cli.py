"""Command line: ``processor run``, ``processor check-config``, ``processor sandbox``, ``processor demo``."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import click
import yaml

from processor.config import is_loopback, load_config, redacted
from processor.errors import ConfigError


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
    from processor.logs import setup_logging

    config = _load(config_path)
    setup_logging(config.logging.level, config.logging.format)
    if workers > 1:
        from processor.workers import run_workers

        sys.exit(run_workers(config_path, workers, config.metrics.port))
    from processor.app import Relay

    sys.exit(asyncio.run(Relay(config).run()))


@main.command("check-config")
@click.argument("config_path", type=click.Path(dir_okay=False))
def check_config(config_path: str) -> None:
    """Validate a config file and print the effective config with secrets redacted."""
    config = _load(config_path)
    click.echo(yaml.safe_dump(redacted(config), sort_keys=False))
    click.echo(f"# {config_path}: OK ({', '.join(config.enabled_vendors()) or 'no vendors enabled'})", err=True)


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


def _load(path: str):  # type: ignore[no-untyped-def]
    try:
        return load_config(path)
    except ConfigError as exc:
        raise click.ClickException(f"invalid config: {exc}") from exc


if __name__ == "__main__":
    main()
