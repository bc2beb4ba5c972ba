"""The typer apps the `streamrec` command is made of: the root and its groups. Each cli module
decorates its verbs onto these; they live apart from the package so no module imports it back."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="streamrec",
    help="Streaming recommendations on Kafka: ingest events, serve Flan-T5 recommendations, learn online.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
worker_app = typer.Typer(help="Run a streamrec worker (faust) in the foreground.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: write JSON and print a short table.", no_args_is_help=True)
schemas_app = typer.Typer(help="JSON Schema of the message contracts.", no_args_is_help=True)
app.add_typer(worker_app, name="worker")
app.add_typer(bench_app, name="bench")
app.add_typer(schemas_app, name="schemas")
