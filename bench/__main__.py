"""``python -m bench`` (``make bench BENCH_ARGS=...``): see bench/README.md."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console

from bench.outage import BROKEN, SHAPES, VENDORS, OutageOptions
from bench.report import print_report, write
from bench.run import Options, run

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


@click.command()
@click.option("--events", type=click.IntRange(1), help="Pre-loaded events per scenario  [default: 200000]")
@click.option("--scenarios", default="a,b,c", show_default=True,
              help="Comma-separated: a, b, c; 'none' runs none (nor the pre-load, the decode ceiling, scaling and "
                   "backlog runs, which use them).")
@click.option("--backlog", type=click.IntRange(0), help="Events of the backlog run; 0 skips it  [default: 1000000]")
@click.option("--workers", type=click.IntRange(0), help="Workers of the scaling run; <2 skips it  [default: 2]")
@click.option("--latency-seconds", type=float,
              help="Length of each scenario's half-load latency run; 0 skips them  [default: 15]")
@click.option("--http-seconds", type=float, help="Length of each HTTP ceiling measurement  [default: 3]")
@click.option("--partitions", default=6, show_default=True, type=click.IntRange(1))
@click.option("--transport", default="aiohttp", show_default=True, type=click.Choice(["aiohttp", "httpx"]),
              help="httpx transport, for the relay and the HTTP ceiling alike.")
@click.option("--outage-seconds", type=click.FloatRange(0),
              help="How long the vendor is broken in each shape of the outage run; 0 skips the run  [default: 60]")
@click.option("--outage-vendor", default=BROKEN, show_default=True, type=click.Choice(VENDORS),
              help="The vendor the outage run breaks (the others are the healthy ones).")
@click.option("--outage-vendors", default=",".join(VENDORS), show_default=True,
              help="Comma-separated vendors of the outage run, the broken one among them.")
@click.option("--outage-rate", default=1500.0, show_default=True, type=click.FloatRange(1),
              help="The outage run's steady load, events/s.")
@click.option("--outage-before", default=20.0, show_default=True, type=click.FloatRange(1),
              help="Seconds of steady load before each outage.")
@click.option("--outage-shapes", default=",".join(SHAPES), show_default=True,
              help=f"Comma-separated fault shapes: {', '.join(SHAPES)}.")
@click.option("--quick", is_flag=True,
              help="20k events, no backlog or outage run, 5 s latency run, 1 s HTTP ceilings.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Configs and logs of every process (default: a new temporary directory).")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Record each scenario's relay with py-spy into this directory (collapsed stacks).")
def main(events: int | None, scenarios: str, backlog: int | None, workers: int | None,
         latency_seconds: float | None, http_seconds: float | None, partitions: int,
         transport: str, outage_seconds: float | None, outage_vendor: str, outage_vendors: str, outage_rate: float,
         outage_before: float, outage_shapes: str,
         quick: bool, out: Path, workdir: Path | None, profile_dir: Path | None) -> None:
    """Measure the relay against the decode and HTTP ceilings on the local stack, and through an outage."""
    keys = [k.strip() for k in scenarios.split(",") if k.strip() and k.strip() != "none"]
    bad = [k for k in keys if k not in ("a", "b", "c")]
    if bad:
        raise click.BadParameter(f"unknown scenario {', '.join(bad)}", param_hint="--scenarios")
    vendors = tuple(v.strip() for v in outage_vendors.split(",") if v.strip())
    if any(v not in VENDORS for v in vendors) or outage_vendor not in vendors:
        raise click.BadParameter(f"vendors among {', '.join(VENDORS)}, {outage_vendor} one of them",
                                 param_hint="--outage-vendors")
    shapes = [k.strip() for k in outage_shapes.split(",") if k.strip()]
    bad = [k for k in shapes if k not in SHAPES]
    if bad:
        raise click.BadParameter(f"unknown shape {', '.join(bad)}", param_hint="--outage-shapes")
    base = Options(events=20_000, backlog=0, latency_seconds=5, http_seconds=1) if quick else Options()
    seconds = outage_seconds if outage_seconds is not None else (0.0 if quick else base.outage.seconds)
    opts = Options(
        events=events if events is not None else base.events,
        scenarios=keys,
        backlog=backlog if backlog is not None else base.backlog,
        workers=workers if workers is not None else base.workers,
        latency_seconds=latency_seconds if latency_seconds is not None else base.latency_seconds,
        http_seconds=http_seconds if http_seconds is not None else base.http_seconds,
        partitions=partitions, transport=transport, workdir=workdir, profile_dir=profile_dir,
        outage=OutageOptions(seconds=seconds, vendor=outage_vendor, vendors=vendors, rate=outage_rate,
                             before_s=outage_before, shapes=shapes, partitions=partitions),
    )
    console = Console(width=max(Console().width, 180))
    doc = run(opts, console)
    write(doc, out)
    print_report(doc, console)
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
