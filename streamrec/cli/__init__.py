"""The `streamrec` command line. Each module here adds its verbs to one typer app; heavy imports
(faust, torch) happen inside the commands so `--help` stays fast."""

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

# Registration by import: each module decorates commands onto the apps above.
from streamrec.cli import adapters as _adapters  # noqa: E402, F401
from streamrec.cli import model as _model  # noqa: E402, F401
from streamrec.cli import ops as _ops  # noqa: E402, F401
from streamrec.cli import stream as _stream  # noqa: E402, F401


def main() -> None:
    app()
