"""Adapter verbs: list the registry, promote a version, roll back, re-register an old version. A
promotion is written to the registry and announced on the compacted adapters topic, which every
inference worker follows; the announcement is signed when STREAMREC_ADAPTER_KEY is set."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from streamrec.cli.apps import app
from streamrec.settings import Settings, load_settings, registry_root

adapters_app = typer.Typer(
    help="The LoRA adapter registry: list, promote, roll back, re-register.", no_args_is_help=True
)
app.add_typer(adapters_app, name="adapters")
console = Console()


def _announce(settings: Settings, manifest: object) -> None:
    from streamrec.events import ADAPTER_KEY
    from streamrec.kafka.clients import producer
    from streamrec.registry import AdapterRegistry, Manifest

    assert isinstance(manifest, Manifest)
    message = AdapterRegistry(registry_root(settings)).announcement(manifest, settings.adapter_key)
    prod = producer(settings.kafka)
    prod.send(settings.topics.adapters, key=ADAPTER_KEY, value=message.model_dump_json().encode()).get(timeout=30)
    prod.close()
    signed = "signed" if message.signature else "unsigned: STREAMREC_ADAPTER_KEY is not set"
    console.print(f"announced {manifest.version} on {settings.topics.adapters} ({signed})")


@adapters_app.command("list")
def list_adapters() -> None:
    """Every registered version, oldest first; the promoted one is marked."""
    from streamrec.registry import AdapterRegistry

    registry = AdapterRegistry(registry_root(load_settings()))
    current = registry.current_version()
    table = Table(title=f"adapters in {registry.root}")
    for col in ("", "version", "parent", "created", "HR@10", "NDCG@10", "sha256", "blend sha256", "files"):
        table.add_column(col)
    for m in registry.versions():
        table.add_row(
            "*" if m.version == current else "",
            m.version,
            m.parent or "-",
            m.created_at.isoformat(timespec="seconds"),
            f"{m.metrics.get('HR@10', float('nan')):.4f}",
            f"{m.metrics.get('NDCG@10', float('nan')):.4f}",
            m.sha256[:12],
            m.blend_sha256[:12] if m.blend_sha256 else "- (base model's)",
            str(len(m.files)) if m.files is not None else "reregister",
        )
    console.print(table)


@adapters_app.command()
def promote(version: str = typer.Argument(..., help="The version to put in service.")) -> None:
    """Check every file of a version against its manifest, make it current and announce it to the
    inference workers."""
    from streamrec.errors import ModelError
    from streamrec.registry import AdapterRegistry

    settings = load_settings()
    try:
        manifest = AdapterRegistry(registry_root(settings)).promote(version)
    except ModelError as exc:
        console.print(f"[red]refused: {exc}[/]")
        raise typer.Exit(1) from None
    _announce(settings, manifest)


@adapters_app.command()
def rollback() -> None:
    """Go back to the previously promoted version and announce it."""
    from streamrec.errors import ModelError
    from streamrec.registry import AdapterRegistry

    settings = load_settings()
    try:
        manifest = AdapterRegistry(registry_root(settings)).rollback()
    except ModelError as exc:
        console.print(f"[red]refused: {exc}[/]")
        raise typer.Exit(1) from None
    if manifest is None:
        console.print("[yellow]nothing to roll back to[/]")
        raise typer.Exit(1)
    _announce(settings, manifest)


@adapters_app.command()
def reregister(version: str = typer.Argument(..., help="A version registered before every file was hashed.")) -> None:
    """Hash every file of a version registered before manifests did (after checking the hashes its old
    manifest holds), so it can be promoted again. Check its adapter_config.json first: it was never hashed."""
    from streamrec.errors import ModelError
    from streamrec.registry import AdapterRegistry

    try:
        manifest = AdapterRegistry(registry_root(load_settings())).reregister(version)
    except ModelError as exc:
        console.print(f"[red]refused: {exc}[/]")
        raise typer.Exit(1) from None
    files = manifest.files or {}
    console.print(f"{manifest.version}: {len(files)} files hashed; `streamrec adapters promote` announces it")
