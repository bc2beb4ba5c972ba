"""The `streamrec` command line. Each module here adds its verbs to one typer app; heavy imports
(faust, torch) happen inside the commands so `--help` stays fast."""

from __future__ import annotations

# Registration by import: each module decorates its verbs onto the apps in cli.apps.
from streamrec.cli import adapters as _adapters  # noqa: F401
from streamrec.cli import model as _model  # noqa: F401
from streamrec.cli import ops as _ops  # noqa: F401
from streamrec.cli import stream as _stream  # noqa: F401
from streamrec.cli.apps import app

__all__ = ["app", "main"]


def main() -> None:
    app()
