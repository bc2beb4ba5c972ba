"""Streaming verbs: broker, worker ingest, simulate, history, schemas export, bench ingest."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from streamrec.cli.apps import app, bench_app, schemas_app, worker_app
from streamrec.settings import Settings, load_settings

if TYPE_CHECKING:
    from datetime import datetime

    from streamrec.events import Recommendation

console = Console()


def _settings() -> Settings:
    return load_settings()


@app.command()
def broker(
    port: int = typer.Option(9092, help="Loopback port to listen on (0 picks a free one)."),
    create: bool = typer.Option(True, help="Create streamrec's topics once the broker is up."),
) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) in the foreground."""
    from streamrec.kafka.broker import EmbeddedBroker
    from streamrec.kafka.topics import create_topics

    settings = _settings()
    with EmbeddedBroker(port=port) as embedded:
        console.print(f"[bold green]broker ready[/] bootstrap servers: {embedded.bootstrap_servers}")
        if create:
            kafka = settings.kafka.model_copy(update={"bootstrap_servers": embedded.bootstrap_servers})
            created = create_topics(kafka, settings.topics)
            console.print(f"created topics: {', '.join(created) or '(none)'}")
        console.print("memory storage: everything is gone when it stops. Ctrl-C to stop.")
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


@worker_app.command("ingest")
def worker_ingest(
    loglevel: str = typer.Option("info", help="Log level."),
    create: bool = typer.Option(True, "--create/--no-create", help="Create missing topics before starting."),
) -> None:
    """Consume clicks and purchases into per-user histories; serve GET /users/{id}/history."""
    run_worker("ingest", loglevel, create)


@worker_app.command("infer")
def worker_infer(
    loglevel: str = typer.Option("info", help="Log level."),
    create: bool = typer.Option(True, "--create/--no-create", help="Create missing topics before starting."),
) -> None:
    """Consume history updates in micro-batches and publish recommendations (STREAMREC_MODEL__BASE)."""
    run_worker("infer", loglevel, create)


@worker_app.command("train")
def worker_train(
    loglevel: str = typer.Option("info", help="Log level."),
    create: bool = typer.Option(True, "--create/--no-create", help="Create missing topics before starting."),
) -> None:
    """Join recommendations with the events that follow into training examples; every
    STREAMREC_ONLINE__INTERVAL_S train a LoRA increment, gate it and promote it (run one replica)."""
    run_worker("train", loglevel, create)


# EX_CONFIG: a restart alone will not help; the message says what to change.
EXIT_CONFIG = 78


def run_worker(role: str, loglevel: str, create: bool) -> None:
    import faust

    from agents import create_app
    from streamrec.errors import ConfigError, ModelError
    from streamrec.kafka.topics import create_topics, seal_partitions

    try:
        settings = _settings()
        if create:
            create_topics(settings.kafka, settings.topics)
        # Building the app checks that the model loads: a bad base stops here, before any group join.
        app = create_app(settings, role)
    except (ConfigError, ModelError) as exc:
        console.print(f"[red]{type(exc).__name__}: {escape(str(exc))}[/]", soft_wrap=True)
        raise typer.Exit(EXIT_CONFIG) from None
    # Tables restore from these topics at start; see seal_partitions for why they are sealed first.
    restored = [table.changelog_topic.get_topic_name() for table in app.tables.values()]
    seal_partitions(settings.kafka, restored)
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()


@app.command()
def history(
    user_id: str = typer.Argument(..., help="The user whose history to print."),
    url: str = typer.Option("", help="Ingest worker base URL (default http://localhost:STREAMREC_WEB_PORT)."),
) -> None:
    """Print a user's history, oldest first, from a running ingest worker."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from rich.table import Table

    base = url or f"http://localhost:{_settings().web_port}"
    target = f"{base.rstrip('/')}/users/{urllib.parse.quote(user_id, safe='')}/history"
    try:
        with urllib.request.urlopen(target, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            console.print(f"[yellow]unknown user {user_id!r}[/]")
            raise typer.Exit(1) from None
        raise
    except urllib.error.URLError as exc:
        console.print(f"[red]cannot reach the ingest worker at {base}: {exc.reason}[/]")
        raise typer.Exit(2) from None
    table = Table(title=f"history of {body['user_id']} ({len(body['events'])} events, oldest first)")
    for col in ("ts", "type", "item_id", "event_id", "session_id"):
        table.add_column(col)
    for ev in body["events"]:
        table.add_row(ev["ts"], ev["type"], ev["item_id"], ev["event_id"], ev.get("session_id") or "")
    console.print(table)


@schemas_app.command("export")
def schemas_export(
    out: Path = typer.Option(Path("schemas"), help="Directory to write <name>.schema.json files into."),
) -> None:
    """Write the JSON Schema of every message contract."""
    from streamrec.schemas import write_schemas

    for path in write_schemas(out):
        console.print(f"wrote {path}")


@app.command()
def simulate(
    count: int = typer.Option(10_000, help="Events to produce."),
    rate: float = typer.Option(500.0, help="Events per second (0: as fast as possible)."),
    users: int = typer.Option(200, help="Simulated users."),
    items: int = typer.Option(500, help="Catalog size."),
    seed: int = typer.Option(7, help="Random seed: the same seed gives the same traffic."),
    follow: float = typer.Option(
        0.45,
        min=0.0,
        max=1.0,
        help="Chance the next click follows the last item's series: how much a first-order model can know "
        "(about 0.05 for a sparse e-commerce log such as Amazon Beauty).",
    ),
    catalog: bool = typer.Option(True, help="Publish the catalog first."),
    out: Path | None = typer.Option(
        None, help="Write a CSV event log (user_id,item_id,timestamp,type) and a catalog .jsonl here instead."
    ),
) -> None:
    """Produce realistic synthetic traffic: item text, Zipf popularity, drifting tastes, sessions,
    item series and a click-to-purchase funnel."""
    from rich.progress import Progress

    from streamrec.lab.simulate import SimConfig, generate_events, make_catalog, write_catalog, write_log
    from streamrec.lab.traffic import send_catalog, send_events

    cfg = SimConfig(users=users, items=items, seed=seed, follow=follow)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        n = write_log(generate_events(cfg, count), out)
        catalog_path = out.with_suffix(".catalog.jsonl")
        write_catalog(make_catalog(cfg), catalog_path)
        console.print(f"wrote {n} events to {out} and the catalog to {catalog_path}")
        return

    settings = _settings()
    if catalog:
        console.print(f"catalog: {len(send_catalog(settings, make_catalog(cfg)))} items -> {settings.topics.catalog}")
    with Progress(console=console) as progress:
        task = progress.add_task(f"events -> {settings.kafka.bootstrap_servers}", total=count)
        stats = send_events(
            settings,
            generate_events(cfg, count),
            rate=rate or None,
            on_sent=lambda n: progress.update(task, completed=n) if n % 100 == 0 else None,
        )
        progress.update(task, completed=stats.sent)
    console.print(f"sent {stats.sent} events")


@bench_app.command("ingest")
def bench_ingest(
    events: int = typer.Option(50_000, help="Events to push through both consumers."),
    users: int = typer.Option(2_000, help="Distinct users in the simulated stream."),
    out: Path = typer.Option(Path("bench-ingest.json"), help="Where to write the JSON report."),
    profile: Path | None = typer.Option(None, help="Run the ingest worker under cProfile, statistics to this file."),
) -> None:
    """Ingest worker events/s against a raw aiokafka consumer on the same broker and events."""
    from streamrec.lab.bench.ingest import run

    run(events, out, users=users, profile=profile)


@bench_app.command("infer")
def bench_infer(
    users: int = typer.Option(256, help="Simulated users, each with their last 20 events."),
    repeats: int = typer.Option(3, help="Timed runs per path after one warm-up; medians are reported."),
    flan: bool = typer.Option(True, "--flan/--no-flan", help="Also measure the Flan-T5-small shape (slow)."),
    threads: int = typer.Option(
        0, help="torch threads (0: the usable cores). On a CPU shared with busy processes, fewer can be faster."
    ),
    out: Path = typer.Option(Path("bench-infer.json"), help="Where to write the JSON report."),
) -> None:
    """Users/s of recommend() batched against one user at a time, same model and histories."""
    import os

    import torch

    from streamrec.lab.bench.infer import run

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(threads or usable)
    run(out, users=users, repeats=repeats, flan=flan)


@bench_app.command("scale")
def bench_scale(
    sizes: str = typer.Option("10000,100000,1000000", help="Catalog sizes, comma-separated."),
    users: int = typer.Option(100_000, help="Simulated users whose histories the blend is fitted on."),
    schemes: str = typer.Option("item_token,title", help="Identifier schemes, comma-separated."),
    timed: int = typer.Option(512, help="Users whose requests are timed per worker (batched)."),
    threads: int = typer.Option(0, help="torch threads in each worker (0: the usable cores)."),
    out: Path = typer.Option(Path("bench-scale.json"), help="Where to write the JSON report."),
) -> None:
    """Per catalog size and scheme: one fresh worker's resident memory, batched users/s, blend fit time."""
    from streamrec.lab.bench.scale import run

    try:
        chosen = [int(s.replace("_", "")) for s in sizes.split(",") if s.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"--sizes takes integers separated by commas, not {sizes!r}") from exc
    names = [s.strip() for s in schemes.split(",") if s.strip()]
    run(out, sizes=chosen, users=users, schemes=names, timed=timed, threads=threads)


@app.command()
def demo(
    duration: float | None = typer.Option(None, help="Seconds to run, then stop cleanly (default: until Ctrl-C)."),
    rate: float = typer.Option(200.0, help="Simulated events per second."),
    users: int = typer.Option(300, help="Simulated users."),
    items: int = typer.Option(500, help="Catalog size."),
    seed: int = typer.Option(7, help="Random seed of the simulated traffic."),
) -> None:
    """The whole pipeline on this machine: embedded broker, workers, simulated traffic, live view."""
    from streamrec.lab.demo import run

    raise typer.Exit(run(duration, rate, users, items, seed))


@bench_app.command("e2e")
def bench_e2e(
    rate: float = typer.Option(200.0, help="Events per second to drive (with --sweep: the first rate tried)."),
    duration: float | None = typer.Option(
        None, help="Seconds measured per rate, after a warm-up (default 60; 15 per stage with --sweep)."
    ),
    sweep: bool = typer.Option(
        False, help="Find the highest rate with freshness p99 under --bound: doubling, then bisection."
    ),
    bound: float = typer.Option(1.0, help="The freshness p99 bound of --sweep, in seconds."),
    steps: int = typer.Option(3, help="Bisection steps of --sweep."),
    max_rate: float = typer.Option(16_000.0, help="The highest rate --sweep tries."),
    model: str | None = typer.Option(
        None, help="A model directory to serve, with its blend.npz (default: train the tiny T5 and its blend first)."
    ),
    users: int = typer.Option(2_000, help="Simulated users (fewer users: more events per user per batch)."),
    items: int = typer.Option(1_000, help="Catalog size."),
    out: Path = typer.Option(Path("bench-e2e.json"), help="Where to write the JSON report."),
    profile: Path | None = typer.Option(None, help="Run both workers under cProfile, statistics in this directory."),
) -> None:
    """Freshness (trigger event in Kafka -> recommendation in Kafka) p50/p99 of the served model at a
    fixed event rate, or the highest rate that keeps p99 under a bound; consumer lag per worker."""
    from streamrec.lab.bench.e2e import run

    run(
        rate,
        duration or (15.0 if sweep else 60.0),
        out,
        model=None if model in (None, "tiny") else model,
        sweep=sweep,
        bound_s=bound,
        max_rate=max_rate,
        steps=steps,
        users=users,
        items=items,
        profile=profile,
    )


@app.command()
def tail(
    from_beginning: bool = typer.Option(False, help="Start at the oldest recommendation instead of the newest."),
    count: int = typer.Option(0, help="Stop after this many (0: until Ctrl-C)."),
) -> None:
    """Print recommendations as they arrive: user, how old the trigger was, the model, task and template
    that served it, and the items with titles, scores and why each is there."""
    from datetime import UTC, datetime

    from streamrec.events import CatalogItem, Recommendation
    from streamrec.kafka.clients import consumer
    from streamrec.kafka.topics import read_topic

    settings = _settings()
    titles: dict[str, str] = {}
    for record in read_topic(settings.kafka, settings.topics.catalog, idle=0.5):
        try:
            item = CatalogItem.model_validate_json(record.value)
            titles[item.item_id] = item.title
        except ValueError:
            continue
    reader = consumer(
        settings.kafka, auto_offset_reset="earliest" if from_beginning else "latest", enable_auto_commit=False
    )
    reader.subscribe([settings.topics.recommendations])
    seen = 0
    try:
        for record in reader:
            rec = Recommendation.model_validate_json(record.value)
            console.print(tail_line(rec, titles, datetime.fromtimestamp(record.timestamp / 1000, UTC)))
            seen += 1
            if count and seen >= count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        reader.close()


def tail_line(rec: Recommendation, titles: dict[str, str], published: datetime) -> str:
    """One recommendation as `tail` prints it (rich markup): the user, how old the trigger was when it
    was published, the model, task and template, then the top items with score and explanation."""
    from rich.markup import escape

    lag = (published - rec.event_ts).total_seconds() if rec.event_ts else None
    latency = f"{lag * 1000:,.0f} ms" if lag is not None and 0 <= lag < 3600 else "-"
    items = ", ".join(
        f"{titles.get(i.item_id, i.item_id)} ({i.score:.2f}{'; ' + i.explanation if i.explanation else ''})"
        for i in rec.items[:5]
    )
    adapter = f"+{rec.model.adapter}" if rec.model.adapter else ""
    task = f", {rec.task}: {rec.template}" if rec.task else ""
    # Titles and user ids are data: escaped, so a "[" in one is not read as rich markup.
    return f"[bold]{escape(rec.user_id)}[/] {escape(f'[{latency}, {rec.model.base}{adapter}{task}]')} {escape(items)}"
